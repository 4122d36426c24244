"""Validation loss, perplexity and bits per byte over a fixed number of held-out tokens."""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from hybrid_gpt.model.gpt import GPT

# The documented default: the first 131,072 predicted tokens of the validation split (or all of it,
# if shorter), in non-overlapping windows of the model's full context.
EVAL_TOKENS = 131072


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
                batch_size: int = 16, autocast=nullcontext) -> dict:
    """Mean next-token loss (nats), perplexity and bits per byte.

    Windows of ``block_size`` targets tile the split from its start without overlap, so each token
    is predicted once; bits per byte divide the summed loss by the UTF-8 bytes of exactly those
    targets (special tokens count zero bytes), which makes models with different tokenizers comparable.
    """
    with evaluating(model) as model:
        return _evaluate_lm(model, tokens, byte_lengths, max_tokens, batch_size, autocast)


def _evaluate_lm(model: GPT, tokens, byte_lengths, max_tokens: int, batch_size: int, autocast) -> dict:
    device = next(model.parameters()).device
    T = model.config.block_size
    n_windows = min(max_tokens, len(tokens) - 1) // T
    if n_windows < 1:
        T = len(tokens) - 1  # a tiny split: one shorter window
        n_windows = 1
    total_loss, total_bytes, count = 0.0, 0, 0
    for start in range(0, n_windows, batch_size):
        rows = range(start, min(start + batch_size, n_windows))
        chunk = np.stack([tokens[r * T : r * T + T + 1] for r in rows]).astype(np.int64)
        x = torch.from_numpy(chunk[:, :-1]).to(device)
        y = torch.from_numpy(chunk[:, 1:]).to(device)
        with autocast():
            _, loss = model(x, y, loss_reduction="sum")
        total_loss += loss.item()
        total_bytes += int(byte_lengths[chunk[:, 1:]].sum())
        count += y.numel()
    mean = total_loss / count
    return {
        "loss": mean,
        "perplexity": math.exp(min(mean, 700.0)),
        "bpb": total_loss / (math.log(2) * max(total_bytes, 1)),
        "tokens": count,
        "bytes": total_bytes,
    }
