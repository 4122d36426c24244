"""The cost model: the FLOPs and bytes of one forward step of any model shape (GPTConfig: either family, GQA,
any layer pattern), the roofline time of that step on a machine, and the speedup it predicts for one layer
pattern over another, with its limit as the context grows (an Amdahl bound). Why: it says where removing
attention can pay before anything is trained or timed, and what a measured speedup should be held against.

Contract:

- ``step_costs(cfg, context=, batch=, dtype=, phase=)``: per component (``COMPONENTS``) its FLOPs, bytes read,
  bytes written and parameters, and their totals, for one step of our code (GPT.forward with a KVCache, as
  infer/bench.py times it). ``phase="decode"``: one new token per row with ``context`` tokens already cached
  (it attends over context + 1 keys). ``phase="prefill"``: a whole ``context``-token prompt from an empty cache
  (causal attention), the KV cache filled, the logits of the last position only (``last_only=True``).
- ``roofline_seconds(costs, hardware)``: max(bytes moved / memory bandwidth, FLOPs / matmul rate), ``hardware``
  holding bench's keys ``memory_bandwidth_bytes_per_s`` and ``matmul_flops_per_s`` (infer/hardware.measure_hardware).
- ``predicted_speedup(base, other, ...)``: roofline(base) / roofline(other) (> 1: ``other`` is faster);
  ``amdahl_bound``: its limit as context -> infinity, the ratio of the costs that grow with the context
  (attention's); ``first_context_reaching``: the smallest context whose predicted speedup reaches a target.
- ``costs_table`` (JSON-ready): all of that over contexts, batches and both phases; present/bench.format_costs
  writes it as text.

What is counted, and the model's assumptions:

- FLOPs are those of matrix products, 2 per multiply-add: every linear layer on the rows it sees (prefill: every
  prompt position, except the output layer: the last one), and attention's scores (QK^T) and weighted sum (PV)
  over the keys each query sees: context + 1 in a decode step, context (context + 1) / 2 query-key pairs in a
  causal prefill (flash-style kernels, PyTorch's CPU one included, skip the masked blocks).
- Elementwise work is neglected: norms, softmax, GELU/SiLU, RoPE, residual and bias adds. It is O(n_embd) per
  token and layer and O(heads) per key, against O(n_embd^2) and O(n_embd) for the products: a few percent.
- Bytes: each weight is read once per step, whole, except tables only gathered from (learned positions, an
  untied token embedding), which cost the rows gathered (at most the table; a tied table is read whole by the
  output layer anyway). The KV cache: a decode step reads the ``context`` cached tokens' keys and values once
  and writes one token's per row; a prefill writes the prompt's and reads them once.
- No cache effects: nothing stays in a CPU's or GPU's caches between steps (small models that fit in them can
  beat the bound), activations are not counted as memory traffic (small at decode; the scores matrix is never
  written by fused kernels), the rotary tables are neglected, and there is no launch or Python overhead (what
  keeps tiny models far from the bound). One matmul rate serves every product's shape.

``torch.utils.flop_counter.FlopCounterMode`` counts the same products (mm, addmm, bmm, SDPA) but counts a
causal SDPA as the full context x context rectangle; it counts no elementwise op, and no bias add.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.infer.config import CONTEXTS, INT8, PRECISIONS
from hybrid_gpt.model.gpt import GPTConfig, parse_layers
from hybrid_gpt.presets import layer_pattern
from hybrid_gpt.runtime import DTYPES

PHASES = ("decode", "prefill")
# Weights of each kind, then what grows with the context.
WEIGHT_COMPONENTS = ("embeddings", "attention_weights", "token_mlp_weights", "ffn_weights", "norms", "lm_head")
COMPONENTS = (*WEIGHT_COMPONENTS, "kv_cache", "attention_scores")
HARDWARE_KEYS = ("memory_bandwidth_bytes_per_s", "matmul_flops_per_s")
TARGETS = (1.25, 1.5)  # the speedups whose first context the table reports
_FAR = 2**60  # a context far enough out that every cost is its leading term to ~1e-12


def dtype_of(dtype) -> torch.dtype | str:
    """A precision named as commands name it (PRECISIONS) or given as a torch.dtype: a torch.dtype, or INT8."""
    if isinstance(dtype, torch.dtype) or dtype == INT8:
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise HybridGPTError(f"unknown dtype {dtype!r}; choose from {', '.join(PRECISIONS)}")


def _widths(dtype: torch.dtype | str) -> tuple[int, torch.dtype]:
    """(bytes per weight of a linear layer, the dtype of everything else) in a precision of dtype_of."""
    if dtype == INT8:
        return 1, torch.float32
    return torch.empty((), dtype=dtype).element_size(), dtype


def _part(flops: int = 0, read: int = 0, written: int = 0, params: int = 0) -> dict:
    return {"flops": flops, "bytes_read": read, "bytes_written": written, "parameters": params}


def _components(cfg: GPTConfig, context: int, batch: int, dtype: torch.dtype | str, phase: str) -> dict[str, dict]:
    """The components of one step, unchecked (any context: the bound and the searches look past block_size)."""
    w, rest = _widths(dtype)
    e = torch.empty((), dtype=rest).element_size()
    scale = 4 if dtype == INT8 else 0  # int8's float32 scale per output row of each linear layer
    d, v, n = cfg.n_embd, cfg.vocab_size, cfg.n_layer
    h, f = cfg.m_hidden, cfg.ffn_width
    gates = 2 if cfg.ffn == "swiglu" else 1  # SwiGLU's c_fc holds the gate and the up projection
    n_a, n_m = cfg.layers.count("A"), cfg.layers.count("M")
    new = 1 if phase == "decode" else context  # positions this step computes, per row
    rows = batch * new
    qkv = (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim
    attn_w, attn_b = n_a * (qkv * d + d * d), n_a * cfg.bias * (qkv + d)
    mlp_w, mlp_b = n_m * (gates * h * d + h * d), n_m * (gates * h + d)  # M mixers always have biases
    ffn_w, ffn_b = n * (gates * f * d + f * d), n * cfg.bias * (gates * f + d)
    norms = (2 * d if cfg.norm == "layernorm" else d) * (n_a + n_m + n + 1)  # ln_1 of A and M, ln_2, ln_f
    # Gathered tables cost the rows they give, at most the whole table; a tied wte is the output layer's.
    wte = 0 if cfg.tie_embeddings else v * d
    wpe = cfg.block_size * d if cfg.positions == "learned" else 0
    gathered = (0 if cfg.tie_embeddings else min(rows, v) * d) + (min(new, cfg.block_size) * d if wpe else 0)
    kv_token = cfg.kv_bytes_per_token(rest)
    pairs = (context + 1) if phase == "decode" else context * (context + 1) // 2  # query-key pairs per row and head
    return {
        "embeddings": _part(read=gathered * e, params=wte + wpe),
        "attention_weights": _part(2 * rows * attn_w, attn_w * w + attn_b * e + n_a * (qkv + d) * scale,
                                   params=attn_w + attn_b),
        "token_mlp_weights": _part(2 * rows * mlp_w, mlp_w * w + mlp_b * e + n_m * (gates * h + d) * scale,
                                   params=mlp_w + mlp_b),
        "ffn_weights": _part(2 * rows * ffn_w, ffn_w * w + ffn_b * e + n * (gates * f + d) * scale,
                             params=ffn_w + ffn_b),
        "norms": _part(read=norms * e, params=norms),
        "lm_head": _part(2 * batch * d * v, v * d * w + v * scale, params=v * d),  # each row's last position only
        # Decode reads the context cached before it; prefill reads back (once) the context it writes.
        "kv_cache": _part(read=kv_token * batch * context, written=kv_token * rows),
        "attention_scores": _part(4 * batch * cfg.n_head * cfg.head_dim * pairs * n_a),
    }


def _totals(cfg: GPTConfig, parts: dict[str, dict], dtype: torch.dtype | str) -> dict:
    read = sum(p["bytes_read"] for p in parts.values())
    written = sum(p["bytes_written"] for p in parts.values())
    params = cfg.num_params()
    e = torch.empty((), dtype=_widths(dtype)[1]).element_size()
    # int8: the linear layers as read, plus the float32 tables (a tied one too: its int8 copy is the output layer's)
    held = (params * e if dtype != INT8 else sum(parts[c]["bytes_read"] for c in WEIGHT_COMPONENTS if c != "embeddings")
            + (cfg.vocab_size * cfg.n_embd + (cfg.block_size * cfg.n_embd if cfg.positions == "learned" else 0)) * e)
    return {"flops": sum(p["flops"] for p in parts.values()), "bytes_read": read, "bytes_written": written,
            "bytes": read + written, "weight_bytes": sum(parts[c]["bytes_read"] for c in WEIGHT_COMPONENTS),
            "kv_bytes_read": parts["kv_cache"]["bytes_read"], "parameters": params,
            "parameter_bytes": held}


def _check_int(name: str, value, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise HybridGPTError(f"{name} must be a whole number of at least {lo}, got {value!r}")


def step_costs(cfg: GPTConfig, *, context: int, batch: int = 1, dtype="float32", phase: str = "decode") -> dict:
    """FLOPs and bytes of one step (see the module docstring): ``components`` (each COMPONENTS entry:
    flops, bytes_read, bytes_written, parameters) and the totals flops, bytes_read, bytes_written, bytes (read
    + written: what the roofline charges), weight_bytes, kv_bytes_read, parameters, parameter_bytes; with
    ``tokens``, the positions the step computes (batch for decode, batch * context for prefill), the per-token
    figures are these over it. ``dtype``: a PRECISIONS name or a torch.dtype (weights and KV cache; int8: the
    linear layers' weights, see INT8)."""
    if not isinstance(cfg, GPTConfig):
        raise HybridGPTError(f"step_costs needs a GPTConfig, got {type(cfg).__name__}")
    cfg.validate()
    if phase not in PHASES:
        raise HybridGPTError(f"unknown phase {phase!r}; choose from {', '.join(PHASES)}")
    _check_int("context", context, 1)
    _check_int("batch", batch, 1)
    if context > cfg.block_size:
        raise HybridGPTError(f"context {context:,} is over the model's context of {cfg.block_size:,} tokens")
    torch_dtype = dtype_of(dtype)
    parts = _components(cfg, context, batch, torch_dtype, phase)
    return {"phase": phase, "context": context, "batch": batch, "dtype": _name(torch_dtype),
            "tokens": batch * (1 if phase == "decode" else context), "components": parts,
            **_totals(cfg, parts, torch_dtype)}


def _name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def default_contexts(block_size: int) -> list[int]:
    """The contexts of a table when none are given: those of CONTEXTS that a model of ``block_size`` holds, and
    its own context (at most the last of CONTEXTS), so that a short-context checkpoint gets a table too."""
    return sorted({c for c in CONTEXTS if c <= block_size} | {min(block_size, CONTEXTS[-1])})


def check_hardware(hardware: dict) -> dict:
    """``hardware`` itself if it holds a positive, finite figure for each of HARDWARE_KEYS (any such: the model
    is arithmetic; a user's figures are held to BANDWIDTH_GBS and FLOPS_GFLOPS, in infer.config, by the
    command's options)."""
    for key in HARDWARE_KEYS:
        value = hardware.get(key) if isinstance(hardware, dict) else None
        if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                or value <= 0):
            raise HybridGPTError(f"hardware: {key} must be a positive number, got {value!r}")
    return hardware


def _seconds(flops: float, nbytes: float, hardware: dict) -> float:
    return max(nbytes / hardware["memory_bandwidth_bytes_per_s"], flops / hardware["matmul_flops_per_s"])


def roofline_seconds(costs: dict, hardware: dict) -> float:
    """A step's time at the machine's limits: the larger of moving its bytes at the memory bandwidth and
    doing its FLOPs at the matmul rate (``costs`` from step_costs, or any dict with flops and bytes)."""
    check_hardware(hardware)
    return _seconds(costs["flops"], costs["bytes"], hardware)


def _ratio(base: GPTConfig, other: GPTConfig, context: int, batch: int, dtype: torch.dtype | str,
           hardware: dict, phase: str) -> float:
    """predicted_speedup unchecked, at any context."""
    def seconds(cfg):
        totals = _totals(cfg, _components(cfg, context, batch, dtype, phase), dtype)
        return _seconds(totals["flops"], totals["bytes"], hardware)
    return seconds(base) / seconds(other)


def predicted_speedup(base_cfg: GPTConfig, other_cfg: GPTConfig, *, context: int, batch: int = 1,
                      dtype="float32", hardware: dict, phase: str = "decode") -> float:
    """roofline_seconds(base) / roofline_seconds(other) at one context and batch: > 1 when ``other`` is faster."""
    check_hardware(hardware)
    kw = dict(context=context, batch=batch, dtype=dtype, phase=phase)
    return roofline_seconds(step_costs(base_cfg, **kw), hardware) / roofline_seconds(step_costs(other_cfg, **kw),
                                                                                     hardware)


def amdahl_bound(base_cfg: GPTConfig, other_cfg: GPTConfig, *, batch: int = 1, dtype="float32", hardware: dict,
                 phase: str = "decode") -> float:
    """The predicted speedup's limit as context -> infinity: the ratio of the costs that grow with the context
    (attention's KV reads and products; in prefill its quadratic products alone, whatever the machine).
    math.inf when only ``base`` has attention, 0.0 when only ``other`` has."""
    predicted_speedup(base_cfg, other_cfg, context=1, batch=batch, dtype=dtype, hardware=hardware,
                      phase=phase)  # checks every argument
    base_a, other_a = "A" in base_cfg.layers, "A" in other_cfg.layers
    if base_a != other_a:
        return math.inf if base_a else 0.0
    return _ratio(base_cfg, other_cfg, _FAR, batch, dtype_of(dtype), hardware, phase)


def first_context_reaching(base_cfg: GPTConfig, other_cfg: GPTConfig, target: float, *, limit: int, batch: int = 1,
                           dtype="float32", hardware: dict, phase: str = "decode") -> int | None:
    """The smallest context in [1, ``limit``] whose predicted speedup is at least ``target``, or None: found by
    doubling, then bisection between the last two contexts tried (exact where the ratio grows with the context,
    as it does when ``base`` has the more attention). ``limit`` may exceed the configs' block_size."""
    predicted_speedup(base_cfg, other_cfg, context=1, batch=batch, dtype=dtype, hardware=hardware,
                      phase=phase)  # checks every argument
    _check_int("limit", limit, 1)
    dt = dtype_of(dtype)

    def reaches(c: int) -> bool:
        return _ratio(base_cfg, other_cfg, c, batch, dt, hardware, phase) >= target

    if reaches(1):
        return 1
    below, c = 1, 2
    while not reaches(min(c, limit)):
        if c >= limit:
            return None
        below, c = c, 2 * c
    above = min(c, limit)
    while above - below > 1:
        mid = (above + below) // 2
        below, above = (below, mid) if reaches(mid) else (mid, above)
    return above


def pattern_configs(base: GPTConfig, patterns: list[str]) -> dict[str, GPTConfig]:
    """{pattern: ``base`` with that layer pattern}; a pattern is letters (parse_layers) or ``standard`` /
    ``hybrid``, which mean the all-attention and half-attention patterns of ``base``'s depth."""
    out = {}
    for text in patterns:
        word = text.strip().lower() if isinstance(text, str) else text
        if word in ("standard", "hybrid"):
            layers = layer_pattern(word, None, base.n_layer)[0]
        else:
            layers = parse_layers(text)
        if layers in out:
            raise HybridGPTError(f"layer pattern {layers} is given twice")
        out[layers] = replace(base, layers=layers).validate()
    if not out:
        raise HybridGPTError("give at least one layer pattern")
    return out


def _dominant(parts: dict[str, dict], hardware: dict) -> tuple[str, float]:
    """The component whose own roofline time is the largest, and its share of all of theirs."""
    times = {name: _seconds(p["flops"], p["bytes_read"] + p["bytes_written"], hardware) for name, p in parts.items()}
    name = max(times, key=times.get)
    return name, times[name] / sum(times.values())


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def costs_table(configs: dict[str, GPTConfig], contexts, batches, dtype, hardware: dict, *,
                phases=PHASES, limit: int | None = None, targets=TARGETS) -> dict:
    """Every config at every context, batch and phase (``rows``: step_costs, its roofline seconds and tokens/s,
    whether memory or compute bounds it, the dominant component), and each config after the first against the
    first (``speedups[<other>/<base>]``: the predicted speedup per row, and per phase and batch the Amdahl bound,
    None when unbounded, and the first context reaching each of ``targets`` up to ``limit``, None if none does;
    ``limit`` defaults to the smallest block_size of the configs). JSON-ready."""
    check_hardware(hardware)
    if not isinstance(configs, dict) or not configs:
        raise HybridGPTError("costs_table needs at least one model config")
    contexts, batches, phases = list(contexts), list(batches), list(phases)
    if not contexts or not batches or not phases:
        raise HybridGPTError("costs_table needs at least one context, batch size and phase")
    limit = limit or min(cfg.block_size for cfg in configs.values())
    out = {"dtype": _name(dtype_of(dtype)), "hardware": hardware, "contexts": contexts,
           "batches": batches, "phases": phases, "search_limit": limit, "targets": list(targets),
           "models": {}, "rows": [], "speedups": {}}
    seconds = {}
    for name, cfg in configs.items():
        out["models"][name] = {"layers": cfg.layers, "family": cfg.family, "parameters": cfg.num_params(),
                               "kv_bytes_per_token": cfg.kv_bytes_per_token(_widths(dtype_of(dtype))[1]),
                               "config": cfg.to_dict()}
        for phase in phases:
            for b in batches:
                for c in contexts:
                    costs = step_costs(cfg, context=c, batch=b, dtype=dtype, phase=phase)
                    t = roofline_seconds(costs, hardware)
                    dominant, share = _dominant(costs["components"], hardware)
                    memory = costs["bytes"] / hardware["memory_bandwidth_bytes_per_s"]
                    seconds[(name, phase, b, c)] = t
                    out["rows"].append({"model": name, **costs, "seconds": t, "tokens_per_s": costs["tokens"] / t,
                                        "bound": "memory" if memory >= t else "compute", "dominant": dominant,
                                        "dominant_share": share})
    names = list(configs)
    base = names[0]
    for other in names[1:]:
        pair = {"rows": [], "limits": []}
        for phase in phases:
            for b in batches:
                pair["rows"] += [{"phase": phase, "batch": b, "context": c,
                                  "speedup": seconds[(base, phase, b, c)] / seconds[(other, phase, b, c)]}
                                 for c in contexts]
                kw = dict(batch=b, dtype=dtype, hardware=hardware, phase=phase)
                pair["limits"].append({
                    "phase": phase, "batch": b,
                    "amdahl_bound": _finite(amdahl_bound(configs[base], configs[other], **kw)),
                    "first_context_reaching": {str(x): first_context_reaching(configs[base], configs[other], x,
                                                                              limit=limit, **kw) for x in targets}})
        out["speedups"][f"{other}/{base}"] = pair
    return out
