"""Ablations with controls: train a set of layer patterns under one budget, over several seeds.

The default set asks the questions a careful reader asks of the original's two-model comparison:

    AAAA          the standard model
    AAMM          the original's hybrid (deep attention replaced by a tiny per-token MLP)
    AANN          attention dropped, nothing in its place: what does the MLP add?
    MMAA          early attention replaced instead: is depth the point?
    AA            the truncated two-block model: are the deep blocks needed at all?
    AAMM:matched  the hybrid with its M hidden width chosen so that it has the standard's parameter count

A variant is ``PATTERN`` or ``PATTERN:H`` (H = M hidden width) or ``PATTERN:matched``. The budget is
equal optimizer steps, or equal wall-clock time: each variant's training-step rate is measured
first, side by side, and a cheaper variant gets proportionally more steps (the cosine schedule
needs its length up front, so the time budget is turned into a step count before training).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from hybrid_gpt.analysis.ablate_config import BUDGETS, DEFAULT_BUDGET, DEFAULT_SEEDS, DEFAULT_VARIANTS
from hybrid_gpt.analysis.verdict import QUALITY_TOLERANCE
from hybrid_gpt.checkpoint import CHECKPOINT_FILES
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import check_replaceable, nested, read_json, write_json, write_text
from hybrid_gpt.model.gpt import GPT, GPTConfig, parse_layers
from hybrid_gpt.present.ablate import plot_ablate, render_ablate_markdown
from hybrid_gpt.presets import get_preset
from hybrid_gpt.stats import judge_interval, judge_pair, mean_ci, seeds_needed

logger = logging.getLogger(__name__)

QUICK_STEPS = {"smoke": 10, "cpu": 150, "depth": 150, "seed": 1000}  # --quick: 3 seeds x 6 variants, 20 min on cpu
DECODE_NEW_TOKENS = 24  # tokens decoded per timed run, ending at the full context
CURVE_POINTS = 8  # validation evaluations per run (plus the final one): the learning curves' points


@dataclass(frozen=True)
class Variant:
    spec: str  # as the user wrote it, e.g. "AAMM:matched"
    layers: str
    mlp_hidden: int  # 0: the model's default (n_embd // 4)

    @property
    def slug(self) -> str:
        return self.layers + (f"-h{self.mlp_hidden}" if self.mlp_hidden else "")


# What an ablate output directory holds (its runs are "<pattern>-steps<N>-seed<S>" checkpoints).
ABLATE_FILES = ("ablate.json", "ablate.md", "ablate-*.png", "calibration-*.json",
                *nested("*-steps*-seed*", CHECKPOINT_FILES))

def _config(values: dict, vocab_size: int, layers: str, mlp_hidden: int = 0) -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, block_size=values["block_size"], n_embd=values["n_embd"],
                     n_head=values["n_head"], layers=layers, mlp_hidden=mlp_hidden).validate()


def matched_hidden(values: dict, vocab_size: int, layers: str) -> int:
    """The M hidden width that gives ``layers`` the parameter count of the all-attention model of its depth."""
    if "M" not in layers:
        raise HybridGPTError(f"{layers}:matched needs at least one M block to widen")
    target = _config(values, vocab_size, "A" * len(layers)).num_params()
    p1, p2 = (_config(values, vocab_size, layers, h).num_params() for h in (1, 2))
    return max(1, round(1 + (target - p1) / (p2 - p1)))  # parameters grow linearly in the hidden width


def parse_variants(specs, values: dict, vocab_size: int) -> list[Variant]:
    out, seen = [], set()
    for spec in specs:
        spec = spec.strip()
        pattern, _, hidden = spec.partition(":")
        layers = parse_layers(pattern)
        if ":" in spec and not (hidden.isdigit() or hidden == "matched"):
            raise HybridGPTError(f"variant {spec!r}: after the layer pattern give :H (M hidden width) or :matched, "
                                 "e.g. AAMM:matched")
        if hidden and "M" not in layers:
            raise HybridGPTError(f"variant {spec!r} sets an M width but has no M block")
        h = matched_hidden(values, vocab_size, layers) if hidden == "matched" else int(hidden or 0)
        v = Variant(spec, layers, h)
        if v.slug in seen:
            raise HybridGPTError(f"variant {spec!r} repeats an earlier one")
        seen.add(v.slug)
        out.append(v)
    if not out:
        raise HybridGPTError("no variants given")
    return out


def calibrate_steps(variants: list[Variant], values: dict, vocab_size: int, steps: int, device: str) -> dict:
    """Steps per variant for an equal wall-clock budget: the first variant gets ``steps``; the others
    as many as they run in the same time, from training-step rates measured side by side."""
    from hybrid_gpt.infer.bench import run_train_bench
    from hybrid_gpt.runtime import resolve_device

    dev = resolve_device(device)
    models = {v.slug: GPT(_config(values, vocab_size, v.layers, v.mlp_hidden)).to(dev) for v in variants}
    logger.info(f"[ablate] measuring training-step rates of {len(models)} variants for the time budget")
    rates = run_train_bench(models, batch_size=values["batch_size"], repeats=5, warmup=1, peer=False)
    tok_s = {k: s["median"] for k, s in rates["tokens_per_sec"].items()}
    ref = variants[0].slug
    return {"reference": ref, "reference_steps": steps, "tokens_per_sec": tok_s,
            "steps": {k: max(1, round(steps * r / tok_s[ref])) for k, r in tok_s.items()}}


def run_ablate(*, run_dir: str | Path, preset: str = "cpu", patterns=DEFAULT_VARIANTS, budget: str = DEFAULT_BUDGET,
               seeds=DEFAULT_SEEDS, steps: int | None = None, quick: bool = False, out_dir: str | Path | None = None,
               device: str = "auto", bench_repeats: int = 5, progress: bool = False) -> dict:
    """Train every variant for every seed under one budget (skipping runs already complete), then
    measure their cached decode speed side by side; write ablate.json, ablate.md and two PNGs."""
    from hybrid_gpt.data.tokens import ensure_prepared
    from hybrid_gpt.train.pretrain import run_pretrain
    from hybrid_gpt.train.stage import run_or_skip

    if budget not in BUDGETS:
        raise HybridGPTError(f"budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise HybridGPTError("seeds must be distinct, e.g. 1,2,3")
    run_dir = Path(run_dir)
    values = get_preset(preset)
    steps = steps or (QUICK_STEPS[preset] if quick else values["max_steps"])
    out = Path(out_dir) if out_dir else run_dir / ("ablate-quick" if quick else "ablate")
    check_replaceable(out, ABLATE_FILES, "layer-ablation output")  # its runs are resumed in it; nothing else is touched
    data_dir = run_dir / "data"
    ensure_prepared(data_dir, preset, tag="ablate")
    vocab_size = read_json(data_dir / "meta.json", "data meta")["vocab_size"]
    variants = parse_variants(patterns, values, vocab_size)

    calibration = None
    if budget == "time":
        cal_file = out / f"calibration-{steps}.json"
        slugs = [v.slug for v in variants]
        if cal_file.is_file() and read_json(cal_file, "calibration").get("variants") == slugs:
            calibration = read_json(cal_file, "calibration")  # so that a re-run resumes the same runs
        else:
            calibration = calibrate_steps(variants, values, vocab_size, steps, device) | {"variants": slugs}
            write_json(cal_file, calibration)
    steps_of = {v.slug: calibration["steps"][v.slug] if calibration else steps for v in variants}

    runs: dict[str, dict[int, Path]] = {}
    for seed in seeds:
        for v in variants:
            n = steps_of[v.slug]
            ckpt = out / f"{v.slug}-steps{n}-seed{seed}"
            overrides = dict(seed=seed, max_steps=n, eval_interval=max(1, n // CURVE_POINTS), progress=progress,
                             warmup_steps=min(values["warmup_steps"], max(1, n // 10)),
                             mlp_hidden=v.mlp_hidden or None)
            run_or_skip(f"ablate {v.spec} seed {seed} ({n} steps)", ckpt, lambda ckpt=ckpt, overrides=overrides,
                        v=v, **kw: run_pretrain(run_dir=run_dir, preset=preset, layers=v.layers, out=ckpt,
                                                data_dir=data_dir, overrides=overrides, device=device, **kw))
            runs.setdefault(v.slug, {})[seed] = ckpt

    result = {"preset": preset, "budget": budget, "steps": steps, "seeds": seeds, "calibration": calibration,
              "variants": [], "out_dir": str(out)}
    for v in variants:
        bpb, loss, seconds = [], [], []
        for seed in seeds:
            final = _final_eval(runs[v.slug][seed])
            bpb.append(final["val_bpb"])
            loss.append(final["val_loss"])
            seconds.append(final["elapsed"])
        cfg = _config(values, vocab_size, v.layers, v.mlp_hidden)
        result["variants"].append({
            "spec": v.spec, "slug": v.slug, "layers": v.layers, "mlp_hidden": cfg.m_hidden if "M" in v.layers else None,
            "parameters": cfg.num_params(), "kv_bytes_per_token": cfg.kv_bytes_per_token(), "steps": steps_of[v.slug],
            "val_bpb": mean_ci(bpb), "val_loss": mean_ci(loss), "train_seconds": mean_ci(seconds),
            "checkpoints": {str(s): str(p) for s, p in runs[v.slug].items()}})
    result["curves"] = learning_curves({v.slug: runs[v.slug] for v in variants})
    result["gaps"] = gap_curves(runs, result["variants"], values["batch_size"] * values["grad_accum"]
                                * values["block_size"])
    result["power"] = power_lines(result)
    result["decode"] = _decode_speeds(variants, runs, seeds[0], device, bench_repeats)
    for entry in result["variants"]:
        entry["decode_tok_s"] = result["decode"]["tok_s"][entry["slug"]]
    result["tolerance_fraction"] = QUALITY_TOLERANCE
    result["sentences"] = sentences(result)
    result["plots"] = plot_ablate(result, out)
    write_json(out / "ablate.json", result)
    write_text(out / "ablate.md", render_ablate_markdown(result))
    logger.info(f"[ablate] wrote {out / 'ablate.md'}")
    return result


def _final_eval(ckpt: Path) -> dict:
    """The last evaluation of a completed run: the documented final one over EVAL_TOKENS."""
    from hybrid_gpt.train.stage import read_metrics

    metrics = read_metrics(ckpt)
    evals = [m for m in metrics if "val_bpb" in m]
    steps = [m for m in metrics if "elapsed" in m]
    if not evals or not steps:
        raise HybridGPTError(f"{ckpt} has no evaluation in metrics.jsonl; delete it and run ablate again")
    return evals[-1] | {"elapsed": steps[-1]["elapsed"]}


def learning_curves(runs: dict[str, dict[int, Path]]) -> dict:
    """Validation bits per byte against step for each variant ({slug: {seed: checkpoint}}): {slug: {"steps",
    "mean", "ci95", "n", "final"}}, one point per step any seed evaluated at, with the 95% t-interval over the
    seeds evaluated there (None from one). The final evaluation reads more tokens than the periodic ones (its
    "val_tokens" differ from the first evaluation's), so it is not a point of the curve, whose steps would then
    compare different text: it is "final" ({"step", "mean", "ci95", "n"}, None if no run has one yet). A run
    with fewer evaluations (older code) gives the points it has."""
    curves = {}
    for slug, by_seed in runs.items():
        at, finals = _evaluations(by_seed)
        stats = [mean_ci(list(at[step].values())) for step in sorted(at)]
        final = None
        if finals:
            f = mean_ci([b for _, b in finals.values()])
            final = {"step": max(step for step, _ in finals.values()), "mean": f["mean"], "ci95": f["ci95"],
                     "n": f["n"]}
        curves[slug] = {"steps": sorted(at), "mean": [s["mean"] for s in stats], "ci95": [s["ci95"] for s in stats],
                        "n": [s["n"] for s in stats], "final": final}
    return curves


def _evaluations(by_seed: dict[int, Path]) -> tuple[dict[int, dict[int, float]], dict[int, tuple[int, float]]]:
    """A variant's validation bits per byte from its runs' metrics: ({step: {seed: bpb}} of the periodic
    evaluations (the last record of a step counts), {seed: (step, bpb)} of the final one)."""
    from hybrid_gpt.train.stage import read_metrics

    at: dict[int, dict[int, float]] = {}
    finals: dict[int, tuple[int, float]] = {}
    for seed, ckpt in by_seed.items():
        evals = [m for m in read_metrics(Path(ckpt)) if "val_bpb" in m]
        for m in evals:
            if m.get("val_tokens") == evals[0].get("val_tokens"):
                at.setdefault(m["step"], {})[seed] = m["val_bpb"]
            else:
                finals[seed] = (m["step"], m["val_bpb"])
    return at, finals


def gap_curves(runs: dict[str, dict[int, Path]], variants: list[dict], tokens_per_step: int) -> list[dict]:
    """For each question of :data:`QUESTIONS` whose two patterns were run: other - base validation bits per byte
    at every periodic evaluation both reached, paired by seed, with its 95% t-interval over seeds and the
    tolerance (QUALITY_TOLERANCE of the base's bits per byte there): how a difference grows with the training
    budget, e.g. whether a testbed can see depth (AA - AAAA) and at how many tokens it would."""
    by_layers: dict[str, dict] = {}
    for e in variants:
        by_layers.setdefault(e["layers"], e)
    periodic = {e["slug"]: _evaluations(runs[e["slug"]])[0] for e in by_layers.values()}  # each run read once
    out = []
    for other, base, question in QUESTIONS:
        if other not in by_layers or base not in by_layers:
            continue
        o, b = periodic[by_layers[other]["slug"]], periodic[by_layers[base]["slug"]]
        points = []
        for step in sorted(set(o) & set(b)):
            seeds = sorted(set(o[step]) & set(b[step]))
            if not seeds:
                continue
            d = mean_ci([o[step][k] - b[step][k] for k in seeds])
            tolerance = QUALITY_TOLERANCE * sum(b[step][k] for k in seeds) / len(seeds)
            points.append({"step": step, "tokens": step * tokens_per_step, "difference": d, "tolerance": tolerance,
                           "clear": d["ci95"] is not None and d["ci95"][0] > tolerance})
        out.append({"other": by_layers[other]["spec"], "base": by_layers[base]["spec"], "question": question,
                    "points": points})
    return out


def power_lines(result: dict) -> list[dict]:
    """For each question of :data:`QUESTIONS` whose two patterns were run: other - base bits per byte paired by
    seed, the half-width of its 95% interval now, the tolerance (the verdict's QUALITY_TOLERANCE of the base's mean
    bpb), whether the interval is decided (wholly below or above the tolerance, the verdict's rule), and how many
    seeds would decide it at 80% power at the spread seen (stats.sample_size)."""
    by_layers: dict[str, dict] = {}
    for e in result["variants"]:
        by_layers.setdefault(e["layers"], e)  # the first variant of a pattern, as in the sentences
    out = []
    for other, base, question in QUESTIONS:
        if other not in by_layers or base not in by_layers:
            continue
        o, b = by_layers[other], by_layers[base]
        diffs = [x - y for x, y in zip(o["val_bpb"]["values"], b["val_bpb"]["values"])]
        d = mean_ci(diffs)
        tolerance = QUALITY_TOLERANCE * b["val_bpb"]["mean"]
        half = (d["ci95"][1] - d["ci95"][0]) / 2 if d["ci95"] else None
        decided = judge_interval(d["ci95"], tolerance, higher_is_better=False) is not None
        out.append({"other": o["spec"], "base": b["spec"], "question": question, "difference": d,
                    "half_width": half, "tolerance": tolerance, "decided": decided,
                    "seeds_needed": seeds_needed(diffs, abs(d["mean"] - tolerance))})
    return out


def _decode_speeds(variants, runs, seed: int, device: str, repeats: int) -> dict:
    """Cached decode tokens/s (batch 1, full context) of every variant's first-seed model, interleaved: medians
    ("tok_s"), each repeat's value in repeat order ("tok_s_values": they pair across variants, for a paired ratio of
    any two), and the paired ratios against the first variant ("ratios", see :func:`decode_speeds`)."""
    from hybrid_gpt.checkpoint import load_checkpoint
    from hybrid_gpt.runtime import resolve_device

    dev = resolve_device(device)
    speeds = decode_speeds({v.slug: load_checkpoint(runs[v.slug][seed], dev)[0] for v in variants}, repeats)
    return {"context": speeds["context"], "batch": 1, "repeats": repeats, "seed": seed,
            "tok_s": {k: s["median"] for k, s in speeds["tok_s"].items()},
            "tok_s_values": {k: s["values"] for k, s in speeds["tok_s"].items()}, "ratios": speeds["ratios"],
            "order": speeds["order"], "environment": speeds["environment"]}


def decode_speeds(models: dict[str, GPT], repeats: int) -> dict:
    """Cached greedy decode tokens/s of each model at batch 1, ending at the full context, by bench's estimator
    (interleaved repeats in a shuffled order after a warm-up; N cached steps from a primed cache, so prefill is
    excluded): {"context", "new_tokens", "batch", "repeats", "tok_s": {name: bench's summary}, "ratios": {name:
    {"ratio", "ci95", "n"}: how many times as fast as the FIRST model, the paired ratio of bench.speedup}, "order":
    the models' order in each repeat, "environment"}."""
    from hybrid_gpt.infer.bench import BenchConfig, run_bench
    from hybrid_gpt.infer.timing import speedup

    block = min(m.config.block_size for m in models.values())
    new_tokens = min(DECODE_NEW_TOKENS, block - 1)
    cfg = BenchConfig(contexts=[block], new_tokens=new_tokens, batch_sizes=[1], repeats=repeats, naive=False,
                      peer=False)
    logger.info(f"cached decode speed at context {block}, batch 1, {repeats} interleaved repeats")
    res = run_bench(models, cfg)
    rows = {k: m["rows"][0] for k, m in res["models"].items()}
    first = rows[next(iter(models))]
    return {"context": block, "new_tokens": new_tokens, "batch": 1, "repeats": repeats,
            "tok_s": {k: r["decode_tok_s"] for k, r in rows.items()},
            "ratios": {k: speedup(first, r, "decode_tok_s") for k, r in rows.items()},
            "order": res["order"]["rounds"][0]["orders"], "environment": res["environment"]}


# Which comparisons answer which question: (other, base, what the difference means).
QUESTIONS = (
    ("AAMM", "AANN", "what the per-token MLP adds over dropping the attention"),
    ("AAMM", "AAAA", "what replacing the deep attention costs"),
    ("MMAA", "AAMM", "whether it matters which layers are replaced"),
    ("AA", "AAMM", "whether the deep blocks are needed at all"),
    ("AANN", "AAAA", "what dropping the deep attention costs"),
    ("AA", "AAAA", "whether this testbed can see depth (the half-depth model against the full one)"),
)


def sentences(result: dict) -> list[str]:
    """Plain sentences generated from the numbers: each question the default set answers, when both are present."""
    by_layers: dict[str, dict] = {}
    for e in result["variants"]:
        by_layers.setdefault(e["layers"], e)  # the first variant of a pattern (the default-width one)
    out = []
    for other, base, question in QUESTIONS:
        if other in by_layers and base in by_layers:
            o, b = by_layers[other], by_layers[base]
            out.append(f"{question[0].upper() + question[1:]} — " + judge_pair(
                "validation bits per byte", b["spec"], b["val_bpb"]["values"], o["spec"], o["val_bpb"]["values"],
                "bpb", lower_is_better=True))
    for e in result["variants"]:
        if e["spec"].endswith(":matched") and e["layers"] in by_layers and by_layers[e["layers"]] is not e:
            base = by_layers[e["layers"]]
            out.append(f"Whether width is what the M blocks lack ({e['spec']}: hidden {e['mlp_hidden']}, "
                       f"{e['parameters']:,} parameters) — " + judge_pair(
                           "validation bits per byte", base["spec"], base["val_bpb"]["values"], e["spec"],
                           e["val_bpb"]["values"], "bpb", lower_is_better=True))
    ranked = sorted(result["variants"], key=lambda e: e["val_bpb"]["mean"])
    out.append("Ranked by mean bits per byte: " + ", ".join(f"{e['spec']} {e['val_bpb']['mean']:.4f}" for e in ranked)
               + ".")
    fastest = max(result["variants"], key=lambda e: e["decode_tok_s"])
    out.append(f"Fastest cached decode: {fastest['spec']} at {fastest['decode_tok_s']:,.0f} tokens/s "
               f"(batch 1, context {result['decode']['context']}).")
    return out
