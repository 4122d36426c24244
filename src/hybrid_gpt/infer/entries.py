"""The entries a benchmark measures: every model in every precision (float32, bfloat16, int8: a copy each, named
"<model>@<dtype>"), its static decode step compiled ("<entry>+compile"), each precision's quality cost in bits
per byte, and models of a preset's shape with random weights (a step's cost depends on the shape, not on what the
weights learned).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.infer.config import BENCH_DTYPES, BenchConfig
from hybrid_gpt.infer.engine import compile_step
from hybrid_gpt.model.gpt import GPT, GPTConfig, parse_layers
from hybrid_gpt.present.bench import random_weights
from hybrid_gpt.presets import get_preset
from hybrid_gpt.runtime import DTYPES, ensure_fits

logger = logging.getLogger(__name__)

# What a "+compile" entry's decode step is, on a GPU (False) and on the CPU (True).
COMPILED_STEP = {False: "static decode step, torch.compile with CUDA graphs (reduce-overhead)",
                 True: "static decode step, torch.compile: inductor, frozen weights, C++ wrapper"}


def entry_name(name: str, dtype: str) -> str:
    """The name of model ``name``'s entry in precision ``dtype``: the model's own in float32, else "<name>@<dtype>"."""
    return name if dtype == "float32" else f"{name}@{dtype}"


def precision(model: GPT) -> str:
    """The precision an entry runs in: "int8" for a :func:`quantize_int8` copy, else its parameters' dtype."""
    return getattr(model, "bench_precision", None) or str(next(model.parameters()).dtype).removeprefix("torch.")


def quantize_int8(model: GPT) -> GPT:
    """A copy of ``model`` (float32, on the CPU) whose linear layers (attention, MLPs, the LM head) are
    kernels.Int8Linear: int8 weights, one scale per output row; each product quantizes its input to int8 per row
    on the fly and multiplies in int8 (dynamic quantization, compat.int_mm); embeddings, norms and the KV cache stay
    float32. Why dynamic quantization rather than weight-only int8: it is what CTranslate2's int8 does on the
    CPU (int8 products with activations quantized per call), so the two int8 rows compare like with like, and
    it needs no kernel outside PyTorch's own. Its static decode step compiles (compile_step), as float32's."""
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


def _as_float32(model: GPT) -> GPT:
    return model if next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float()


def compiled_steps(models: dict[str, GPT]) -> dict[str, Callable]:
    """{"<name>+compile": engine.compile_step(model)} for every entry, int8's too (its products are a custom
    operator the compiler calls). Each compiles at its first step of each batch and context; bench.run_bench
    checks its greedy tokens against the eager ones there (decoders.compile_check), before anything is timed."""
    return {f"{name}+compile": compile_step(model) for name, model in models.items()}


def precision_quality(originals: dict[str, GPT], models: dict[str, GPT], cfg: BenchConfig,
                      val: dict[str, tuple]) -> dict:
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
            logger.info(f"quality {entry}: {bpb:.4f} bits per byte ({bpb - reference[name]:+.4f} vs float32)")
    return out


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
