"""The benchmark: prefill latency, decode throughput with and without the KV cache, memory, and two
peer baselines with the standard model's weights (Hugging Face's model of the same family, and
CTranslate2's C++ engine in float32 and int8), measured side by side.

Every figure is a median over repeats with its min and max; the models are measured interleaved, every
model once per repeat in an order shuffled anew each repeat (seeded, and recorded), after a warm-up, so that
a noisy shared machine affects them alike and no model always runs first. A speedup is the paired ratio of
two models' figures (stats.ratio_ci: the geometric mean of the per-repeat ratios, with a 95% t-interval),
which cancels the machine's drift between repeats. Prefill is one forward over the whole context that
fills a KV cache and returns the last position's logits (what generation does before its first token).
Decode is N cached greedy steps from that primed cache, rewound to context - N: prefill excluded by
construction, for ours and the transformers peer alike (CTranslate2 cannot rewind its cache: see
_CT2Decoder for what is timed there).

Models can come from checkpoints or from a preset's shape with random weights (:func:`bench_shape`): a
step's cost depends on the shape, not on what the weights learned.
"""

from __future__ import annotations

import os
import platform
import random
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from hybrid_gpt.errors import HybridGPTError, RunFailure
from hybrid_gpt.infer.config import BENCH_DTYPES, PEERS, TRAIN_BENCH_BATCH, BenchConfig
from hybrid_gpt.infer.costs import roofline_seconds, step_costs
from hybrid_gpt.infer.engine import KVCache, StaticKVCache, compile_step
from hybrid_gpt.model import kernels
from hybrid_gpt.model.gpt import GPT, GPTConfig, parse_layers
from hybrid_gpt.present.bench import random_weights
from hybrid_gpt.presets import get_preset
from hybrid_gpt.runtime import DTYPES, ensure_fits
from hybrid_gpt.stats import ratio_ci

# What a "+compile" entry's decode step is, on a GPU (False) and on the CPU (True).
COMPILED_STEP = {False: "static decode step, torch.compile with CUDA graphs (reduce-overhead)",
                 True: "static decode step, torch.compile: inductor, frozen weights, C++ wrapper"}

# Keys every result of run_bench holds: what marks a file as one that `bench --out` may replace.
RESULT_KEYS = ("environment", "config", "hardware", "models")

def entry_name(name: str, dtype: str) -> str:
    return name if dtype == "float32" else f"{name}@{dtype}"


def precision(model: GPT) -> str:
    """The precision an entry runs in: "int8" for a :func:`quantize_int8` copy, else its parameters' dtype."""
    return getattr(model, "bench_precision", None) or str(next(model.parameters()).dtype).removeprefix("torch.")


def quantize_int8(model: GPT) -> GPT:
    """A copy of ``model`` (float32, on the CPU) whose linear layers (attention, MLPs, the LM head) are
    kernels.Int8Linear: int8 weights, one scale per output row; each product quantizes its input to int8 on the
    fly and runs fbgemm's int8 kernel (torch.ao's dynamic quantization); embeddings, norms and the KV cache stay
    float32. Why dynamic quantization rather than weight-only int8: it is what CTranslate2's int8 does on the
    CPU (int8 products with activations quantized per call), so the two int8 rows compare like with like, and
    it needs no kernel outside PyTorch's own. Its static decode step compiles (compile_step), as float32's."""
    import copy

    from hybrid_gpt.model.kernels import Int8Linear, Linear

    if precision(model) != "float32" or next(model.parameters()).device.type != "cpu":
        raise HybridGPTError("int8 needs a float32 model on the CPU (PyTorch's int8 products are CPU kernels)")
    out = copy.deepcopy(model)
    for parent in list(out.modules()):
        for child, module in list(parent.named_children()):
            if type(module) is Linear:
                setattr(parent, child, Int8Linear(module))
    out.bench_precision = "int8"
    return out.eval()


def with_dtypes(models: dict[str, GPT], dtypes: list[str]) -> dict[str, GPT]:
    """Every model in every requested precision of BENCH_DTYPES (copies; the models passed in are left as
    they are)."""
    import copy

    bad = [d for d in dtypes if d not in BENCH_DTYPES]
    if bad or not dtypes:
        raise HybridGPTError(f"unknown dtypes {','.join(bad) or '(none)'}; choose from {', '.join(BENCH_DTYPES)}")
    out = {}
    # Copies made inside inference mode would hold inference tensors, which have no version counter;
    # kernels.Linear then cannot keep a packed weight for them and falls back to F.linear.
    with torch.inference_mode(False):
        for dtype in dtypes:
            for name, model in models.items():
                if dtype == "int8":
                    out[entry_name(name, dtype)] = quantize_int8(_as_float32(model))
                    continue
                same = next(model.parameters()).dtype == DTYPES[dtype]
                out[entry_name(name, dtype)] = model if same else copy.deepcopy(model).to(DTYPES[dtype])
    return out


def compiled_steps(models: dict[str, GPT]) -> dict[str, Callable]:
    """{"<name>+compile": engine.compile_step(model)} for every entry, int8's too (its products are a custom
    operator the compiler calls). Each compiles at its first step of each batch and context;
    :func:`_run_bench` checks its greedy tokens against the eager ones there, before anything is timed."""
    return {f"{name}+compile": compile_step(model) for name, model in models.items()}


def _compile_check(eager: "_OursDecoder", compiled: "_OursDecoder", name: str, prompt: torch.Tensor,
                   n: int) -> float:
    """The fraction of ``n`` greedy steps at which the compiled decoder picks the eager one's token (the same
    prompt, rewound to the same positions); its first call compiles, so a compiler failing is said here in
    one line."""
    for dec in (eager, compiled):
        dec.prefill(prompt)
    want = eager.decode(prompt, n)
    try:
        got = compiled.decode(prompt, n)
    except Exception as e:  # a compiler missing or failing: say so in one line
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise RunFailure(f"--compile: torch.compile failed for {name.removesuffix('+compile')} "
                         f"({type(e).__name__}: {first}); run bench without --compile") from e
    return (want == got).float().mean().item()


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


def summary(values: list[float | None]) -> dict:
    """Median, min, max and n of the timed repeats' ``values``, and the values themselves in repeat order
    ("values"; None for a repeat with no valid figure), which pair with the other models' of the same rows."""
    valid = [v for v in values if v is not None]
    if not valid:
        raise RunFailure("every timing of a figure was swamped by other work on this machine; run bench again "
                         "when it is quieter, or with more --repeats")
    return {"median": statistics.median(valid), "min": min(valid), "max": max(valid), "n": len(valid),
            "values": list(values)}


def speedup(base: dict, other: dict, fig: str) -> dict | None:
    """How many times as fast ``other`` is as ``base`` in figure ``fig`` of two rows measured side by side (a time
    in ms: base / other; a rate in tokens/s: other / base): stats.ratio_ci of their paired per-repeat values,
    as {"ratio", "ci95", "n"}; None where either row lacks the figure or no repeat has both."""
    if fig not in base or fig not in other:
        return None
    pairs = [(b, o) for b, o in zip(base[fig]["values"], other[fig]["values"]) if b is not None and o is not None]
    if not pairs:
        return None
    b, o = (list(x) for x in zip(*pairs))
    r = ratio_ci(b, o) if fig.endswith("_ms") else ratio_ci(o, b)
    return {"ratio": r["ratio"], "ci95": r["ci95"], "n": r["n"]}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def linear_kernels(device: torch.device) -> str:
    """Which kernels our linear layers run on ``device`` (oneDNN is CPU-only)."""
    return kernels.backend_name() if device.type == "cpu" else "F.linear"


def environment(device: torch.device, dtypes: list[str]) -> dict:
    env = {"device": str(device), "dtype": ",".join(dtypes), "torch": torch.__version__,
           "python": platform.python_version(),
           "threads": torch.get_num_threads(), "machine": platform.machine(), "processor": platform.processor(),
           "platform": platform.platform(), "cpu_count": os.cpu_count(), "cpu_model": _cpu_model(),
           # Our CPU linear layers use oneDNN, the peer's use PyTorch's default (MKL): say which ran.
           "linear_kernels": linear_kernels(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    for package in ("transformers", "ctranslate2"):
        try:
            env[package] = __import__(package).__version__
        except ImportError:
            pass
    return env


def _median_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    return statistics.median([_time(fn, device) for _ in range(repeats + 1)][1:])  # the first run warms up


def _probe_matrix(device: torch.device) -> torch.Tensor:
    """256 MiB (CPU) / 1 GiB (GPU) of float32: far more than any cache, so reading it measures memory."""
    n = 8192 if device.type == "cpu" else 16384
    return torch.randn(n, n, device=device)


@torch.inference_mode()
def _read_rate(a: torch.Tensor, device: torch.device) -> float:
    """Bytes/s of one streaming read (a sum) of ``a``."""
    return a.numel() * a.element_size() / _time(lambda: a.sum(), device)


@torch.inference_mode()
def measure_hardware(device: torch.device, repeats: int = 5, read_rates: list[float] | None = None,
                     probe: torch.Tensor | None = None) -> dict:
    """The machine's own limits, measured here: memory bandwidth as the faster of a large
    matrix-vector product and a plain streaming read (a sum) of the same 256 MiB / 1 GiB, each of
    which reads every byte once, and matmul throughput from a large square product by the model's own
    linear layers (kernels.Linear, packed as in generation): the ceiling of the kernels a decode runs,
    not of torch.matmul's, which on the CPU is a slower library (see model/kernels.py).

    The streaming read is usually the faster, so the limit is the memory system's, not one BLAS
    kernel's: a decode that reaches it cannot go faster by a better matrix-vector kernel.
    ``read_rates`` are more streaming-read samples, taken between the timed runs (see run_bench):
    on a shared machine the bandwidth itself moves (45-81 GB/s in one day on ours), so the limit
    must be measured while the models are; ``probe`` is the matrix they read (a new one if None)."""
    a = _probe_matrix(device) if probe is None else probe
    v = torch.randn(a.size(1), device=device)
    matvec = a.numel() * 4 / _median_time(lambda: a @ v, device, repeats)
    reads = [_read_rate(a, device) for _ in range(repeats + 1)][1:] + list(read_rates or [])
    read = statistics.median(reads)
    m = 1024 if device.type == "cpu" else 8192
    with torch.inference_mode(False):  # a weight with a version counter, as a model's, so it is packed once
        layer = kernels.Linear(m, m, bias=False, device=device)
    x = torch.randn(m, m, device=device)
    flops = 2 * m**3 / _median_time(lambda: layer(x), device, repeats)
    n = a.size(0)
    return {"memory_bandwidth_bytes_per_s": max(matvec, read), "matvec_bytes_per_s": matvec,
            "streaming_read_bytes_per_s": read, "streaming_read_range_bytes_per_s": [min(reads), max(reads)],
            "streaming_read_samples": len(reads), "matmul_flops_per_s": flops,
            "method": f"the faster of a {n}x{n} float32 matrix-vector product (median of {repeats}) and a sum of "
                      f"the same matrix (median of {len(reads)}, {len(reads) - repeats} of them between the timed "
                      f"runs; range {min(reads) / 1e9:.1f}-{max(reads) / 1e9:.1f} GB/s); {m}x{m} float32 product "
                      f"by the model's linear layers ({linear_kernels(device)})"}


def decode_limit(model: GPT, context: int, batch: int, hw: dict) -> float:
    """Tokens/s at the hardware limit for one cached decode step at ``context`` (infer/costs.py's roofline), in
    the entry's precision (int8: 1-byte linear weights, the rest float32)."""
    return batch / roofline_seconds(step_costs(model.config, context=context, batch=batch, dtype=precision(model)),
                                    hw)


class _Stepping:
    """A decoder driven one step at a time: rewound to ``context - n`` and stepped n times (see decode_rate)."""

    def decode(self, tokens: torch.Tensor, n: int) -> torch.Tensor:
        length = tokens.size(1) - n
        self.rewind(length)
        token, out = tokens[:, length:length + 1], []
        for _ in range(n):
            token = self.step(token)
            out.append(token)
        return torch.cat(out, dim=1)


class _OursDecoder(_Stepping):
    """Our model's side of the estimator: a prefill that primes a KV cache, then cached greedy steps; with a
    ``static`` step (engine.compile_step), the steps run it on a StaticKVCache instead of the eager path."""

    def __init__(self, model: GPT, batch: int, context: int, static: Callable | None = None):
        self.model, self.static = model, static
        self.cache = (KVCache if static is None else StaticKVCache)(model, batch, max_len=context)

    def prefill(self, tokens: torch.Tensor) -> None:
        self.cache.reset()
        self.model(tokens, kv_cache=self.cache, last_only=True)
        self.cache.advance(tokens.size(1))

    def rewind(self, length: int) -> None:
        self.cache.pos = length  # the keys past it are overwritten by the next steps

    def step(self, token: torch.Tensor) -> torch.Tensor:
        if self.static is not None:
            return self.cache.step(self.static, token)[:, -1].argmax(-1, keepdim=True)
        logits = self.model(token, kv_cache=self.cache, last_only=True)
        self.cache.advance(1)
        return logits[:, -1].argmax(-1, keepdim=True)


class _PeerDecoder(_Stepping):
    """The same for a transformers model: its own cache, cropped back between repeats."""

    def __init__(self, hf):
        import inspect

        from transformers import DynamicCache

        self.hf, self.cache = hf, None
        self.cache_arg = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
        # transformers 5 crops by the number of tokens to remove (negative), 4 by the length to keep.
        self.crop_removes = "tokens_to_remove" in inspect.signature(DynamicCache.crop).parameters

    def prefill(self, tokens: torch.Tensor) -> None:
        out = self.hf(tokens, use_cache=True, logits_to_keep=1)
        self.cache = out["cache"] if "cache" in out else out["past_key_values"]  # transformers 5 / 4

    def rewind(self, length: int) -> None:
        have = self.cache.get_seq_length()
        self.cache.crop(-(have - length) if self.crop_removes else length)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        out = self.hf(token, use_cache=True, logits_to_keep=1, **{self.cache_arg: self.cache})
        return out.logits[:, -1].argmax(-1, keepdim=True)


class _CT2Decoder:
    """CTranslate2's side. Its Generator keeps a KV cache only inside one generate call and has no call that
    rewinds one; what it does keep between calls is a static prompt's state. So:

    - prefill: one generate call on the whole prompts for one new token (the prompt but its last token
      forwarded at once, then the last one: what generation does before its first token), as ours;
    - decode: one generate call from the static prompt ``tokens[0, :context - n]``, its state cached when the
      decoder is made (untimed) and copied to the batch in every call, with start tokens
      ``tokens[:, context - n]``, for n greedy tokens (min_length = max_length = n): n forward steps at the
      positions ours decodes. Timed: the whole call, so CTranslate2's per-call setup and the copy of the cached
      state count, as our Python per step does. At batch > 1 the rows share row 0's context (a static prompt is
      one for the batch): a step costs the same whatever the token values."""

    def __init__(self, generator, tokens: torch.Tensor, n: int):
        from hybrid_gpt.infer.peer import ct2_greedy

        self.generator, self.greedy = generator, ct2_greedy
        self.decode(tokens, n)  # forward and cache the static prompt now, outside the timed calls

    def prefill(self, tokens: torch.Tensor) -> None:
        from hybrid_gpt.infer.peer import ct2_tokens

        self.generator.generate_batch([ct2_tokens(row) for row in tokens.tolist()], max_length=1,
                                      include_prompt_in_result=False, beam_size=1, sampling_topk=1)

    def decode(self, tokens: torch.Tensor, n: int) -> torch.Tensor:
        length = tokens.size(1) - n
        return torch.tensor(self.greedy(self.generator, tokens[0, :length].tolist(), tokens[:, length].tolist(), n))


def decode_rate(decoder, tokens: torch.Tensor, n: int, device) -> float:
    """New tokens per second of ``n`` cached greedy steps at batch ``tokens.size(0)``, prefill excluded.

    ``decoder`` has been primed by ``prefill(tokens)`` (``tokens`` [B, context]); it is rewound to
    ``context - n`` and steps ``n`` times from there, feeding back its own greedy token, so every repeat
    decodes the same positions at the same cost without a second prefill (which at long contexts costs
    minutes). Ours and the transformers peer run the same loop (:class:`_Stepping`: model call, argmax, next
    call); CTranslate2 runs its own loop in C++ (:class:`_CT2Decoder` says what is timed)."""
    return n * tokens.size(0) / _time(lambda: decoder.decode(tokens, n), device)


def naive_rate(model: GPT, tokens: torch.Tensor, n: int, device) -> float:
    """New tokens per second without a cache: each of the last ``n`` tokens of ``tokens`` computed by
    re-running the whole sequence before it."""
    length = tokens.size(1) - n

    def steps():
        for i in range(n):
            model(tokens[:, : length + i + 1], last_only=True)

    return n * tokens.size(0) / _time(steps, device)


def _make_peers(models: dict[str, GPT], vocab: int, block: int, gen, device, log,
                kinds=PEERS) -> dict[str, dict]:
    """The peers of ``kinds`` (see BenchConfig.peers) for the standard (all-attention) entries: name -> {"kind",
    "of" (our entry whose weights it holds), "dtype", "model", "max_abs_logit_diff", "implementation"}."""
    unknown = [k for k in kinds if k not in PEERS]
    if unknown:
        raise HybridGPTError(f"unknown peer {unknown[0]!r}; choose from {', '.join(PEERS)}")
    standard = [n for n, m in models.items() if set(m.config.layers) == {"A"}]
    if not standard:
        log("peer: skipped (no standard, all-attention model among the checkpoints)")
        return {}
    probe = torch.randint(0, vocab, (2, min(block, 64)), generator=gen).to(device)
    peers = _transformers_peers(models, standard, probe, log) if "transformers" in kinds else {}
    return peers | (_ct2_peers(models, standard, probe, log) if "ctranslate2" in kinds else {})


def _transformers_peers(models: dict[str, GPT], standard: list[str], probe: torch.Tensor, log) -> dict[str, dict]:
    """One transformers model of the entry's family (GPT2LMHeadModel, LlamaForCausalLM) with its weights, per
    precision of the standard entries."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        log("peer: skipped (transformers is not installed: `uv sync --extra peer`)")
        return {}
    from hybrid_gpt.infer.peer import max_logit_difference, to_hf

    peers, seen = {}, set()
    for of in standard:
        dtype = precision(models[of])
        if dtype in seen or dtype not in DTYPES:  # one peer per precision (none for int8): of the first in it
            continue
        seen.add(dtype)
        try:
            hf = to_hf(models[of])
        except HybridGPTError as e:  # a family transformers has no model of: measure ours alone
            log(f"peer: skipped for {of} ({e})")
            continue
        diff = max_logit_difference(models[of], hf, probe)
        impl = f"transformers {type(hf).__name__}"
        peers[entry_name("peer", dtype)] = {"kind": "transformers", "of": of, "dtype": dtype, "model": hf,
                                            "max_abs_logit_diff": diff, "implementation": impl}
        log(f"peer: {impl} with {of}'s weights ({dtype}), max |logit difference| {diff:.2e}")
    return peers


def _ct2_peers(models: dict[str, GPT], standard: list[str], probe: torch.Tensor, log) -> dict[str, dict]:
    """CTranslate2's Generator of the first float32 standard entry, converted once (to a temporary directory,
    removed once loaded), in float32 ("ctranslate2") and int8 ("ctranslate2@int8"), each checked against our
    logits on ``probe``: max |difference| and the fraction of positions with the same greedy token."""
    import tempfile

    from hybrid_gpt.infer.peer import (
        CT2_COMPUTE_TYPES,
        CT2_MISSING,
        ct2_agreement,
        ct2_generator,
        ctranslate2_module,
        to_ctranslate2,
    )

    ctranslate2 = ctranslate2_module(required=False)
    if ctranslate2 is None:
        log(f"ctranslate2 peer: skipped ({CT2_MISSING})")
        return {}

    of = next((n for n in standard if precision(models[n]) == "float32"), None)
    if of is None:
        log("ctranslate2 peer: skipped (no float32 standard entry to convert)")
        return {}
    device = next(models[of].parameters()).device
    peers = {}
    with tempfile.TemporaryDirectory(prefix="hybrid-gpt-ct2-") as tmp:
        try:
            path = to_ctranslate2(models[of], tmp)
        except HybridGPTError as e:  # a family CTranslate2 has no converter of: measure ours alone
            log(f"ctranslate2 peer: skipped for {of} ({e})")
            return {}
        for compute in CT2_COMPUTE_TYPES:
            gen = ct2_generator(path, compute, device.type)
            check = ct2_agreement(models[of], gen, probe)
            impl = f"CTranslate2 {ctranslate2.__version__} Generator ({compute})"
            peers[entry_name("ctranslate2", compute)] = {"kind": "ctranslate2", "of": of, "dtype": compute,
                                                         "model": gen, "implementation": impl, **check}
            log(f"ctranslate2 peer: {impl} with {of}'s weights, max |logit difference| "
                f"{check['max_abs_logit_diff']:.2e}, same greedy token at {100 * check['top1_agreement']:.1f}% "
                "of positions")
    return peers


def shape_models(preset: str, patterns: list[str], *, block_size: int | None = None,
                 contexts: list[int] | None = None, seed: int = 0,
                 device: torch.device | str = "cpu") -> dict[str, GPT]:
    """A model of ``preset``'s shape (width, heads, vocabulary; context ``block_size``, default the preset's or
    the largest of ``contexts`` where that is longer) for each layer pattern, named by its pattern, with random
    weights from GPT's initialisation drawn from ``seed`` (the same seed for every pattern; the global random
    state is left as it was). No checkpoint is needed: a decode or prefill step costs what the shape makes it
    cost, whatever the weights learned."""
    values = get_preset(preset)
    layers = [parse_layers(p) for p in patterns]
    if not layers:
        raise HybridGPTError("give at least one layer pattern, e.g. --layers AAAA,AAMM")
    repeated = sorted({p for p in layers if layers.count(p) > 1})
    if repeated:
        raise HybridGPTError(f"layer pattern {repeated[0]} is given twice; each pattern names one model")
    block = max([values["block_size"], *(contexts or [])]) if block_size is None else block_size
    if not isinstance(block, int) or isinstance(block, bool) or block < 2:
        raise HybridGPTError(f"block_size must be a whole number of at least 2, got {block!r}")
    configs = {p: GPTConfig(vocab_size=values["vocab_size"], block_size=block, n_embd=values["n_embd"],
                            n_head=values["n_head"], layers=p).validate() for p in layers}
    ensure_fits(sum(4 * c.num_params() for c in configs.values()),
                f"{len(configs)} models of the {preset} shape at context {block:,}", device,
                hint="give fewer --layers or a smaller --block-size")
    models = {}
    with torch.random.fork_rng(devices=[]):
        for p, config in configs.items():
            torch.manual_seed(seed)
            models[p] = GPT(config).to(device).eval()
    return models


def shape_note(preset: str, models: dict[str, GPT], seed: int) -> dict:
    """What a result of :func:`shape_models`' models says of them: {"weights": the sentence that they are random,
    "shape": {"preset", "layers", "block_size", "seed"}}."""
    block = next(iter(models.values())).config.block_size
    shape = {"preset": preset, "layers": list(models), "block_size": block, "seed": seed}
    return {"weights": random_weights(shape), "shape": shape}


def bench_shape(preset: str, patterns: list[str], cfg: BenchConfig, *, block_size: int | None = None,
                seed: int = 0, device: torch.device | str = "cpu", log=print) -> dict:
    """:func:`run_bench` on :func:`shape_models`, with :func:`shape_note`'s keys; the ratios' base is the
    first pattern listed."""
    models = shape_models(preset, patterns, block_size=block_size, contexts=cfg.contexts, seed=seed, device=device)
    note = shape_note(preset, models, seed)
    log(f"bench: {note['weights']}")
    return run_bench(models, cfg, log=log) | note


def run_bench(models: dict[str, GPT], cfg: BenchConfig, log=print, val: dict[str, tuple] | None = None) -> dict:
    """Benchmark ``models`` (name -> model, all on one device), each in every precision of
    ``cfg.dtypes`` (and its static decode step compiled, with ``cfg.compile``), and return the results as a
    dict. With ``val`` = {model name: (its validation tokens, its bytes per token)}, the bits per byte of each
    model so given in each precision are measured too (the quality cost of bf16): each model on its own data,
    since another tokenizer's ids are other text (checkpoint.checkpoint_data gives a checkpoint's)."""
    unknown = sorted(set(val or {}) - set(models))
    if unknown:  # before any timing: a typo would otherwise fail after minutes of it
        raise HybridGPTError(f"validation data given for {', '.join(unknown)}, which bench does not measure")
    if not cfg.compile:
        return _run_bench(models, cfg, log, val)
    # Room for every compiled step's graphs (one per entry, batch and context: shapes are static), and an
    # error (never eager code under a "+compile" label) should dynamo run out of it anyway.
    block = min((m.config.block_size for m in models.values()), default=1)
    sizes = len(cfg.contexts or default_contexts(block, cfg.new_tokens)) * len(cfg.batch_sizes)
    limit = max(torch._dynamo.config.recompile_limit, sizes * len(models) * len(cfg.dtypes) + 1)
    with torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True):
        return _run_bench(models, cfg, log, val)


@torch.inference_mode()
def _run_bench(models: dict[str, GPT], cfg: BenchConfig, log, val: dict[str, tuple] | None) -> dict:
    if not models:
        raise HybridGPTError("bench needs at least one model")
    originals = models
    models = with_dtypes(models, cfg.dtypes)
    first = next(iter(models.values()))
    device = next(first.parameters()).device
    block = min(m.config.block_size for m in models.values())
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
    vocab = min(m.config.vocab_size for m in models.values())
    gen = torch.Generator().manual_seed(cfg.seed)
    peers = _make_peers(models, vocab, block, gen, device, log, cfg.peers) if cfg.peer else {}
    steps, agreement = {}, {}  # "<name>+compile" -> its compiled step; -> its greedy agreement per size
    if cfg.compile:
        if cfg.warmup < 1:
            raise HybridGPTError("compile needs warmup 1 or more: the first runs of each shape compile")
        steps = compiled_steps(models)
        models = models | {name: models[name.removesuffix("+compile")] for name in steps}

    samples: dict = {}  # (name, context, batch, figure) -> the timed repeats' values, in repeat order
    probe, read_rates = _probe_matrix(device), []
    shuffler = random.Random(cfg.seed)  # the order of the models in each repeat
    orders = []

    def record(key: tuple, value: float) -> None:
        samples.setdefault(key, []).append(value if value == value else None)  # NaN: no figure, pairing kept

    for c in contexts:
        for b in cfg.batch_sizes:
            started = time.perf_counter()
            prompt = torch.randint(0, vocab, (b, c), generator=gen).to(device)
            n = cfg.new_tokens
            runners = {}
            # Every entry's cache (and each peer's, as large as its model's) lives through the repeats, beside
            # one prefill's largest activations (residual, q/k/v, MLP hidden: about 9 x n_embd values a token).
            caches = [models[p["of"]] for p in peers.values()] + list(models.values())
            activations = max(9 * m.config.n_embd * next(m.parameters()).element_size() for m in caches)
            ensure_fits((sum(m.config.kv_bytes_per_token(next(m.parameters()).dtype) for m in caches)
                         + activations) * c * b,
                        f"the KV caches of {len(caches)} models at context {c:,}, batch {b} (and one prefill's "
                        "activations)", device,
                        hint="measure fewer or smaller --contexts and --batch-sizes")
            decoders = {name: _OursDecoder(model.eval(), b, c, steps.get(name)) for name, model in models.items()}
            decoders |= {name: _PeerDecoder(peer["model"]) if peer["kind"] == "transformers"
                         else _CT2Decoder(peer["model"], prompt, n) for name, peer in peers.items()}
            naive = cfg.naive and c <= cfg.naive_max_context
            primed = set()  # decoders the check below leaves primed with this prompt
            for name in steps:
                primed |= {name, name.removesuffix("+compile")}
                same = _compile_check(decoders[name.removesuffix("+compile")], decoders[name], name, prompt, n)
                agreement.setdefault(name, []).append({"context": c, "batch": b, "same_greedy_tokens": same})
                log(f"compile: {name} at context {c}, batch {b}: the eager path's greedy token at "
                    f"{100 * same:.0f}% of {n} steps")
            for name, dec in decoders.items():
                # The prefill primes the cache the decode steps then read: timed in every repeat, or run once
                # (a compiled entry's prefill is its eager model's, timed there).
                if cfg.prefill and name not in steps:
                    runners[name] = {"prefill_ms": lambda d=dec: 1000 * _time(lambda: d.prefill(prompt), device)}
                else:
                    if name not in primed:  # a long context's prefill costs minutes: once is enough
                        dec.prefill(prompt)
                    runners[name] = {}
                runners[name]["decode_tok_s"] = lambda d=dec: decode_rate(d, prompt, n, device)
                if naive and name in models and name not in steps:
                    runners[name]["naive_decode_tok_s"] = lambda m=models[name]: naive_rate(m, prompt, n, device)
            timed = []
            for rep in range(cfg.warmup + cfg.repeats):
                order = list(runners)
                shuffler.shuffle(order)  # every model once per repeat, in a new order each time
                for name in order:
                    for fig, fn in runners[name].items():
                        value = fn()
                        if rep >= cfg.warmup:
                            record((name, c, b, fig), value)
                if rep >= cfg.warmup:  # the memory bandwidth, sampled among the models it is the limit of
                    read_rates.append(_read_rate(probe, device))
                    timed.append(order)
            orders.append({"context": c, "batch": b, "orders": timed})
            runners = decoders = None  # free this size's caches before the next size's are made
            log(f"context {c}, batch {b}: done in {time.perf_counter() - started:.0f} s")

    hw = measure_hardware(device, read_rates=read_rates, probe=probe)
    log(f"hardware: memory bandwidth {hw['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, "
        f"matmul {hw['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s")
    results = {"environment": environment(device, cfg.dtypes), "config": asdict(cfg) | {"contexts": contexts},
               "hardware": hw, "models": {}, "ratios": {},
               # The i-th timed repeat of every figure of a (context, batch) ran the models in orders[i].
               "order": {"seed": cfg.seed, "rounds": orders}}
    for name, model in models.items():
        mc = model.config
        dtype = next(model.parameters()).dtype
        rows = []
        for c in contexts:
            for b in cfg.batch_sizes:
                row = {"context": c, "batch": b, "kv_cache_bytes": mc.kv_bytes_per_token(dtype) * c * b}
                for fig in ("prefill_ms", "decode_tok_s", "naive_decode_tok_s"):
                    if (name, c, b, fig) in samples:
                        row[fig] = summary(samples[(name, c, b, fig)])
                row["decode_limit_tok_s"] = limit = decode_limit(model, c, b, hw)
                row["decode_fraction_of_limit"] = row["decode_tok_s"]["median"] / limit
                rows.append(row)
        # an int8 copy's packed weights are no parameters: count the float model's
        base = name.removesuffix("+compile")
        params = originals[base if base in originals else base.rsplit("@", 1)[0]].num_params()
        results["models"][name] = {"layers": mc.layers, "dtype": precision(model), "compiled": name in steps,
                                   "parameters": params, "kv_bytes_per_token": mc.kv_bytes_per_token(dtype),
                                   "config": asdict(mc), "rows": rows}
    if peers:
        results["peers"] = {}
        for name, peer in peers.items():
            rows = [{"context": c, "batch": b, **{fig: summary(samples[(name, c, b, fig)])
                                                  for fig in ("prefill_ms", "decode_tok_s")
                                                  if (name, c, b, fig) in samples}}
                    for c in contexts for b in cfg.batch_sizes]
            results["peers"][name] = {"kind": peer["kind"], "implementation": peer["implementation"],
                                      "weights_of": peer["of"], "dtype": peer["dtype"],
                                      "max_abs_logit_diff": peer["max_abs_logit_diff"], "rows": rows}
            if "top1_agreement" in peer:
                results["peers"][name]["top1_agreement"] = peer["top1_agreement"]
        # "peer" is the float32 peer (or the only one): what the report and the ratios compare against.
        results["peer"] = results["peers"].get("peer") or next(iter(results["peers"].values()))
    if steps:
        results["compiled"] = {name: {"step": COMPILED_STEP[device.type == "cpu"], "checks": rows,
                                      "same_greedy_tokens": min(r["same_greedy_tokens"] for r in rows)}
                               for name, rows in agreement.items()}
    if val:
        results["quality"] = precision_quality(originals, models, cfg, val, log)
    results["ratios"] = _ratios(results)
    if device.type == "cuda":
        results["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        results["peak_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        results["peak_memory_note"] = "peak resident memory of the whole benchmark process (all models together)"
    return results


def precision_quality(originals: dict[str, GPT], models: dict[str, GPT], cfg: BenchConfig, val: dict[str, tuple],
                      log=print) -> dict:
    """Bits per byte of every entry of the models in ``val`` in its precision, each on that model's own
    (validation tokens, bytes per token), and the cost against the same model in float32."""
    from hybrid_gpt.train.evaluate import evaluate_lm

    reference = {name: evaluate_lm(_as_float32(originals[name]), *val[name], cfg.quality_tokens)["bpb"]
                 for name in originals if name in val}
    out = {}
    for dtype in cfg.dtypes:
        for name in reference:
            tokens, byte_lengths = val[name]
            entry = entry_name(name, dtype)
            bpb = reference[name] if dtype == "float32" else evaluate_lm(models[entry], tokens, byte_lengths,
                                                                        cfg.quality_tokens)["bpb"]
            out[entry] = {"bpb": bpb, "bpb_float32": reference[name], "cost_bpb": bpb - reference[name]}
            log(f"quality {entry}: {bpb:.4f} bits per byte ({bpb - reference[name]:+.4f} vs float32)")
    return out


def _as_float32(model: GPT) -> GPT:
    import copy

    return model if next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float()


# Each figure and the key of its speedup in a ratio row.
SPEEDUPS = {"prefill_ms": "prefill_speedup", "decode_tok_s": "decode_speedup",
            "naive_decode_tok_s": "naive_decode_speedup"}


def _ratio_row(base: dict, other: dict) -> dict:
    """One row of speedups of ``other`` over ``base`` (same context and batch): each figure both have, as the
    paired ratio and its interval ("<figure>_speedup", "<figure>_speedup_ci95": [lo, hi], None from one repeat)."""
    row = {"context": base["context"], "batch": base["batch"]}
    for fig, key in SPEEDUPS.items():
        r = speedup(base, other, fig)
        if r:
            row[key], row[f"{key}_ci95"] = r["ratio"], r["ci95"]
    return row


def _ratios(results: dict) -> dict:
    """Speedups per row (> 1: the first named is faster), each the paired ratio of per-repeat figures with its
    interval: each model against the standard model of the same precision (or the first listed where there is
    none); each of our standard entries against the peer of its precision and, for the issue's comparison,
    against the float32 peer."""
    models = results["models"]
    out = {}
    groups: dict[tuple, list[str]] = {}  # same precision, and compiled or not
    for name, m in models.items():
        groups.setdefault((m.get("dtype", "float32"), m.get("compiled", False)), []).append(name)
    for (dtype, compiled), names in groups.items():
        base = entry_name("standard", dtype) + ("+compile" if compiled else "")
        base = base if base in names else names[0]
        for other in names:
            if other == base:
                continue
            rows = []
            for rb, ro in zip(models[base]["rows"], models[other]["rows"]):
                r = _ratio_row(rb, ro)
                r["kv_cache_ratio"] = (ro["kv_cache_bytes"] / rb["kv_cache_bytes"]) if rb["kv_cache_bytes"] else None
                # the cost model's roofline ratio on the hardware measured in this run, beside the measured one
                if "decode_limit_tok_s" in rb and "decode_limit_tok_s" in ro:
                    r["predicted_decode_speedup"] = ro["decode_limit_tok_s"] / rb["decode_limit_tok_s"]
                rows.append(r)
            out[f"{other}/{base}"] = rows
    # Each entry against itself without one change: what compiling buys, then what a lower precision buys.
    selves = [(name, name.removesuffix("+compile")) for name, m in models.items() if m.get("compiled")]
    selves += [(name, name.split("@")[0]) for name, m in models.items()
               if m.get("dtype", "float32") != "float32" and not m.get("compiled")]
    for name, ref in selves:
        if ref in models:
            out[f"{name}/{ref}"] = [_ratio_row(b, o) for o, b in zip(models[name]["rows"], models[ref]["rows"])]
    peers = results.get("peers", {})
    pairs = [(peer["weights_of"], name) for name, peer in peers.items()]
    # a peer in a precision our entry was not converted from (CTranslate2's int8): ours in that precision too
    pairs += [(entry_name(peer["weights_of"], peer["dtype"]), name) for name, peer in peers.items()
              if entry_name(peer["weights_of"], peer["dtype"]) in models and peer["dtype"] != "float32"
              and "@" not in peer["weights_of"]]
    pairs += [(f"{of}+compile", name) for of, name in pairs if f"{of}+compile" in models]
    for float_peer in ("peer", "ctranslate2"):  # lower precisions of ours against each float32 peer
        if float_peer in peers:
            pairs += [(name, float_peer) for name, m in models.items()
                      if m.get("dtype", "float32") != "float32" and set(m["layers"]) == {"A"}
                      and (name, float_peer) not in pairs]
    for of, peer_name in pairs:
        out[f"{of}/{peer_name}"] = [_ratio_row(p, o) for o, p in zip(models[of]["rows"], peers[peer_name]["rows"])]
    return out


def run_train_bench(models: dict[str, GPT], batch_size: int = TRAIN_BENCH_BATCH, repeats: int = 5, warmup: int = 1,
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
            from hybrid_gpt.infer.peer import to_hf

            hf = to_hf(copy.deepcopy(models[standard[0]]))
            T = models[standard[0]].config.block_size
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
