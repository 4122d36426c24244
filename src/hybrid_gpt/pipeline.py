"""The whole experiment as one resumable command:
prepare -> pretrain -> SFT -> DPO -> eval -> bench -> report, for both model types and every seed.

A stage whose checkpoint is complete is skipped; one that was interrupted is resumed.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hybrid_gpt.checkpoint import load_checkpoint
from hybrid_gpt.data.tokens import TokenData, ensure_prepared, read_meta
from hybrid_gpt.infer.bench import BenchConfig, run_bench
from hybrid_gpt.presets import DEFAULT_SEED
from hybrid_gpt.runtime import resolve_device
from hybrid_gpt.train.evaluate import EVAL_TOKENS, evaluate_lm
from hybrid_gpt.train.stage import read_metrics, run_or_skip, seed_dir

logger = logging.getLogger(__name__)

MODEL_TYPES = ("standard", "hybrid")
SAMPLE_PROMPT = "ROMEO:"
CHAT_PROMPTS = ("What news from Verona?", "Good morrow, my lord. How fares the king?", "Who goes there?")


@dataclass
class PipelineOptions:
    run_dir: Path
    preset: str
    seeds: list[int] = field(default_factory=lambda: [DEFAULT_SEED])
    device: str = "auto"
    bench: BenchConfig = field(default_factory=BenchConfig)
    progress: bool = False
    overrides: dict = field(default_factory=dict)  # per stage: {"pretrain": {...}, "sft": {...}, "dpo": {...}}
    command: str = ""
    full: bool = False  # also run the hypothesis tests (ablate --quick, importance, distill, probe) and the verdict


def run_pipeline(opts: PipelineOptions) -> tuple[Path, dict]:
    """Prepare, train every stage of both models for every seed (finished stages skipped), evaluate, bench the
    first seed's aligned models, take samples and write the report; returns (report path, results)."""
    from hybrid_gpt.data.chat_data import is_chat_prepared, prepare_chat_data

    run_dir = Path(opts.run_dir)
    t_start = time.time()
    device = resolve_device(opts.device)  # the stages' device: evaluation, bench and samples run there too
    data_dir, chat_dir = run_dir / "data", run_dir / "chat"
    corpus = ensure_prepared(data_dir, opts.preset)
    if not is_chat_prepared(chat_dir, corpus, DEFAULT_SEED):
        logger.info(f"[pipeline] prepare-chat -> {chat_dir}")
        prepare_chat_data(corpus, chat_dir)
    data = TokenData.open(data_dir)
    timings = _train_stages(opts, run_dir, data_dir, chat_dir)

    logger.info(f"[pipeline] evaluating on {device}")
    per_seed: dict[str, dict] = {mt: {} for mt in MODEL_TYPES}
    curves: dict[str, dict] = {mt: {} for mt in MODEL_TYPES}
    for seed in opts.seeds:
        for mt in MODEL_TYPES:
            per_seed[mt][seed] = _figures(seed_dir(run_dir, seed), mt, data, device,
                                          curves[mt] if seed == opts.seeds[0] else None)

    first = seed_dir(run_dir, opts.seeds[0])
    logger.info("[pipeline] benchmarking the aligned models (seed %d)" % opts.seeds[0])
    models = {mt: load_checkpoint(first / f"dpo-{mt}", device)[0] for mt in MODEL_TYPES}
    bench = run_bench(models, opts.bench)

    logger.info("[pipeline] samples and chat replies")
    samples = _samples(first, device)
    meta = read_meta(data_dir)
    results = {
        "preset": opts.preset, "seeds": opts.seeds, "run_dir": str(run_dir),
        "per_seed": {mt: {str(s): f for s, f in v.items()} for mt, v in per_seed.items()},
        "bench": bench, "samples": samples, "curves": curves, "timings": timings,
        "machine": bench["environment"],  # the benchmark's record of the machine, versions and kernels
        "data": {k: meta[k] for k in ("source", "vocab_size", "splits")},
        "command": opts.command or " ".join(shlex.quote(a) for a in ["hybrid-gpt", *sys.argv[1:]]),
        "pipeline_seconds": time.time() - t_start,
    }
    from hybrid_gpt.report import write_report

    report = write_report(results, run_dir)
    if opts.full:
        from hybrid_gpt.fsutil import write_text

        results["hypothesis"] = run_hypothesis_tests(first, opts.preset, opts.device, opts.progress)
        write_text(report, report.read_text() + "\n" + (first / "hypothesis.md").read_text())
    return report, results


def _train_stages(opts: PipelineOptions, run_dir: Path, data_dir: Path, chat_dir: Path) -> dict[str, dict]:
    """Pretrain, SFT and DPO of both model types for every seed (run, resumed or skipped); the seconds each took
    in this invocation, by "<seed>/<model type>"."""
    from hybrid_gpt.train.dpo import run_dpo
    from hybrid_gpt.train.pretrain import run_pretrain
    from hybrid_gpt.train.sft import run_sft

    timings: dict[str, dict] = {}
    for seed in opts.seeds:
        sd = seed_dir(run_dir, seed)
        for mt in MODEL_TYPES:
            common = dict(preset=opts.preset, device=opts.device)

            def ov(stage):
                return {**opts.overrides.get(stage, {}), "seed": seed, "progress": opts.progress}

            t = timings.setdefault(f"{seed}/{mt}", {})
            t["pretrain"] = run_or_skip(f"pretrain {mt} seed {seed}", sd / f"pretrain-{mt}", lambda **kw: run_pretrain(
                run_dir=sd, model_type=mt, data_dir=data_dir, overrides=ov("pretrain"), **common, **kw))
            t["sft"] = run_or_skip(f"sft {mt} seed {seed}", sd / f"sft-{mt}", lambda **kw: run_sft(
                run_dir=sd, model_type=mt, chat_dir=str(chat_dir), overrides=ov("sft"), **common, **kw))
            t["dpo"] = run_or_skip(f"dpo {mt} seed {seed}", sd / f"dpo-{mt}", lambda **kw: run_dpo(
                run_dir=sd, model_type=mt, chat_dir=str(chat_dir), overrides=ov("dpo"), **common, **kw))
    return timings


def _figures(sd: Path, mt: str, data: TokenData, device, curves: dict | None) -> dict:
    """One seed's figures of one model type: held-out loss and bpb of the pretrained and aligned checkpoints,
    each stage's last evaluation and training time, parameters and KV cache; ``curves`` (the first seed's)
    receives each stage's training and validation curve."""
    figures = {}
    for stage in ("pretrain", "dpo"):
        model, _, _ = load_checkpoint(sd / f"{stage}-{mt}", device)
        ev = evaluate_lm(model, data.val, data.tokenizer.token_byte_lengths(), EVAL_TOKENS)
        figures[f"{stage}_val_loss"], figures[f"{stage}_val_bpb"] = ev["loss"], ev["bpb"]
    for stage in ("pretrain", "sft", "dpo"):
        metrics = read_metrics(sd / f"{stage}-{mt}")
        evals = [m for m in metrics if "val_loss" in m]
        steps = [m for m in metrics if "loss" in m]
        if stage == "sft":
            figures["sft_val_loss_start"], figures["sft_val_loss"] = evals[0]["val_loss"], evals[-1]["val_loss"]
        if stage == "dpo":
            figures.update(_dpo_figures(evals[-1]))
        figures[f"{stage}_train_seconds"] = steps[-1]["elapsed"] if steps else None
        figures[f"{stage}_train_tokens_per_sec"] = (
            sorted(m["tokens_per_sec"] for m in steps)[len(steps) // 2] if steps else None)
        if curves is not None:
            curves[stage] = {"train": [(m["step"], m["loss"]) for m in steps],
                             "val": [(m["step"], m["val_loss"]) for m in evals]}
    figures["parameters"] = model.num_params()
    figures["kv_bytes_per_token"] = model.config.kv_bytes_per_token()
    figures["layers"] = model.config.layers
    return figures


def _dpo_figures(last: dict) -> dict:
    """The DPO stage's last evaluation as the report's figures."""
    figures = {f"dpo_val_{k}": last[f"val_{k}"]
               for k in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")}
    # The preference loss; "dpo_val_loss" is the aligned model's language-model loss.
    figures["dpo_val_preference_loss"] = last["val_loss"]
    figures["dpo_val_rewards/accuracies_ci95"] = last.get("val_rewards/accuracies_ci95")
    figures["dpo_val_pairs"] = last.get("val_pairs")
    # Every validation pair's reward margin, for the report's paired test (None: an older run).
    figures["dpo_val_pair_margins"] = last.get("val_pair_margins")
    return figures


def run_hypothesis_tests(run_dir: Path, preset: str, device: str = "auto", progress: bool = False) -> dict:
    """The analyses of `pipeline --full`, each skipped when its output already exists (delete it to redo one),
    then the verdict. Uses the run directory's pretrained standard model as teacher and subject."""
    from hybrid_gpt.analysis.ablate import run_ablate
    from hybrid_gpt.analysis.distill import run_distill
    from hybrid_gpt.analysis.importance import run_importance
    from hybrid_gpt.analysis.probe import run_probe
    from hybrid_gpt.analysis.verdict import write_verdict
    from hybrid_gpt.presets import get_preset, layer_pattern

    hybrid = layer_pattern("hybrid", None, get_preset(preset)["n_layer"])[0]
    logger.info("[pipeline] hypothesis tests: ablate --quick")
    run_ablate(run_dir=run_dir, preset=preset, quick=True, device=device, progress=progress)
    teacher = run_dir / "pretrain-standard"
    if not (run_dir / "importance" / teacher.name / "importance.json").is_file():
        logger.info("[pipeline] hypothesis tests: importance")
        run_importance(teacher, device=device)
    if not (run_dir / f"distill-{hybrid}" / "distill.json").is_file():
        logger.info(f"[pipeline] hypothesis tests: distill {hybrid}")
        run_distill(teacher, layers=hybrid, device=device, progress=progress)
    if not (run_dir / "probe" / "probe.json").is_file():
        logger.info("[pipeline] hypothesis tests: probe")
        run_probe(run_dir=run_dir, preset=preset, device=device, progress=progress)
    return write_verdict(run_dir)


def _samples(sd: Path, device) -> dict:
    from hybrid_gpt.infer.chat import ChatSession
    from hybrid_gpt.infer.engine import generate

    out = {}
    for mt in MODEL_TYPES:
        model, tok, _ = load_checkpoint(sd / f"pretrain-{mt}", device)
        idx = torch.tensor([tok.prompt_ids(SAMPLE_PROMPT)], device=device)
        ids = [int(t) for t in generate(model, idx, 60, temperature=0)]
        greedy = SAMPLE_PROMPT + tok.decode(ids)
        model, tok, _ = load_checkpoint(sd / f"dpo-{mt}", device)
        replies = []
        for prompt in CHAT_PROMPTS:
            session = ChatSession(model, tok, max_new_tokens=60, temperature=0.8, top_k=50, seed=1)
            replies.append({"user": prompt, "assistant": "".join(session.reply(prompt))})
        out[mt] = {"prompt": SAMPLE_PROMPT, "greedy_pretrain_sample": greedy, "chat": replies}
    return out

