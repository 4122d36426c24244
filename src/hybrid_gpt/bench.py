"""The benchmark: prefill latency, decode throughput with and without the KV cache, memory, and a
peer baseline (Hugging Face GPT-2 with the standard model's weights), measured side by side.

Every figure is a median over repeats with its min and max; the models are measured interleaved
(model A, model B, model A, ...) after a warm-up, so that a noisy shared machine affects them alike.
Decode time excludes prefill: it is t(N new tokens) - t(1 new token), for ours and the peer alike.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .engine import generate
from .errors import HybridGPTError
from .model import GPT


@dataclass
class BenchConfig:
    contexts: list[int] | None = None  # final context lengths (prompt + new tokens); default from the model
    new_tokens: int = 24
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    repeats: int = 5
    warmup: int = 1
    naive: bool = True  # also decode without a cache (re-run the growing sequence for every token)
    peer: bool = True
    seed: int = 0


def default_contexts(block_size: int, new_tokens: int) -> list[int]:
    """256 (the original's) where it fits, and powers of two up to the model's maximum context."""
    out, c = [], block_size
    while c > new_tokens and len(out) < 4:
        out.append(c)
        c //= 2
    if 256 < block_size:
        out.append(256)
    return sorted(set(out))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def environment(device: torch.device) -> dict:
    env = {"device": str(device), "dtype": "float32", "torch": torch.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "machine": platform.machine(), "processor": platform.processor(),
           "platform": platform.platform(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


def _median_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    return statistics.median([_time(fn, device) for _ in range(repeats + 1)][1:])  # the first run warms up


@torch.inference_mode()
def measure_hardware(device: torch.device, repeats: int = 5) -> dict:
    """The machine's own limits, measured here: memory bandwidth from a large matrix-vector product
    (it reads the whole matrix once) and matmul throughput from a large square product."""
    n = 8192 if device.type == "cpu" else 16384  # 256 MiB / 1 GiB of float32
    a, v = torch.randn(n, n, device=device), torch.randn(n, device=device)
    bandwidth = n * n * 4 / _median_time(lambda: a @ v, device, repeats)
    m = 1024 if device.type == "cpu" else 8192
    x, y = torch.randn(m, m, device=device), torch.randn(m, m, device=device)
    flops = 2 * m**3 / _median_time(lambda: x @ y, device, repeats)
    return {"memory_bandwidth_bytes_per_s": bandwidth, "matmul_flops_per_s": flops,
            "method": f"median of {repeats}: {n}x{n} float32 matrix-vector product; {m}x{m} matmul"}


def decode_limit(model: GPT, context: int, batch: int, hw: dict) -> float:
    """Tokens/s at the hardware limit for one cached decode step at ``context``: the larger of the time
    to read the weights and the KV cache from memory and the time of its arithmetic."""
    cfg = model.config
    weight_bytes = 4 * model.num_params()
    kv_bytes = cfg.kv_bytes_per_token() * context * batch
    # 2 FLOPs per weight per token, plus attention's scores and weighted sum over the context.
    flops = batch * (2 * model.num_params() + 4 * context * cfg.n_embd * cfg.layers.count("A"))
    seconds = max((weight_bytes + kv_bytes) / hw["memory_bandwidth_bytes_per_s"], flops / hw["matmul_flops_per_s"])
    return batch / seconds


def _ours_generate(model: GPT, prompt: torch.Tensor, n: int, use_cache: bool) -> None:
    for _ in generate(model, prompt, n, temperature=0, use_cache=use_cache):
        pass


def _peer_generate(hf, prompt: torch.Tensor, n: int) -> None:
    hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                pad_token_id=0, attention_mask=torch.ones_like(prompt))


def _decode_rate(gen: Callable[[int], None], batch: int, n: int, device) -> float:
    """New tokens per second, prefill excluded: (n - 1) * batch / (t(n) - t(1))."""
    t_n = _time(lambda: gen(n), device)
    t_1 = _time(lambda: gen(1), device)
    return (n - 1) * batch / max(t_n - t_1, 1e-9)


@torch.inference_mode()
def run_bench(models: dict[str, GPT], cfg: BenchConfig, log=print) -> dict:
    """Benchmark ``models`` (name -> model, all on one device) and return the results as a dict."""
    if not models:
        raise HybridGPTError("bench needs at least one checkpoint")
    first = next(iter(models.values()))
    device = next(first.parameters()).device
    block = min(m.config.block_size for m in models.values())
    if cfg.new_tokens < 2:
        raise HybridGPTError("--new-tokens must be at least 2 (decode time is t(N) - t(1))")
    contexts = cfg.contexts or default_contexts(block, cfg.new_tokens)
    for c in contexts:
        if c > block:
            raise HybridGPTError(f"context {c} exceeds the models' maximum of {block}; pass --contexts up to {block}")
        if c <= cfg.new_tokens:
            raise HybridGPTError(f"context {c} must exceed --new-tokens {cfg.new_tokens}")
    vocab = min(m.config.vocab_size for m in models.values())
    gen = torch.Generator().manual_seed(cfg.seed)
    peer = None
    if cfg.peer:
        standard = [n for n, m in models.items() if set(m.config.layers) == {"A"}]
        try:
            import transformers  # noqa: F401
        except ImportError:
            standard = None
            log("peer: skipped (transformers is not installed: `uv sync --extra peer`)")
        if standard:
            from .peer import max_logit_difference, to_hf_gpt2

            hf = to_hf_gpt2(models[standard[0]])
            probe = torch.randint(0, vocab, (2, min(block, 64)), generator=gen).to(device)
            peer = {"of": standard[0], "model": hf, "max_abs_logit_diff": max_logit_difference(models[standard[0]],
                                                                                               hf, probe)}
            log(f"peer: transformers GPT2LMHeadModel with {standard[0]}'s weights, "
                f"max |logit difference| {peer['max_abs_logit_diff']:.2e}")
        elif standard is not None:
            log("peer: skipped (no standard, all-attention model among the checkpoints)")

    samples: dict = {}

    def record(key: tuple, value: float) -> None:
        samples.setdefault(key, []).append(value)

    for c in contexts:
        for b in cfg.batch_sizes:
            prompt_full = torch.randint(0, vocab, (b, c), generator=gen).to(device)
            prompt = prompt_full[:, : c - cfg.new_tokens]
            n = cfg.new_tokens
            runners = {}
            for name, model in models.items():
                model.eval()
                runners[name] = {
                    "prefill_ms": lambda m=model: 1000 * _time(lambda: m(prompt_full), device),
                    "decode_tok_s": lambda m=model: _decode_rate(lambda k: _ours_generate(m, prompt, k, True),
                                                                 b, n, device),
                }
                if cfg.naive:
                    runners[name]["naive_decode_tok_s"] = lambda m=model: _decode_rate(
                        lambda k: _ours_generate(m, prompt, k, False), b, n, device)
            if peer is not None:
                hf = peer["model"]
                runners["peer"] = {
                    "prefill_ms": lambda: 1000 * _time(lambda: hf(prompt_full), device),
                    "decode_tok_s": lambda: _decode_rate(lambda k: _peer_generate(hf, prompt, k), b, n, device),
                }
            for rep in range(cfg.warmup + cfg.repeats):
                for name, figures in runners.items():  # interleaved: every model once per repeat
                    for fig, fn in figures.items():
                        value = fn()
                        if rep >= cfg.warmup:
                            record((name, c, b, fig), value)
            log(f"context {c}, batch {b}: done")

    hw = measure_hardware(device)
    log(f"hardware: memory bandwidth {hw['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, "
        f"matmul {hw['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s")
    results = {"environment": environment(device), "config": asdict(cfg) | {"contexts": contexts},
               "hardware": hw, "models": {}, "ratios": {}}
    for name, model in models.items():
        mc = model.config
        rows = []
        for c in contexts:
            for b in cfg.batch_sizes:
                row = {"context": c, "batch": b, "kv_cache_bytes": mc.kv_bytes_per_token() * c * b}
                for fig in ("prefill_ms", "decode_tok_s", "naive_decode_tok_s"):
                    if (name, c, b, fig) in samples:
                        row[fig] = summary(samples[(name, c, b, fig)])
                row["decode_limit_tok_s"] = decode_limit(model, c, b, hw)
                row["decode_fraction_of_limit"] = row["decode_tok_s"]["median"] / row["decode_limit_tok_s"]
                rows.append(row)
        results["models"][name] = {"layers": mc.layers, "parameters": model.num_params(),
                                   "kv_bytes_per_token": mc.kv_bytes_per_token(), "rows": rows}
    if peer is not None:
        rows = []
        for c in contexts:
            for b in cfg.batch_sizes:
                rows.append({"context": c, "batch": b, **{fig: summary(samples[("peer", c, b, fig)])
                                                          for fig in ("prefill_ms", "decode_tok_s")}})
        results["peer"] = {"implementation": "transformers GPT2LMHeadModel", "weights_of": peer["of"],
                           "max_abs_logit_diff": peer["max_abs_logit_diff"], "rows": rows}
    results["ratios"] = _ratios(results)
    if device.type == "cuda":
        results["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        results["peak_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        results["peak_memory_note"] = "peak resident memory of the whole benchmark process (all models together)"
    return results


def _ratios(results: dict) -> dict:
    """hybrid vs standard (speedups > 1 mean the hybrid is faster) and ours vs the peer, per row."""
    models = results["models"]
    out = {}
    names = list(models)
    base = "standard" if "standard" in models else names[0]
    for other in names:
        if other == base:
            continue
        rows = []
        for rb, ro in zip(models[base]["rows"], models[other]["rows"]):
            r = {"context": rb["context"], "batch": rb["batch"]}
            if "prefill_ms" in rb:
                r["prefill_speedup"] = rb["prefill_ms"]["median"] / ro["prefill_ms"]["median"]
            for fig in ("decode_tok_s", "naive_decode_tok_s"):
                if fig in rb and fig in ro:
                    r[fig.replace("tok_s", "speedup")] = ro[fig]["median"] / rb[fig]["median"]
            r["kv_cache_ratio"] = (ro["kv_cache_bytes"] / rb["kv_cache_bytes"]) if rb["kv_cache_bytes"] else None
            rows.append(r)
        out[f"{other}/{base}"] = rows
    if "peer" in results:
        ours = models[results["peer"]["weights_of"]]["rows"]
        out[f"{results['peer']['weights_of']}/peer"] = [
            {"context": o["context"], "batch": o["batch"],
             "decode_speedup": o["decode_tok_s"]["median"] / p["decode_tok_s"]["median"],
             "prefill_speedup": p["prefill_ms"]["median"] / o["prefill_ms"]["median"]}
            for o, p in zip(ours, results["peer"]["rows"])]
    return out


def format_table(results: dict) -> str:
    """A plain-text table of medians [min-max] for the terminal and the report."""
    lines = []
    env = results["environment"]
    lines.append(f"device {env['device']}, {env['dtype']}, {env['threads']} threads, torch {env['torch']}"
                 + (f", transformers {env['transformers']}" if "transformers" in env else ""))
    cfg = results["config"]
    lines.append(f"{cfg['repeats']} repeats after {cfg['warmup']} warm-up, {cfg['new_tokens']} new tokens; "
                 "medians [min-max]")

    def fmt(s, digits=1):
        return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"

    header = ["model", "context", "batch", "prefill ms", "cached tok/s", "of limit", "naive tok/s", "KV cache MB"]
    table = [header]
    entries = [(n, m["rows"]) for n, m in results["models"].items()]
    if "peer" in results:
        entries.append((f"peer ({results['peer']['weights_of']})", results["peer"]["rows"]))
    for name, rows in entries:
        for r in rows:
            table.append([name, str(r["context"]), str(r["batch"]), fmt(r["prefill_ms"], 2), fmt(r["decode_tok_s"]),
                          f"{100 * r['decode_fraction_of_limit']:.0f}%" if "decode_fraction_of_limit" in r else "-",
                          fmt(r["naive_decode_tok_s"]) if "naive_decode_tok_s" in r else "-",
                          f"{r['kv_cache_bytes'] / 2**20:.2f}" if "kv_cache_bytes" in r else "-"])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    for key, rows in results["ratios"].items():
        lines.append("")
        lines.append(f"speedup {key} (>1: the first is faster)")
        for r in rows:
            parts = [f"{k.replace('_speedup', '')} {v:.2f}x" for k, v in r.items() if k.endswith("speedup")]
            lines.append(f"  context {r['context']}, batch {r['batch']}: " + ", ".join(parts))
    if "peer" in results:
        lines.append(f"peer logits match: max |difference| {results['peer']['max_abs_logit_diff']:.2e}")
    if "hardware" in results:
        hw = results["hardware"]
        lines.append(f"hardware limit ('of limit' column): {hw['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s memory "
                     f"bandwidth, {hw['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s matmul ({hw['method']}); a step's limit "
                     "is the larger of reading weights + KV cache and its arithmetic. Small models that fit in the "
                     "CPU's caches can exceed a DRAM-bandwidth limit.")
    return "\n".join(lines)


def run_train_bench(models: dict[str, GPT], batch_size: int = 16, repeats: int = 5, warmup: int = 1,
                    peer: bool = True, seed: int = 0, log=print) -> dict:
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
            from .peer import to_hf_gpt2

            hf = to_hf_gpt2(copy.deepcopy(models[standard[0]]))
            T = hf.config.n_positions
            x = torch.randint(0, hf.config.vocab_size, (batch_size, T), generator=gen).to(device)
            steppers["peer"] = make_step(hf, lambda: hf(x, labels=x).loss)  # HF shifts labels itself
            tokens["peer"] = batch_size * T
        except HybridGPTError as e:
            log(f"peer: skipped ({e})")
    samples: dict[str, list[float]] = {name: [] for name in steppers}
    for rep in range(warmup + repeats):
        for name, step in steppers.items():  # interleaved
            seconds = _time(step, device)
            if rep >= warmup:
                samples[name].append(tokens[name] / seconds)
    out = {"batch_size": batch_size, "tokens_per_sec": {n: summary(v) for n, v in samples.items()}}
    if "peer" in samples and standard:
        out["standard_vs_peer"] = (out["tokens_per_sec"][standard[0]]["median"]
                                   / out["tokens_per_sec"]["peer"]["median"])
    return out


def format_train_table(train: dict) -> str:
    lines = [f"training throughput: one optimizer step (forward, backward, AdamW), batch {train['batch_size']} "
             "x the model's context; tokens/s, medians [min-max]"]
    for name, s in train["tokens_per_sec"].items():
        lines.append(f"  {name:<16} {s['median']:,.0f} [{s['min']:,.0f}-{s['max']:,.0f}]")
    if "standard_vs_peer" in train:
        lines.append(f"  standard / peer: {train['standard_vs_peer']:.2f}x")
    return "\n".join(lines)
