"""Running one training stage (pretrain, SFT or DPO): output-directory rules, --resume and
--overwrite, the process group, and the shared loop.

A stage is described by a :class:`Stage`; the stage modules only say how to build the model and the task.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from hybrid_gpt.checkpoint import (
    CHECKPOINT_FILES,
    is_checkpoint,
    load_state,
    load_weights,
    read_config,
    refuse_foreign,
    resolve,
    weights_limit,
)
from hybrid_gpt.data.tokenizer import Tokenizer
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import claimed_dir, clip, parse_json, read_text, recover_dir
from hybrid_gpt.model.gpt import GPT, GPTConfig
from hybrid_gpt.presets import DEFAULT_SEED
from hybrid_gpt.runtime import distributed_env, ensure_fits, init_distributed, resolve_device, shutdown_distributed
from hybrid_gpt.train.loop import TrainConfig, TrainResult, train

logger = logging.getLogger(__name__)

TRAIN_KEYS = tuple(f.name for f in fields(TrainConfig))
# Settings that may differ on --resume without contradicting the saved run.
RESUMABLE_KEYS = {"max_steps", "eval_interval", "save_interval", "progress", "stop_after", "compile", "eval_tokens",
                  "skip_nonfinite"}


@dataclass
class Stage:
    name: str  # "pretrain", "sft" or "dpo"
    out: Path
    config: GPTConfig
    tokenizer: Tokenizer
    tcfg: TrainConfig
    info: dict  # recorded under "training" in config.json
    make_task: Callable[[GPT, torch.device], object]  # builds the task once the model is on its device
    init_state: dict | None = None  # start from these weights (SFT, DPO); None: fresh initialisation
    fixed: dict = field(default_factory=dict)  # stage settings outside TrainConfig that a resume must keep


METRICS_LIMIT = 1 << 30  # bytes of metrics.jsonl: about five million steps


def read_metrics(ckpt: Path) -> list[dict]:
    """The records of ``<ckpt>/metrics.jsonl`` (none if absent); a damaged file is a one-line error."""
    path = ckpt / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for lineno, line in enumerate(read_text(path, "metrics file", METRICS_LIMIT).split("\n"), start=1):
        if not line.strip():
            continue
        rec = parse_json(line, f"{path}:{lineno}", "the metrics file is damaged")
        step = rec.get("step", 0) if isinstance(rec, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise HybridGPTError(f"{path}:{lineno} is not a metrics record (an object with a whole-number step); "
                                 "the metrics file is damaged")
        records.append(rec)
    return records


def _damaged(out: Path, what: str) -> HybridGPTError:
    return HybridGPTError(f"{out}/trainer_state.pt is damaged ({what}); start over with --overwrite")


def _check_trainer_state(state, out: Path, saved_step) -> dict:
    """The fields of a loaded trainer_state.pt that are read before the model exists."""
    if not isinstance(state, dict):
        raise _damaged(out, f"a {type(state).__name__}, not a dict")
    missing = [k for k in ("step", "optimizer", "rng") if k not in state]
    if missing:
        raise _damaged(out, f"no {', '.join(missing)}")
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise _damaged(out, f"step {clip(step)} is not a whole number >= 0")
    if saved_step is not None and saved_step != step:
        raise _damaged(out, f"step {step}, while config.json says {saved_step}")
    elapsed = state.get("elapsed", 0.0)
    if not isinstance(elapsed, (int, float)) or isinstance(elapsed, bool) or not 0 <= elapsed < float("inf"):
        raise _damaged(out, "elapsed time is not a finite number")
    return state


def _same_kind(saved, fresh) -> bool:
    """Whether an optimizer hyperparameter read from a file has the type of the one AdamW would use."""
    if isinstance(fresh, bool) or fresh is None:
        return saved is None or isinstance(saved, bool)
    if isinstance(fresh, (int, float)):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool) and math.isfinite(saved)
    if isinstance(fresh, tuple):
        return isinstance(saved, (tuple, list)) and len(saved) == len(fresh) and all(
            _same_kind(s, f) for s, f in zip(saved, fresh))
    return True


def _check_optimizer_and_rng(state: dict, out: Path, model: GPT, tcfg: TrainConfig) -> None:
    """Check the optimizer state against ``model`` (parameter groups, hyperparameter types, moment shapes)
    and the random states by a dry run, so the loop never trips over a damaged trainer_state.pt."""
    opt = state["optimizer"]
    if not isinstance(opt, dict) or not isinstance(opt.get("param_groups"), list) or \
            not isinstance(opt.get("state"), dict):
        raise _damaged(out, "the optimizer state is not an optimizer's state dict")
    fresh = torch.optim.AdamW(model.optimizer_groups(tcfg.weight_decay), lr=tcfg.lr)
    groups = fresh.param_groups
    if len(opt["param_groups"]) != len(groups) or any(
            not isinstance(saved, dict) or not isinstance(saved.get("params"), list)
            or len(saved["params"]) != len(ours["params"]) for saved, ours in zip(opt["param_groups"], groups)):
        raise _damaged(out, "its optimizer parameter groups do not match the model's")
    for saved, ours in zip(opt["param_groups"], groups):
        for pid, p in zip(saved["params"], ours["params"]):
            if not isinstance(pid, int) or isinstance(pid, bool):
                raise _damaged(out, "its optimizer parameter ids are not whole numbers")
            moments = opt["state"].get(pid)
            if moments is None:
                continue
            if not isinstance(moments, dict) or "step" not in moments or any(
                    not isinstance(moments.get(k), torch.Tensor) or not moments[k].is_floating_point()
                    or moments[k].shape != p.shape for k in ("exp_avg", "exp_avg_sq")):
                raise _damaged(out, f"the optimizer moments of parameter {pid} do not fit its shape {tuple(p.shape)}")
            # Else the first step would turn them into NaN weights, and the error would blame the training.
            if not (torch.isfinite(moments["exp_avg"]).all() and torch.isfinite(moments["exp_avg_sq"]).all()
                    and (moments["exp_avg_sq"] >= 0).all()):
                raise _damaged(out, f"the optimizer moments of parameter {pid} are not finite (or negative squares)")
    reference = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    try:
        fresh.load_state_dict(opt)  # fills in settings an older PyTorch did not save
    except (ValueError, TypeError, KeyError, RuntimeError, AttributeError) as e:
        raise _damaged(out, f"the optimizer state does not load: {clip(e, 120)}") from e
    for loaded, ref in zip(fresh.param_groups, reference):
        bad = [k for k in ref if not (k in loaded and _same_kind(loaded[k], ref[k]))]
        if bad:
            raise _damaged(out, f"optimizer setting {clip(bad[0])} is missing or of the wrong type")
    rng = state["rng"]
    try:
        torch.Generator().set_state(rng["torch"])
        random.Random().setstate((3, tuple(rng["python"]), None))
        if "cuda" in rng and not (isinstance(rng["cuda"], torch.Tensor) and rng["cuda"].dtype == torch.uint8):
            raise TypeError("the CUDA state is not a byte tensor")
    except (TypeError, ValueError, KeyError, RuntimeError, OverflowError, IndexError) as e:
        raise _damaged(out, f"a bad random-number state: {clip(e, 120)}") from e


def _check_resume(stage: Stage) -> tuple[dict, list[dict]]:
    out = stage.out
    if not is_checkpoint(out) or not (out / "trainer_state.pt").is_file():
        raise HybridGPTError(f"nothing to resume at {out}: no checkpoint with trainer_state.pt there")
    saved_config, saved_training = read_config(out)
    if saved_training.get("stage", stage.name) != stage.name:
        raise HybridGPTError(f"{out} holds a {clip(saved_training['stage'])} checkpoint, not {stage.name}")
    saved_train = saved_training.get("train_config", {})
    ours = asdict(stage.tcfg)
    conflicts = [k for k in TRAIN_KEYS if k not in RESUMABLE_KEYS and k in saved_train and saved_train[k] != ours[k]]
    if saved_config != stage.config:
        conflicts.append("model shape or layer pattern")
    conflicts += [k for k, v in stage.fixed.items() if saved_training.get("fixed", {}).get(k, v) != v]
    if conflicts:
        raise HybridGPTError(
            f"--resume with settings that contradict the saved run in {out}: {', '.join(conflicts)}; "
            "repeat the original command with --resume"
        )
    size, limit = (out / "trainer_state.pt").stat().st_size, weights_limit(stage.config) * 2
    if size > limit:  # AdamW's two moments: twice the weights, at most
        raise _damaged(out, f"{size:,} bytes, more than this model's optimizer state can take")
    try:
        state = torch.load(out / "trainer_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged file
        raise HybridGPTError(
            f"{out}/trainer_state.pt is unreadable ({type(e).__name__}); start over with --overwrite"
        ) from e
    return _check_trainer_state(state, out, saved_training.get("step")), read_metrics(out)


def run_stage(stage: Stage, *, device: str = "auto", resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Run ``stage`` into ``stage.out``: a fresh run refuses an existing directory, ``resume`` continues it,
    ``overwrite`` replaces it (only if it is a checkpoint: see :func:`hybrid_gpt.fsutil.claimed_dir`)."""
    if resume and overwrite:
        raise HybridGPTError("resume and overwrite contradict each other; choose one")
    with claimed_dir(stage.out, allowed=CHECKPOINT_FILES, what="checkpoint", overwrite=overwrite, resume=resume,
                     exists_hint="pass --resume to continue it or --overwrite to start over",
                     writer=distributed_env()[0] == 0):  # only rank 0 writes checkpoints
        refuse_foreign(stage.out)
        return _run_stage(stage, device, resume)


def _run_stage(stage: Stage, device: str, resume: bool) -> TrainResult:
    resume_state, prior_metrics = None, None
    if resume:
        resume_state, prior_metrics = _check_resume(stage)
        if resume_state["step"] >= stage.tcfg.max_steps:
            logger.info(f"{stage.out} is already complete ({resume_state['step']} of {stage.tcfg.max_steps} steps); "
                        "nothing to do")
            return TrainResult(step=resume_state["step"], interrupted=False, elapsed=0.0, metrics=prior_metrics)

    # Weights, gradients and AdamW's two moments: 16 bytes per parameter before any activation.
    rank, local_rank, world = distributed_env()
    dev = resolve_device(device, local_rank)
    ensure_fits(16 * stage.config.num_params(), f"training this model ({stage.config.num_params():,} parameters)", dev)
    init_distributed(dev)
    try:
        torch.manual_seed(stage.tcfg.seed)
        model = GPT(stage.config)
        if resume_state is not None:
            weights = resolve(stage.out)[1]
            load_state(model, load_weights(weights, weights_limit(stage.config)), weights)
            _check_optimizer_and_rng(resume_state, stage.out, model, stage.tcfg)
        elif stage.init_state is not None:
            load_state(model, dict(stage.init_state), Path(stage.info.get("init", "the initial weights")))
        model.to(dev)
        if rank == 0:
            logger.info(f"{stage.name}: model {stage.config.layers} ({stage.info.get('model_type')}), "
                        f"{model.num_params():,} parameters, KV cache {stage.config.kv_bytes_per_token():,} "
                        f"bytes/token (fp32); device {dev}" + (f", {world} processes" if world > 1 else ""))
        info = dict(stage.info, stage=stage.name, parameters=model.num_params(), fixed=stage.fixed)
        task = stage.make_task(model, dev)
        return train(model, task, stage.tcfg, stage.out, stage.tokenizer, info, dev, resume_state=resume_state,
                     prior_metrics=prior_metrics)
    finally:
        shutdown_distributed()


def seed_dir(run_dir: Path, seed: int) -> Path:
    """The default seed trains into the run directory itself (shared with the quick start)."""
    return run_dir if seed == DEFAULT_SEED else run_dir / f"seed-{seed}"


def is_complete(ckpt: Path) -> bool:
    recover_dir(ckpt)  # a crash mid-swap leaves only "<ckpt>.old": that is the checkpoint
    if not is_checkpoint(ckpt):
        return False
    _, training = read_config(ckpt)
    return bool(training.get("complete"))


def run_or_skip(name: str, ckpt: Path, fn) -> float:
    """Run (or resume, or skip) one stage; returns the seconds it took in this invocation."""
    if is_complete(ckpt):
        logger.info(f"[pipeline] {name}: complete at {ckpt}, skipped")
        return 0.0
    resume = ckpt.exists() and (ckpt / "trainer_state.pt").is_file()
    logger.info(f"[pipeline] {name}: {'resuming' if resume else 'training'} -> {ckpt}")
    t0 = time.time()
    result = fn(resume=resume, overwrite=ckpt.exists() and not resume)
    if result.interrupted:
        raise KeyboardInterrupt
    return time.time() - t0
