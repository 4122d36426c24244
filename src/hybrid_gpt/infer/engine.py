"""Inference: a preallocated KV cache, sampling, and streaming generation.

Kept apart from the model definition: the model only knows the cache's small interface
(``pos`` and ``update``), so decoding strategies can change without touching model.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from hybrid_gpt import compat
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.infer.config import check_new_tokens
from hybrid_gpt.model.gpt import GPT


class KVCache:
    """Static per-layer key/value buffers for attention layers only: one [2, B, kv_heads, max_len, head_dim]
    tensor per layer, keys at index 0 and values at 1, so that one copy writes both. With grouped-query
    attention it holds the key/value heads only (kv_heads < n_head), which is GQA's saving.

    Written in place (no per-token concatenation); ``pos`` counts the tokens already cached.
    """

    mask = None  # a static step's mask of the cache's slots (StaticKVCache); None: the model slices by ``pos``

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

    def positions(self, length: int) -> slice:
        """The positions of ``length`` new tokens, which follow the ``pos`` cached ones."""
        return slice(self.pos, self.pos + length)

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        self.pos = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv)


class StaticKVCache(KVCache):
    """A KVCache whose decode steps all have one shape, so that one compiled graph (and, on a GPU, one CUDA
    graph) serves every position: inside :meth:`step` the model reads the new token's position and the mask
    of the slots written so far from two tensors updated in place, writes its keys and values with an
    index copy, and attends over the whole ``max_len`` buffer with that mask, never reading the Python int
    ``pos`` (a guard on it would recompile the graph at every position). Outside ``step`` (a prefill) it is a
    plain KVCache on the same buffers."""

    def __init__(self, model: GPT, batch_size: int, max_len: int | None = None, dtype=None, device=None):
        super().__init__(model, batch_size, max_len, dtype, device)
        device = device or next(model.parameters()).device
        self._slots = torch.arange(self.max_len, device=device)
        self._where = torch.zeros(1, dtype=torch.long, device=device)
        self._mask = torch.zeros(1, self.max_len, dtype=torch.bool, device=device)
        # The step's input token, copied in: one address and one layout (a token sliced from a prompt has the
        # prompt's strides, and a compiled graph specialises on strides).
        self._token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        if self._slots.device.type == "cuda":  # fixed addresses, which CUDA graphs replay; not on the CPU,
            for t in self.kv + [self._where, self._mask, self._token]:  # where freezing would fold them in
                compat.mark_static_address(t)

    def positions(self, length: int) -> slice | torch.Tensor:
        return self._where if self.mask is not None else super().positions(length)

    def update(self, index: int, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mask is None:
            return super().update(index, kv)
        buf = self.kv[index]
        buf.index_copy_(3, self._where, kv)
        k, v = buf.unbind(0)
        return k, v

    def step(self, forward, token: torch.Tensor) -> torch.Tensor:
        """``forward(token, kv_cache=self, last_only=True)`` for one token per row ([B, 1]) at position
        ``pos``, in static mode; the cache then advances by one. ``forward`` is the model, or its compiled
        step (:func:`compile_step`)."""
        if token.shape != self._token.shape:
            raise ValueError(f"a static step takes one token per row ({tuple(self._token.shape)}), got shape "
                             f"{tuple(token.shape)}")
        if self.pos >= self.max_len:
            raise HybridGPTError(f"the static cache holds {self.max_len} tokens and is full")
        self._where.fill_(self.pos)
        torch.le(self._slots, self._where, out=self._mask[0])
        self._token.copy_(token)
        self.mask = self._mask
        try:
            logits = forward(self._token, kv_cache=self, last_only=True)
        finally:
            self.mask = None
        self.advance(1)
        return logits


def compile_step(model: GPT):
    """``model`` compiled for :class:`StaticKVCache` steps: one graph, shapes fixed, every position.

    On the CPU, inductor with freezing (the weights folded in as constants, the linear layers pre-packed for
    MKL) and its C++ wrapper (no Python between kernels); on a GPU, CUDA graphs (``reduce-overhead``),
    which replay a step's kernels in one launch. Call it under no_grad or inference mode; it compiles at the
    first step of each batch size and cache length. The settings are applied around every call, since
    compilation happens then and freezing is read from inductor's global config, not from torch.compile's
    options."""
    if next(model.parameters()).device.type != "cpu":
        return torch.compile(model, fullgraph=True, dynamic=False, mode="reduce-overhead")
    compiled = torch.compile(model, fullgraph=True, dynamic=False)

    def step(*args, **kwargs):
        with compat.frozen_cpu_compile():
            return compiled(*args, **kwargs)

    return step


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


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             use_cache: bool = True, stop_tokens=None, step=None) -> Iterator[torch.Tensor]:
    """Yield the next token ids [B, 1] one step at a time (streaming). ``max_new_tokens`` is bounded by
    infer.config.generation_limit; it and the prompt are checked when generate is called, before any token.

    ``idx`` [B, T] must fit the context. Past the context the model sees a window that restarts:
    once the window would exceed ``block_size`` it restarts at the last ``block_size // 2`` tokens
    (positions from 0 again, learned or rotary alike) and grows from there. The cache is re-primed with
    exactly that window, which amortises the re-priming over ``block_size // 2`` steps; the uncached path runs the same
    window every step, so both compute the same function and ``use_cache`` changes speed only.
    Generation ends once every row has produced one of ``stop_tokens``; a row that has stopped
    repeats its stop token. The model is put in eval mode and given back in the mode it was in.

    ``step``: the static decode path. The cache is then a :class:`StaticKVCache` and every one-token step runs
    ``step`` (the model itself, or :func:`compile_step` of it) on it; prompts and re-primed windows still run
    the model on the cache's plain path. The tokens are the eager path's.
    """
    if step is not None and not use_cache:
        raise ValueError("a static decode step needs the cache (use_cache=True)")
    block = model.config.block_size
    if idx.size(1) > block:
        raise ValueError(f"prompt of {idx.size(1)} tokens exceeds the context of {block}; crop it first")
    check_new_tokens(max_new_tokens, block)
    return _streamed(model, idx, max_new_tokens, temperature, top_k, top_p, seed, use_cache, stop_tokens, step)


@torch.inference_mode()
def _streamed(model: GPT, *args) -> Iterator[torch.Tensor]:
    """_generate in eval mode, the model given back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield from _generate(model, *args)
    finally:
        model.train(was_training)


def _generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float, top_k: int | None,
              top_p: float | None, seed: int | None, use_cache: bool, stop_tokens, step) -> Iterator[torch.Tensor]:
    block = model.config.block_size
    generator = None
    if seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    seq = idx
    done = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)
    stops = torch.tensor(sorted(stop_tokens or []), dtype=torch.long, device=idx.device)
    finished = torch.zeros_like(done, dtype=torch.long)  # the stop token each finished row produced
    # As long as generation needs, never longer than the context (a long context's full cache is large).
    length = min(block, idx.size(1) + max_new_tokens)
    cache = (StaticKVCache if step is not None else KVCache)(model, idx.size(0), max_len=length) if use_cache else None
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
        elif step is not None and pending.size(1) == 1:
            logits = cache.step(step, pending)[:, -1]
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
