"""A chat session over a checkpoint: history, cropping to the context, streaming replies."""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from hybrid_gpt.data.template import render
from hybrid_gpt.data.tokenizer import Tokenizer
from hybrid_gpt.infer.engine import generate
from hybrid_gpt.model.gpt import GPT

MAX_INPUT_CHARS = 1_000_000  # beyond this a message is refused rather than tokenised


def clean_input(text: str) -> str:
    """Drop control characters (keeping tabs and newlines) and surrounding whitespace."""
    return "".join(ch for ch in text if ch in "\t\n" or unicodedata.category(ch) != "Cc").strip()


@dataclass
class ReplyStats:
    tokens: int = 0
    seconds: float = 0.0
    prompt_tokens: int = 0
    cropped_turns: int = 0
    cut_tokens: int = 0

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class ChatSession:
    def __init__(self, model: GPT, tokenizer: Tokenizer, max_new_tokens: int = 128, temperature: float = 0.8,
                 top_k: int | None = 50, top_p: float | None = None, seed: int | None = None,
                 system: str | None = None):
        self.model, self.tok = model.eval(), tokenizer
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p
        self.seed = seed
        self.system = system
        self.history: list[dict] = []
        self.last = ReplyStats()
        # Any control token ends a reply: <|end|> normally, or the model starting another turn.
        self.stop_tokens = set(tokenizer.special.values())

    def reset(self) -> None:
        self.history = []

    def _messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def reply(self, text: str) -> Iterator[str]:
        """Stream the reply to ``text`` as text pieces; the exchange joins the history when it completes."""
        block = self.model.config.block_size
        room = min(self.max_new_tokens, block // 2)  # keep space in the context for the reply
        messages = self._messages() + [{"role": "user", "content": text}]
        r = render(self.tok, messages, max_len=block - room, add_generation_prompt=True)
        self.last = ReplyStats(prompt_tokens=len(r.ids), cropped_turns=r.cropped_turns, cut_tokens=r.cut_tokens)
        device = next(self.model.parameters()).device
        idx = torch.tensor([r.ids], dtype=torch.long, device=device)
        seed = None if self.seed is None else self.seed + len(self.history)
        start = time.perf_counter()

        def tokens():
            for nxt in generate(self.model, idx, self.max_new_tokens, temperature=self.temperature,
                                top_k=self.top_k, top_p=self.top_p, seed=seed, stop_tokens=self.stop_tokens):
                token = int(nxt[0, 0])
                if token in self.stop_tokens:
                    return
                self.last.tokens += 1
                self.last.seconds = time.perf_counter() - start
                yield token

        pieces = []
        for piece in self.tok.decode_stream(tokens()):
            pieces.append(piece)
            yield piece
        self.last.seconds = time.perf_counter() - start
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces)}]
