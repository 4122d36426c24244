"""Inference: a preallocated KV cache, sampling, and streaming generation.

Kept apart from the model definition: the model only knows the cache's small interface
(``pos`` and ``update``), so decoding strategies can change without touching model.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from hybrid_gpt.model.gpt import GPT


class KVCache:
    """Static per-layer key/value buffers for attention layers only: one [2, B, kv_heads, max_len, head_dim]
    tensor per layer, keys at index 0 and values at 1, so that one copy writes both. With grouped-query
    attention it holds the key/value heads only (kv_heads < n_head), which is GQA's saving.

    Written in place (no per-token concatenation); ``pos`` counts the tokens already cached.
    """

    def __init__(self, model: GPT, batch_size: int, max_len: int | None = None, dtype=None, device=None):
        cfg = model.config
        param = next(model.parameters())
        self.max_len = max_len or cfg.block_size
        shape = (2, batch_size, cfg.kv_heads, self.max_len, cfg.head_dim)
        dtype, device = dtype or param.dtype, device or param.device
        self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model.attention_layers)]
        self.pos = 0

    def update(self, index: int, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache ``kv`` ([2, B, kv_heads, T, head_dim]: new keys and values) after the ``pos`` cached tokens
        of attention layer ``index``; return that layer's keys and values so far, [B, kv_heads, pos + T, head_dim]
        each (keys with RoPE applied at their positions, where the model uses it)."""
        end = self.pos + kv.size(-2)
        buf = self.kv[index]
        buf[:, :, :, self.pos:end] = kv
        k, v = buf[:, :, :, :end].unbind(0)
        return k, v

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        self.pos = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token for each row of ``logits`` [B, vocab]; temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop tokens once the mass before them already exceeds top_p (the first token always stays).
        drop = probs.cumsum(dim=-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.inference_mode()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             use_cache: bool = True, stop_tokens=None) -> Iterator[torch.Tensor]:
    """Yield the next token ids [B, 1] one step at a time (streaming).

    ``idx`` [B, T] must fit the context. Past the context the model sees a window that restarts:
    once the window would exceed ``block_size`` it restarts at the last ``block_size // 2`` tokens
    (positions from 0 again, learned or rotary alike) and grows from there. The cache is re-primed with
    exactly that window, which amortises the re-priming over ``block_size // 2`` steps; the uncached path runs the same
    window every step, so both compute the same function and ``use_cache`` changes speed only.
    Generation ends once every row has produced one of ``stop_tokens``; a row that has stopped
    repeats its stop token. The model is put in eval mode and given back in the mode it was in.
    """
    block = model.config.block_size
    if idx.size(1) > block:
        raise ValueError(f"prompt of {idx.size(1)} tokens exceeds the context of {block}; crop it first")
    was_training = model.training
    model.eval()
    try:
        yield from _generate(model, idx, max_new_tokens, temperature, top_k, top_p, seed, use_cache, stop_tokens)
    finally:
        model.train(was_training)


def _generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float, top_k: int | None,
              top_p: float | None, seed: int | None, use_cache: bool, stop_tokens) -> Iterator[torch.Tensor]:
    block = model.config.block_size
    generator = None
    if seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    seq = idx
    done = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)
    stops = torch.tensor(sorted(stop_tokens or []), dtype=torch.long, device=idx.device)
    finished = torch.zeros_like(done, dtype=torch.long)  # the stop token each finished row produced
    # As long as generation needs, never longer than the context (a long context's full cache is large).
    cache = KVCache(model, idx.size(0), max_len=min(block, idx.size(1) + max_new_tokens)) if use_cache else None
    pending = idx  # tokens not yet fed to the cache
    start = 0  # where the window the model sees begins in seq
    for _ in range(max_new_tokens):
        if seq.size(1) - start > block:
            start = seq.size(1) - max(1, block // 2)
            if cache is not None:
                cache.reset()
                pending = seq[:, start:]
        if cache is None:
            logits = model(seq[:, start:], last_only=True)[:, -1]
        else:
            logits = model(pending, kv_cache=cache, last_only=True)[:, -1]
            cache.advance(pending.size(1))
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if stops.numel():
            nxt = torch.where(done, finished, nxt)
            hit = torch.isin(nxt, stops) & ~done
            finished = torch.where(hit, nxt, finished)
            done = done | hit
        seq = torch.cat([seq, nxt], dim=1)
        pending = nxt
        yield nxt
        if stops.numel() and bool(done.all()):
            return
