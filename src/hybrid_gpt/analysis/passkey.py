"""What a retrofit costs, measured against its teacher: passkey retrieval, agreement with the teacher's
next-token distribution, and greedy answers to three fixed questions.

Passkey retrieval is the test deep token mixing exists for: a random 5-digit key is stated once inside long
filler (held-out play text) and asked for at the end, so only a model that carries information across the whole
context can answer. Each prompt is exactly ``context`` tokens: the template's opening and the fixed wording are
laid out around a consecutive slice of the filler, cut to whatever length makes up the rest. Trial ``i``'s key and
filler offset are drawn from ``(seed, context, i)`` alone, its depth (where the key sits, 0..1 of the filler) is
``(0.5 + i * 0.618...) mod 1``: the golden-ratio sequence, spread evenly over any number of trials, so that the
first ``n`` trials of a longer run are the same ``n`` prompts. The key occurs exactly once in the prompt's text;
filler that happens to contain it gets another key. The prompt ends with the start of the answer ("The pass key
is"), so that the digits are the first tokens generated; a reply is right when its first number is the key.

Agreement (:class:`Reference`) compares a model's next-token distributions with the teacher's, computed once, on
held-out chat rendered in the template (:func:`chat_sequences`): top-1 agreement and KL(teacher || model).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from hybrid_gpt.data.template import ChatTemplate, render
from hybrid_gpt.data.tokenizer import Tokenizer
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.infer.chat import ChatSession
from hybrid_gpt.infer.engine import generate
from hybrid_gpt.model.gpt import GPT
from hybrid_gpt.train.evaluate import evaluating

# The wording was chosen on dev seeds (never reported) so that the full SmolLM2-135M-Instruct does the task.
INTRO = "Read the text below and remember the pass key hidden in it.\n\n"
NEEDLE = "\n\nThe pass key is {key}.\n\n"
QUESTION = "\n\nWhat is the pass key hidden in the text above? Reply with the number only."
CUE = "The pass key is"  # the reply's start, given: the digits come first (the plain prompt's line after QUESTION)
MIN_FILLER = 16  # tokens of filler a prompt needs at least
GOLDEN = (math.sqrt(5) - 1) / 2


@dataclass
class PasskeyTrial:
    ids: list[int]
    key: str
    context: int
    depth: float  # where the key sits: the fraction of the filler's tokens before it
    # How to read the reply: the tokenizer that built the prompt, and the ids that end a reply (chat prompts only).
    tokenizer: Tokenizer | None = field(default=None, repr=False, compare=False)
    stop_ids: tuple[int, ...] = ()


def with_template(tokenizer: Tokenizer, template: ChatTemplate | None) -> Tokenizer:
    """``tokenizer`` rendering in ``template`` (itself when that is already its template, or None)."""
    if template is None or template == tokenizer.template:
        return tokenizer
    return Tokenizer(tokenizer.hf, template)


def _frame(tok: Tokenizer, template: ChatTemplate | None) -> tuple[list[int], list[int]]:
    """The ids before the filler (opening and INTRO) and after it (QUESTION, the end of the user turn, the
    generation prompt and CUE; without a template QUESTION and CUE on a line of its own)."""
    if template is None:
        return tok.prompt_ids(INTRO), tok.encode(QUESTION + "\n\n" + CUE)
    tok = with_template(tok, template)
    ids = render(tok, [{"role": "user", "content": INTRO}], add_generation_prompt=True).ids
    end = len(ids) - 1 - ids[::-1].index(tok.end_id)  # the user turn's end: the last turn end
    return ids[:end], tok.encode(QUESTION) + ids[end:] + tok.encode(CUE)


def passkey_trials(tokenizer: Tokenizer, filler: np.ndarray, *, context: int, trials: int, seed: int,
                   template: ChatTemplate | None = None) -> list[PasskeyTrial]:
    """``trials`` prompts of exactly ``context`` tokens, each stating a random 5-digit key once at its depth in
    a slice of ``filler`` (token ids of held-out text; its special tokens, such as document starts, are dropped)
    and asking for it at the end, in ``template``'s user turn (plain text without one); either way the prompt
    ends with CUE, the start of the answer. HybridGPTError if the context or the filler is too short."""
    if trials < 1:
        raise HybridGPTError(f"passkey needs at least one trial (got {trials})")
    filler = np.asarray(filler)
    filler = filler[~np.isin(filler, list(tokenizer.special.values()))]
    head, tail = _frame(tokenizer, template)
    stop = tuple(sorted(with_template(tokenizer, template).stop_ids)) if template is not None else ()
    out = []
    for i in range(trials):
        rng = np.random.default_rng([seed, context, i])
        depth = (0.5 + i * GOLDEN) % 1
        offset_u = rng.random()
        for _ in range(100):  # another key while the filler happens to contain this one
            key = str(rng.integers(10_000, 100_000))
            needle = tokenizer.encode(NEEDLE.format(key=key))
            n = context - len(head) - len(needle) - len(tail)
            if n < MIN_FILLER:
                raise HybridGPTError(f"a passkey prompt of {context} tokens leaves {max(n, 0)} for the filler; "
                                     f"it needs at least {MIN_FILLER}: give passkey contexts of at least "
                                     f"{context - n + MIN_FILLER:,} tokens (within the model's context)")
            if n > len(filler):
                raise HybridGPTError(f"a passkey prompt of {context} tokens needs {n:,} filler tokens; "
                                     f"the filler has {len(filler):,}")
            start = int(offset_u * (len(filler) - n + 1))
            before = round(depth * n)
            piece = [int(t) for t in filler[start:start + n]]
            ids = head + piece[:before] + needle + piece[before:] + tail
            if tokenizer.decode(ids).count(key) == 1:
                break
        else:
            raise HybridGPTError("the filler contains every passkey drawn; use other filler")
        out.append(PasskeyTrial(ids=ids, key=key, context=context, depth=before / n, tokenizer=tokenizer,
                                stop_ids=stop))
    return out


def read_key(text: str) -> str:
    """The number a reply gives: its first run of digits ("" if none). A run longer or shorter than the key
    is a different number, so "123456" does not match the key 12345."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else ""


def score_passkey(model: GPT, trials: list[PasskeyTrial], *, max_new_tokens: int = 8, batch_size: int = 1,
                  tokenizer: Tokenizer | None = None) -> dict:
    """Greedy replies to ``trials`` (prompts of equal length decoded together, ``batch_size`` at a time), each
    read up to its first stop id and correct when :func:`read_key` of its text is the key. ``tokenizer`` reads
    the replies, by default the one each trial was built with. "context" is the first trial's."""
    if not trials:
        raise HybridGPTError("passkey scoring needs at least one trial")
    if tokenizer is None and any(t.tokenizer is None for t in trials):
        raise HybridGPTError("passkey scoring needs the tokenizer that built the trials")
    block = model.config.block_size
    device = next(model.parameters()).device
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(trials):
        if len(t.ids) > block:
            raise HybridGPTError(f"a passkey prompt of {len(t.ids)} tokens exceeds the model's context of {block}")
        groups.setdefault(len(t.ids), []).append(i)
    answers: list[dict] = [None] * len(trials)
    size = max(1, batch_size)
    for rows in groups.values():
        for batch in (rows[b:b + size] for b in range(0, len(rows), size)):
            stop = set().union(*(trials[i].stop_ids for i in batch))
            idx = torch.tensor([trials[i].ids for i in batch], dtype=torch.long, device=device)
            steps = [nxt[:, 0].tolist() for nxt in generate(model, idx, max_new_tokens, temperature=0,
                                                             stop_tokens=stop or None)]
            for r, i in enumerate(batch):
                reply = [step[r] for step in steps]
                reply = reply[:next((k for k, t in enumerate(reply) if t in stop), len(reply))]
                t = trials[i]
                text = (tokenizer or t.tokenizer).decode(reply)
                answer = read_key(text)
                answers[i] = {"key": t.key, "answer": answer, "correct": answer == t.key, "depth": t.depth,
                              "text": text}
    correct = sum(a["correct"] for a in answers)
    return {"accuracy": correct / len(trials), "correct": correct, "n": len(trials), "context": trials[0].context,
            "answers": answers}


class Reference:
    """The teacher's next-token distributions at every position of ``sequences``, computed once (no grad, one
    sequence at a time), so that models can be compared with it without running the teacher again.

    Memory: log-probabilities are kept in float16, 2 bytes per vocabulary entry per token (96 KiB a token at
    SmolLM2's 49,152: 4,096 tokens take 384 MiB); the teacher's top-1 is taken before rounding. KL is computed in
    float32 from the stored log-probabilities renormalised: the rounding (relative 2^-11) adds about 1e-6 nats
    to a KL, the teacher's against itself included."""

    CHUNK = 512  # positions whose float32 log-probabilities are compared at once

    def __init__(self, teacher: GPT, sequences: list[np.ndarray] | torch.Tensor):
        self.sequences = [torch.as_tensor(np.asarray(s, dtype=np.int64)) for s in sequences]
        if not self.sequences or any(s.dim() != 1 or s.numel() == 0 for s in self.sequences):
            raise HybridGPTError("a reference needs at least one non-empty sequence of token ids")
        self.vocab_size = teacher.config.vocab_size
        self.log_probs, self.top1 = [], []
        for lp in self._log_probs(teacher):
            self.top1.append(lp.argmax(-1))
            self.log_probs.append(lp.clamp(min=torch.finfo(torch.float16).min).to(torch.float16))

    @property
    def tokens(self) -> int:
        return sum(s.numel() for s in self.sequences)

    def _log_probs(self, model: GPT):
        """Per sequence, the model's float32 next-token log-probabilities [T, vocab]."""
        device = next(model.parameters()).device
        with evaluating(model) as m, torch.inference_mode():
            for seq in self.sequences:
                if seq.numel() > m.config.block_size:
                    raise HybridGPTError(f"a reference sequence of {seq.numel()} tokens exceeds the model's "
                                         f"context of {m.config.block_size}")
                yield F.log_softmax(m(seq[None].to(device))[0].float(), dim=-1).cpu()

    def compare(self, model: GPT) -> dict:
        """{"top1_agreement": share of positions where the model's argmax is the teacher's, "kl": mean
        KL(teacher || model) in nats per position, "tokens": positions scored}."""
        if model.config.vocab_size != self.vocab_size:
            raise HybridGPTError(f"the model's vocabulary ({model.config.vocab_size:,}) is not the teacher's "
                                 f"({self.vocab_size:,})")
        agree, kl = 0, 0.0
        for lq, lp16, top in zip(self._log_probs(model), self.log_probs, self.top1):
            agree += int((lq.argmax(-1) == top).sum())
            for a in range(0, lq.size(0), self.CHUNK):
                lp = F.log_softmax(lp16[a:a + self.CHUNK].float(), dim=-1)
                kl += float((lp.exp() * (lp - lq[a:a + self.CHUNK])).sum())
        return {"top1_agreement": agree / self.tokens, "kl": kl / self.tokens, "tokens": self.tokens}


def chat_sequences(tokenizer: Tokenizer, template: ChatTemplate | None, conversations: list[list[dict]], *,
                   max_tokens: int, block_size: int) -> list[np.ndarray]:
    """``conversations`` in order, each rendered in ``template`` (the tokenizer's own when None) and cropped to
    ``block_size`` tokens as training crops them, until ``max_tokens`` in all (the last one cut to fit)."""
    if max_tokens < 1 or block_size < 1:
        raise HybridGPTError("chat sequences need max_tokens and block_size of at least 1")
    tok = with_template(tokenizer, template)
    out, total = [], 0
    for messages in conversations:
        if total >= max_tokens:
            break
        ids = render(tok, messages, max_len=block_size).ids[:max_tokens - total]
        out.append(np.asarray(ids, dtype=np.int64))
        total += len(ids)
    return out


QUESTIONS = (
    "Who is Hamlet, and what does his father's ghost ask him to do?",
    "What is the capital of France?",
    "Write two lines about the sea.",
)


def greedy_answers(model: GPT, tokenizer: Tokenizer, template: ChatTemplate | None = None, *,
                   questions=QUESTIONS, max_new_tokens: int = 48) -> list[str]:
    """The greedy reply to each question, asked alone in ``template`` (the tokenizer's own when None) and ended
    at the template's end of turn, as `hybrid-gpt chat` replies."""
    tok = with_template(tokenizer, template)
    out = []
    for q in questions:
        session = ChatSession(model, tok, max_new_tokens=max_new_tokens, temperature=0)
        out.append("".join(session.reply(q)))
    return out
