"""A chat session over a checkpoint (history, cropping to the context, streaming replies) and the
interactive loop of `hybrid-gpt chat`."""

from __future__ import annotations

import sys
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from hybrid_gpt.data.template import render
from hybrid_gpt.data.tokenizer import Tokenizer
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.infer.config import Sampling
from hybrid_gpt.infer.engine import generate
from hybrid_gpt.model.gpt import GPT
from hybrid_gpt.options import MAX_TEXT_CHARS, check_value, require

MAX_INPUT_CHARS = MAX_TEXT_CHARS  # beyond this a message is refused rather than tokenised
def clean_input(text: str) -> str:
    """Drop control characters (keeping tabs and newlines) and surrounding whitespace."""
    return "".join(ch for ch in text if ch in "\t\n" or unicodedata.category(ch) != "Cc").strip()


def check_message(text: str, what: str = "message") -> str:
    """``text`` cleaned; HybridGPTError if it is empty, not valid UTF-8 text, or longer than MAX_INPUT_CHARS."""
    if not isinstance(text, str):
        raise HybridGPTError(f"the {what} must be text")
    text = clean_input(text)
    problem = check_value(text, "text")
    if problem:
        raise HybridGPTError(f"the {what} {problem}")
    return text


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
    """``sampling``: the fields of :class:`Sampling` (max_new_tokens, temperature, top_k, top_p)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, seed: int | None = None, system: str | None = None,
                 **sampling):
        self.model, self.tok = model.eval(), tokenizer
        self.sampling = Sampling(**sampling).validate(model.config.block_size)
        require("seed", seed, "seed")
        self.seed = seed
        self.system = check_message(system, "system message") if system is not None else None
        self.history: list[dict] = []
        self.last = ReplyStats()
        # The template's stop tokens end a reply: its turn end normally (<|end|>, <|im_end|>), or the model
        # starting another turn (ours: any of its control tokens).
        self.stop_tokens = tokenizer.stop_ids

    def reset(self) -> None:
        self.history = []

    def _messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def reply(self, text: str) -> Iterator[str]:
        """Stream the reply to ``text`` as text pieces; the exchange joins the history when it completes.

        HybridGPTError if ``text`` is not a message (see :func:`check_message`)."""
        text = check_message(text)
        sp = self.sampling
        block = self.model.config.block_size
        room = min(sp.max_new_tokens, block // 2)  # keep space in the context for the reply
        messages = self._messages() + [{"role": "user", "content": text}]
        r = render(self.tok, messages, max_len=block - room, add_generation_prompt=True)
        self.last = ReplyStats(prompt_tokens=len(r.ids), cropped_turns=r.cropped_turns, cut_tokens=r.cut_tokens)
        device = next(self.model.parameters()).device
        idx = torch.tensor([r.ids], dtype=torch.long, device=device)
        seed = None if self.seed is None else self.seed + len(self.history)
        start = time.perf_counter()

        def tokens():
            for nxt in generate(self.model, idx, sp.max_new_tokens, temperature=sp.temperature, top_k=sp.top_k or None,
                                top_p=sp.top_p, seed=seed, stop_tokens=self.stop_tokens):
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


def _answer(session: ChatSession, text: str, out, err) -> None:
    """Stream one reply to ``out`` and its statistics to ``err``; Ctrl-C drops just this reply."""
    try:
        for piece in session.reply(text):
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        print("\n(reply interrupted; it is not kept in the history)", file=err)
        return
    st = session.last
    notes = []
    if st.cropped_turns:
        notes.append(f"{st.cropped_turns} oldest turns dropped to fit the context of {session.model.config.block_size}")
    if st.cut_tokens:
        notes.append(f"the oldest {st.cut_tokens} tokens of your message dropped to fit the context")
    print(file=out)
    print(f"[{st.tokens} tokens, {st.tokens_per_sec:.1f} tokens/s" + "".join(f"; {n}" for n in notes) + "]", file=err)


def one_shot(session: ChatSession, text: str, out=None, err=None) -> None:
    """One message, one reply; HybridGPTError if ``text`` is not a message."""
    _answer(session, check_message(text), out or sys.stdout, err or sys.stderr)


class LineTooLong(Exception):
    """A line of input over MAX_INPUT_CHARS, skipped unread: ``length`` is how many characters it had."""

    def __init__(self, length: int):
        super().__init__(length)
        self.length = length


def read_line(prompt: str) -> str:
    """:func:`input` at a terminal; from a pipe or a file, one line read at most MAX_INPUT_CHARS + 1 characters
    at a time and a longer one skipped (:class:`LineTooLong`): a stream without line breaks (/dev/zero) must not
    grow memory without bound."""
    if sys.stdin.isatty():
        return input(prompt)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    line = sys.stdin.readline(MAX_INPUT_CHARS + 1)
    if not line:
        raise EOFError
    length = len(line)
    while not line.endswith("\n") and length > MAX_INPUT_CHARS:
        line = sys.stdin.readline(MAX_INPUT_CHARS + 1)
        if not line or line.endswith("\n"):
            raise LineTooLong(length + len(line.rstrip("\n")))
        length += len(line)
    return line.removesuffix("\n")


def repl(session: ChatSession, banner: str = "", read: Callable[[str], str] = read_line, out=None,
         err=None) -> None:
    """The interactive loop: a line per message, /reset, /quit or end of input; returns when done.

    A line that is empty, too long or not valid UTF-8 text is refused with a note, and the loop goes on:
    reading from standard input, it is switched to errors="surrogateescape", so that bytes that are not
    UTF-8 arrive as lone surrogates (refused) instead of raising in the middle of the stream."""
    out, err = out or sys.stdout, err or sys.stderr
    if read is read_line and hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # before the first read: it cannot change after one
    if banner:
        print(banner, file=err)
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=err)
            return
        except LineTooLong as e:
            print(f"(the message is {e.length:,} characters long; the limit is {MAX_INPUT_CHARS:,}; not sent)",
                  file=err)
            continue
        text = clean_input(line)
        if not text:
            print("(empty message: type something, /reset or /quit)", file=err)
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            session.reset()
            print("(history cleared)", file=err)
            continue
        try:
            text = check_message(text)
        except HybridGPTError as e:
            print(f"({e}; not sent)", file=err)
            continue
        out.write("bot> ")
        _answer(session, text, out, err)
