"""Validation loss, perplexity and bits per byte over a fixed number of held-out tokens."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.model.gpt import GPT
from hybrid_gpt.stats import mean_ci
from hybrid_gpt.train.config import EVAL_TOKENS

# An analysis's held-out budget covers at least this many whole windows of its context (check_budget).
MIN_WINDOWS = 2
# Float32 logits one evaluation batch may hold: a batch of long windows over a large vocabulary has fewer rows.
LOGITS_BUDGET = 2**28


def window_length(model: GPT, context: int | None) -> int:
    """The window every held-out measurement of ``model`` reads: ``context`` tokens, or its full context
    when None; a window longer than the model's context is a one-line error."""
    block = model.config.block_size
    if context is None:
        if block * model.config.vocab_size > 4 * LOGITS_BUDGET:
            gib = 4 * block * model.config.vocab_size / 2**30
            raise HybridGPTError(f"one window of the model's full context ({block:,} tokens) needs {gib:.1f} GiB of "
                                 "logits; pass --context with a shorter window")
        return block
    if isinstance(context, bool) or not isinstance(context, int) or not 1 <= context <= block:
        raise HybridGPTError(f"the evaluation context must be between 1 and the model's context of {block}, "
                             f"got {context!r}")
    return context


def batch_rows(model: GPT, context: int, batch_size: int) -> int:
    """``batch_size`` windows per batch, fewer when their logits would pass LOGITS_BUDGET (1 GiB)."""
    return max(1, min(batch_size, LOGITS_BUDGET // (context * model.config.vocab_size)))


@contextmanager
def evaluating(model):
    """Yield the bare model (unwrapped from DDP) in eval mode; restore its training mode after."""
    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_lm(model: GPT, tokens: np.ndarray, byte_lengths: np.ndarray, max_tokens: int = EVAL_TOKENS,
                batch_size: int = 16, autocast=nullcontext, context: int | None = None,
                per_window: bool = False) -> dict:
    """Mean next-token loss (nats), perplexity and bits per byte.

    Over the windows of :func:`windows` (``context`` tokens long, the model's full context when None), so
    each token is predicted once; bits per byte divide the summed
    loss by the UTF-8 bytes of exactly those targets (special tokens count zero bytes), which makes models
    with different tokenizers comparable. With ``per_window``, also each window's bits and bytes
    ("window_bits", "window_bytes"), which pair window by window with another model's
    (:func:`bpb_difference`): the noise of a difference between two models.
    """
    with evaluating(model) as model:
        return _evaluate_lm(model, tokens, byte_lengths, max_tokens, batch_size, autocast, context, per_window)


def bpb_difference(a: dict, b: dict) -> dict:
    """stats.mean_ci of the per-window bits-per-byte differences a - b of two :func:`evaluate_lm` results with
    ``per_window`` over the same windows (paired by window): the difference and its 95% t-interval (None from
    a single window), the one measure of whether two models' quality differs beyond noise."""
    return mean_ci(window_differences(a, b))


def window_differences(a: dict, b: dict) -> list[float]:
    """Per window, a - b in bits per byte (each window's bits over ``b``'s bytes of it), paired by window."""
    if len(a["window_bits"]) != len(b["window_bits"]):
        raise HybridGPTError(f"paired windows differ in number ({len(a['window_bits'])} vs {len(b['window_bits'])})")
    return [(x - y) / max(n, 1) for x, y, n in zip(a["window_bits"], b["window_bits"], b["window_bytes"])]


def check_budget(name: str, tokens: int, split_tokens: int, context: int) -> None:
    """HybridGPTError unless a held-out budget of ``tokens`` (of a split of ``split_tokens``) fills at least
    MIN_WINDOWS whole windows of ``context``: a figure from less (one token, part of one window) has no
    spread to judge its noise by, and looks as meaningful as any other. The message states the minimum."""
    need = MIN_WINDOWS * context
    have = min(tokens, split_tokens - 1)
    if have < need:
        short = f"--{name.replace('_', '-')} {tokens:,}" if tokens < need else \
            f"the validation split's {split_tokens:,} tokens"
        raise HybridGPTError(f"{short} cannot give a figure that means anything: {name} must cover at least "
                             f"{MIN_WINDOWS} whole windows of {context:,} tokens ({need:,} tokens)")


def window_starts(n_tokens: int, block_size: int, max_tokens: int, spread: bool = False) -> tuple[int, list[int]]:
    """(T, starts) of the windows :func:`windows` reads from a split of ``n_tokens`` tokens: windows of T =
    ``block_size`` targets (one shorter window when the split or ``max_tokens`` is shorter than one), as many
    as ``max_tokens`` holds, tiling the split from its start or, with ``spread``, starting at evenly spaced
    offsets over the whole split (still without overlap)."""
    if n_tokens < 2:
        raise HybridGPTError(f"the split has {n_tokens} tokens; at least 2 are needed to predict one")
    if max_tokens < 1:
        raise HybridGPTError(f"the number of tokens to evaluate must be at least 1, got {max_tokens}")
    targets = min(max_tokens, n_tokens - 1)
    T = block_size
    n_windows = targets // T
    if n_windows < 1:
        T, n_windows = targets, 1
    if spread and n_windows > 1:
        stride = (n_tokens - 1 - T) / (n_windows - 1)  # >= T: n_windows * T <= n_tokens - 1
        return T, [round(r * stride) for r in range(n_windows)]
    return T, [r * T for r in range(n_windows)]


def windows(tokens: np.ndarray, block_size: int, max_tokens: int, batch_size: int = 16,
            spread: bool = False) -> Iterator[torch.Tensor]:
    """Batches [rows, T + 1] (int64, on the CPU) of the windows every held-out measurement reads.

    Windows of T = ``block_size`` targets tile the split from its start without overlap, up to
    ``max_tokens`` targets: inputs are ``[:, :-1]`` and targets ``[:, 1:]``, so each token is predicted
    once. When the split (or ``max_tokens``) is shorter than one context, one shorter window holds them all.
    With ``spread``, the same number of windows starts at evenly spaced offsets over the whole split
    instead (:func:`window_starts`), so that a budget smaller than the split samples all of its documents
    rather than the first.
    """
    T, starts = window_starts(len(tokens), block_size, max_tokens, spread)
    for lo in range(0, len(starts), batch_size):
        yield torch.from_numpy(np.stack([tokens[s : s + T + 1] for s in starts[lo:lo + batch_size]]).astype(np.int64))


def model_windows(model: GPT, tokens: np.ndarray, max_tokens: int, batch_size: int = 16,
                  context: int | None = None) -> Iterator[torch.Tensor]:
    """:func:`windows` of ``model``'s evaluation window (:func:`window_length`), in batches whose logits fit
    (:func:`batch_rows`): what evaluate_lm reads, and what measurements of the same tokens read."""
    T = window_length(model, context)
    return windows(tokens, T, max_tokens, batch_rows(model, T, batch_size))


def _evaluate_lm(model: GPT, tokens, byte_lengths, max_tokens: int, batch_size: int, autocast,
                 context: int | None, per_window: bool) -> dict:
    device = next(model.parameters()).device
    total_loss, total_bytes, count = 0.0, 0, 0
    window_bits, window_bytes = [], []
    for chunk in model_windows(model, tokens, max_tokens, batch_size, context):
        x, y = chunk[:, :-1].to(device), chunk[:, 1:].to(device)
        with autocast():
            _, loss = model(x, y, loss_reduction="none" if per_window else "sum")
        if per_window:
            rows = loss.double().view(y.shape).sum(1).cpu()
            window_bits += (rows / math.log(2)).tolist()
            window_bytes += byte_lengths[chunk[:, 1:].numpy()].sum(1).tolist()
            loss = rows.sum()
        total_loss += loss.item()
        total_bytes += int(byte_lengths[chunk[:, 1:].numpy()].sum())
        count += y.numel()
    mean = total_loss / count
    out = {
        "loss": mean,
        "perplexity": math.exp(min(mean, 700.0)),
        "bpb": total_loss / (math.log(2) * max(total_bytes, 1)),
        "tokens": count,
        "bytes": total_bytes,
    }
    if per_window:
        out |= {"window_bits": window_bits, "window_bytes": [int(b) for b in window_bytes]}
    return out
