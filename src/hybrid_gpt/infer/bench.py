"""The benchmark: prefill latency, decode throughput with and without the KV cache, memory, and two
peer baselines with the standard model's weights (Hugging Face's model of the same family, and
CTranslate2's C++ engine in float32 and int8), measured side by side. This module runs it: it checks the sizes,
makes the entries (infer/entries.py), the peers (infer/peer.py) and their decoders (infer/decoders.py), times
them interleaved at every context and batch (infer/timing.py), measures the machine (infer/hardware.py) and
returns the result as a dict; present/bench.py writes it as text.

Prefill is one forward over the whole context that fills a KV cache and returns the last position's logits
(what generation does before its first token). Decode is N cached greedy steps from that primed cache, rewound
to context - N: prefill excluded by construction, for ours and the transformers peer alike (CTranslate2 cannot
rewind its cache: see peer.CT2Decoder for what is timed there).

Models can come from checkpoints or from a preset's shape with random weights (:func:`bench_shape`): a
step's cost depends on the shape, not on what the weights learned.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from hybrid_gpt import compat
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.infer.config import TRAIN_BENCH_BATCH, BenchConfig
from hybrid_gpt.infer.decoders import OursDecoder, compile_check
from hybrid_gpt.infer.entries import (
    COMPILED_STEP,
    compiled_steps,
    precision,
    precision_quality,
    shape_models,
    shape_note,
    with_dtypes,
)
from hybrid_gpt.infer.hardware import decode_limit, environment, measure_hardware, peak_memory, probe_matrix, read_rate
from hybrid_gpt.infer.peer import CT2Decoder, PeerDecoder, make_peers
from hybrid_gpt.infer.timing import decode_rate, interleave, naive_rate, ratios, summary, time_call
from hybrid_gpt.model.gpt import GPT
from hybrid_gpt.runtime import ensure_fits

logger = logging.getLogger(__name__)

# Keys every result of run_bench holds: what marks a file as one that `bench --out` may replace.
RESULT_KEYS = ("environment", "config", "hardware", "models")
# The figures of an entry's row, and those a peer has (it has no naive decode).
FIGURES = ("prefill_ms", "decode_tok_s", "naive_decode_tok_s")
PEER_FIGURES = ("prefill_ms", "decode_tok_s")


def default_contexts(block_size: int, new_tokens: int) -> list[int]:
    """256 (the original's) where it fits, and powers of two up to the model's maximum context."""
    out, c = [], block_size
    while c > new_tokens and len(out) < 4:
        out.append(c)
        c //= 2
    if 256 < block_size:
        out.append(256)
    return sorted(set(out))


def bench_shape(preset: str, patterns: list[str], cfg: BenchConfig, *, block_size: int | None = None,
                seed: int = 0, device: torch.device | str = "cpu") -> dict:
    """:func:`run_bench` on :func:`shape_models`, with :func:`shape_note`'s keys; the ratios' base is the
    first pattern listed."""
    models = shape_models(preset, patterns, block_size=block_size, contexts=cfg.contexts, seed=seed, device=device)
    note = shape_note(preset, models, seed)
    logger.info(f"bench: {note['weights']}")
    return run_bench(models, cfg) | note


def run_bench(models: dict[str, GPT], cfg: BenchConfig, val: dict[str, tuple] | None = None) -> dict:
    """Benchmark ``models`` (name -> model, all on one device), each in every precision of
    ``cfg.dtypes`` (and its static decode step compiled, with ``cfg.compile``), and return the results as a
    dict. With ``val`` = {model name: (its validation tokens, its bytes per token)}, the bits per byte of each
    model so given in each precision are measured too (the quality cost of bf16): each model on its own data,
    since another tokenizer's ids are other text (checkpoint.checkpoint_data gives a checkpoint's)."""
    unknown = sorted(set(val or {}) - set(models))
    if unknown:  # before any timing: a typo would otherwise fail after minutes of it
        raise HybridGPTError(f"validation data given for {', '.join(unknown)}, which bench does not measure")
    if not cfg.compile:
        return _run_bench(models, cfg, val)
    # Room for every compiled step's graphs (one per entry, batch and context: shapes are static), and an
    # error (never eager code under a "+compile" label) should dynamo run out of it anyway.
    block = min((m.config.block_size for m in models.values()), default=1)
    sizes = len(cfg.contexts or default_contexts(block, cfg.new_tokens)) * len(cfg.batch_sizes)
    with compat.recompile_budget(sizes * len(models) * len(cfg.dtypes) + 1):
        return _run_bench(models, cfg, val)


@dataclass
class _Plan:
    """What every size of one benchmark shares: its settings, the entries ("<name>+compile" ones mapped to their
    eager model), the peers, the compiled steps, the contexts, and where the prompts come from."""

    cfg: BenchConfig
    models: dict[str, GPT]
    peers: dict[str, dict]
    steps: dict[str, Callable]
    contexts: list[int]
    device: torch.device
    vocab: int
    gen: torch.Generator


@dataclass
class _Measured:
    """What the sizes measure, in the order they run: the timed repeats' values of every (name, context, batch,
    figure), each compiled entry's agreement per size, the orders the entries ran in, and the memory bandwidth
    sampled between repeats (on ``probe``, by ``shuffler``'s order of the entries)."""

    probe: torch.Tensor
    shuffler: random.Random
    samples: dict = field(default_factory=dict)
    agreement: dict = field(default_factory=dict)
    orders: list = field(default_factory=list)
    read_rates: list = field(default_factory=list)


def _contexts(cfg: BenchConfig, block: int) -> list[int]:
    """The contexts to measure, checked against the models' maximum context ``block`` and cfg.new_tokens."""
    if cfg.new_tokens < 2:
        raise HybridGPTError("new_tokens must be at least 2")
    contexts = cfg.contexts or default_contexts(block, cfg.new_tokens)
    if not contexts:
        raise HybridGPTError(f"new_tokens {cfg.new_tokens} leaves no context to measure: "
                             f"the models' context is {block}")
    for c in contexts:
        if c > block:
            raise HybridGPTError(f"context {c} exceeds the models' maximum of {block}; give contexts up to {block}")
        if c <= cfg.new_tokens:
            raise HybridGPTError(f"context {c} must exceed new_tokens {cfg.new_tokens}")
    return contexts


def _plan(models: dict[str, GPT], cfg: BenchConfig) -> _Plan:
    """The entries of ``models`` in every precision (and compiled, with cfg.compile), their peers, the sizes."""
    models = with_dtypes(models, cfg.dtypes)
    device = next(next(iter(models.values())).parameters()).device
    block = min(m.config.block_size for m in models.values())
    contexts = _contexts(cfg, block)
    vocab = min(m.config.vocab_size for m in models.values())
    gen = torch.Generator().manual_seed(cfg.seed)
    peers = make_peers(models, vocab, block, gen, device, cfg.peers) if cfg.peer else {}
    steps = {}  # "<name>+compile" -> its compiled step
    if cfg.compile:
        if cfg.warmup < 1:
            raise HybridGPTError("compile needs warmup 1 or more: the first runs of each shape compile")
        steps = compiled_steps(models)
        models = models | {name: models[name.removesuffix("+compile")] for name in steps}
    return _Plan(cfg, models, peers, steps, contexts, device, vocab, gen)


@torch.inference_mode()
def _run_bench(models: dict[str, GPT], cfg: BenchConfig, val: dict[str, tuple] | None) -> dict:
    if not models:
        raise HybridGPTError("bench needs at least one model")
    plan = _plan(models, cfg)
    measured = _Measured(probe=probe_matrix(plan.device), shuffler=random.Random(cfg.seed))
    for c in plan.contexts:
        for b in cfg.batch_sizes:
            _measure_size(plan, measured, c, b)
    hw = measure_hardware(plan.device, read_rates=measured.read_rates, probe=measured.probe)
    logger.info(f"hardware: memory bandwidth {hw['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, "
                f"matmul {hw['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s")
    return _results(plan, measured, hw, models, val)


def _measure_size(plan: _Plan, measured: _Measured, c: int, b: int) -> None:
    """Every entry and peer at context ``c`` and batch ``b``: a prompt, their decoders (each compiled step
    checked against its eager one), then the interleaved repeats, into ``measured``."""
    started = time.perf_counter()
    prompt = torch.randint(0, plan.vocab, (b, c), generator=plan.gen).to(plan.device)
    _check_caches_fit(plan, c, b)
    decoders = {name: OursDecoder(model.eval(), b, c, plan.steps.get(name)) for name, model in plan.models.items()}
    decoders |= {name: PeerDecoder(peer["model"]) if peer["kind"] == "transformers"
                 else CT2Decoder(peer["model"], prompt, plan.cfg.new_tokens) for name, peer in plan.peers.items()}
    primed = _check_compiled(plan, measured, decoders, prompt)
    runners = _runners(plan, decoders, primed, prompt)

    def sample_bandwidth():  # the memory bandwidth, sampled among the models it is the limit of
        measured.read_rates.append(read_rate(measured.probe, plan.device))

    samples, timed = interleave(runners, plan.cfg.warmup, plan.cfg.repeats, measured.shuffler, sample_bandwidth)
    measured.samples |= {(name, c, b, fig): values for (name, fig), values in samples.items()}
    measured.orders.append({"context": c, "batch": b, "orders": timed})
    logger.info(f"context {c}, batch {b}: done in {time.perf_counter() - started:.0f} s")


def _check_caches_fit(plan: _Plan, c: int, b: int) -> None:
    """A one-line error unless every entry's cache (and each peer's, as large as its model's) fits beside one
    prefill's largest activations (residual, q/k/v, MLP hidden: about 9 x n_embd values a token): all of them
    live through the repeats."""
    caches = [plan.models[p["of"]] for p in plan.peers.values()] + list(plan.models.values())
    activations = max(9 * m.config.n_embd * next(m.parameters()).element_size() for m in caches)
    ensure_fits((sum(m.config.kv_bytes_per_token(next(m.parameters()).dtype) for m in caches)
                 + activations) * c * b,
                f"the KV caches of {len(caches)} models at context {c:,}, batch {b} (and one prefill's "
                "activations)", plan.device,
                hint="measure fewer or smaller --contexts and --batch-sizes")


def _check_compiled(plan: _Plan, measured: _Measured, decoders: dict, prompt: torch.Tensor) -> set[str]:
    """Each compiled step's greedy tokens against its eager entry's at this size (into measured.agreement);
    returns the decoders this leaves primed with ``prompt``."""
    b, c = prompt.shape
    n, primed = plan.cfg.new_tokens, set()
    for name in plan.steps:
        primed |= {name, name.removesuffix("+compile")}
        same = compile_check(decoders[name.removesuffix("+compile")], decoders[name], name, prompt, n)
        measured.agreement.setdefault(name, []).append({"context": c, "batch": b, "same_greedy_tokens": same})
        logger.info(f"compile: {name} at context {c}, batch {b}: the eager path's greedy token at "
                    f"{100 * same:.0f}% of {n} steps")
    return primed


def _runners(plan: _Plan, decoders: dict, primed: set[str], prompt: torch.Tensor) -> dict[str, dict]:
    """name -> {figure: the call that times it once} for every decoder at this size (timing.interleave's)."""
    cfg, device, n = plan.cfg, plan.device, plan.cfg.new_tokens
    naive = cfg.naive and prompt.size(1) <= cfg.naive_max_context
    runners = {}
    for name, dec in decoders.items():
        # The prefill primes the cache the decode steps then read: timed in every repeat, or run once
        # (a compiled entry's prefill is its eager model's, timed there).
        if cfg.prefill and name not in plan.steps:
            runners[name] = {"prefill_ms": lambda d=dec: 1000 * time_call(lambda: d.prefill(prompt), device)}
        else:
            if name not in primed:  # a long context's prefill costs minutes: once is enough
                dec.prefill(prompt)
            runners[name] = {}
        runners[name]["decode_tok_s"] = lambda d=dec: decode_rate(d, prompt, n, device)
        if naive and name in plan.models and name not in plan.steps:
            runners[name]["naive_decode_tok_s"] = lambda m=plan.models[name]: naive_rate(m, prompt, n, device)
    return runners


def _summaries(measured: _Measured, name: str, c: int, b: int, figures) -> dict:
    """The summary of each of ``figures`` that entry or peer ``name`` has at context ``c`` and batch ``b``."""
    return {fig: summary(measured.samples[(name, c, b, fig)]) for fig in figures
            if (name, c, b, fig) in measured.samples}


def _entry_result(plan: _Plan, measured: _Measured, name: str, originals: dict[str, GPT], hw: dict) -> dict:
    """One entry's result: what it is, and a row per context and batch (its figures, its KV cache, its hardware
    limit and the fraction of it reached)."""
    model = plan.models[name]
    mc = model.config
    dtype = next(model.parameters()).dtype
    rows = []
    for c in plan.contexts:
        for b in plan.cfg.batch_sizes:
            row = {"context": c, "batch": b, "kv_cache_bytes": mc.kv_bytes_per_token(dtype) * c * b}
            row |= _summaries(measured, name, c, b, FIGURES)
            row["decode_limit_tok_s"] = limit = decode_limit(model, c, b, hw)
            row["decode_fraction_of_limit"] = row["decode_tok_s"]["median"] / limit
            rows.append(row)
    # an int8 copy's packed weights are no parameters: count the float model's
    base = name.removesuffix("+compile")
    params = originals[base if base in originals else base.rsplit("@", 1)[0]].num_params()
    return {"layers": mc.layers, "dtype": precision(model), "compiled": name in plan.steps,
            "parameters": params, "kv_bytes_per_token": mc.kv_bytes_per_token(dtype),
            "config": asdict(mc), "rows": rows}


def _peer_result(plan: _Plan, measured: _Measured, name: str, peer: dict) -> dict:
    """One peer's result: what it is, how closely it follows our logits, and a row per context and batch."""
    rows = [{"context": c, "batch": b, **_summaries(measured, name, c, b, PEER_FIGURES)}
            for c in plan.contexts for b in plan.cfg.batch_sizes]
    out = {"kind": peer["kind"], "implementation": peer["implementation"], "weights_of": peer["of"],
           "dtype": peer["dtype"], "max_abs_logit_diff": peer["max_abs_logit_diff"], "rows": rows}
    if "top1_agreement" in peer:
        out["top1_agreement"] = peer["top1_agreement"]
    return out


def _results(plan: _Plan, measured: _Measured, hw: dict, originals: dict[str, GPT],
             val: dict[str, tuple] | None) -> dict:
    """run_bench's result from what the sizes measured and the machine's limits ``hw``."""
    cfg = plan.cfg
    results = {"environment": environment(plan.device, cfg.dtypes), "config": asdict(cfg) | {"contexts": plan.contexts},
               "hardware": hw, "models": {}, "ratios": {},
               # The i-th timed repeat of every figure of a (context, batch) ran the models in orders[i].
               "order": {"seed": cfg.seed, "rounds": measured.orders}}
    results["models"] = {name: _entry_result(plan, measured, name, originals, hw) for name in plan.models}
    if plan.peers:
        results["peers"] = {name: _peer_result(plan, measured, name, peer) for name, peer in plan.peers.items()}
        # "peer" is the float32 peer (or the only one): what the report and the ratios compare against.
        results["peer"] = results["peers"].get("peer") or next(iter(results["peers"].values()))
    if plan.steps:
        results["compiled"] = {name: {"step": COMPILED_STEP[plan.device.type == "cpu"], "checks": rows,
                                      "same_greedy_tokens": min(r["same_greedy_tokens"] for r in rows)}
                               for name, rows in measured.agreement.items()}
    if val:
        results["quality"] = precision_quality(originals, plan.models, cfg, val)
    results["ratios"] = ratios(results)
    results |= peak_memory(plan.device)
    return results


def run_train_bench(models: dict[str, GPT], batch_size: int = TRAIN_BENCH_BATCH, repeats: int = 5, warmup: int = 1,
                    peer: bool = True, seed: int = 0) -> dict:
    """Training throughput: tokens/s of one full optimizer step (forward, backward, AdamW) on a
    ``batch_size x block_size`` batch, for each model and for the transformers peer of the standard
    one, interleaved. Runs on copies, so the models passed in are left as they were."""
    import copy

    first = next(iter(models.values()))
    device = next(first.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    steppers: dict[str, Callable[[], None]] = {}
    tokens: dict[str, int] = {}

    def make_step(module, loss_fn):
        opt = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=device.type == "cuda")
        module.train()

        def step():
            loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    for name, model in models.items():
        m = copy.deepcopy(model)
        T = m.config.block_size
        x = torch.randint(0, m.config.vocab_size, (batch_size, T + 1), generator=gen).to(device)
        steppers[name] = make_step(m, lambda m=m, x=x: m(x[:, :-1], x[:, 1:])[1])
        tokens[name] = batch_size * T
    standard = [n for n, m in models.items() if set(m.config.layers) == {"A"}]
    if peer and standard:
        try:
            from hybrid_gpt.infer.peer import to_hf

            hf = to_hf(copy.deepcopy(models[standard[0]]))
            T = models[standard[0]].config.block_size
            x = torch.randint(0, hf.config.vocab_size, (batch_size, T), generator=gen).to(device)
            steppers["peer"] = make_step(hf, lambda: hf(x, labels=x).loss)  # HF shifts labels itself
            tokens["peer"] = batch_size * T
        except HybridGPTError as e:
            logger.info(f"peer: skipped ({e})")
    samples: dict[str, list[float]] = {name: [] for name in steppers}
    for rep in range(warmup + repeats):
        for name, step in steppers.items():  # interleaved
            seconds = time_call(step, device)
            if rep >= warmup:
                samples[name].append(tokens[name] / seconds)
    out = {"batch_size": batch_size, "tokens_per_sec": {n: summary(v) for n, v in samples.items()}}
    if "peer" in samples and standard:
        out["standard_vs_peer"] = (out["tokens_per_sec"][standard[0]]["median"]
                                   / out["tokens_per_sec"]["peer"]["median"])
    return out
