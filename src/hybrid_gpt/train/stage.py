"""Running one training stage (pretrain, SFT or DPO): output-directory rules, --resume and
--overwrite, the process group, and the shared loop.

A stage is described by a :class:`Stage`; the stage modules only say how to build the model and the task.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from hybrid_gpt.checkpoint import is_checkpoint, load_weights, read_config, resolve
from hybrid_gpt.data.tokenizer import Tokenizer
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import exclusive_writer, recover_dir
from hybrid_gpt.model.gpt import GPT, GPTConfig
from hybrid_gpt.presets import DEFAULT_SEED
from hybrid_gpt.runtime import distributed_env, ensure_fits, init_distributed, resolve_device, shutdown_distributed
from hybrid_gpt.train.loop import TrainConfig, TrainResult, train

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


def read_metrics(ckpt: Path) -> list[dict]:
    path = ckpt / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _check_resume(stage: Stage) -> tuple[dict, list[dict]]:
    out = stage.out
    if not is_checkpoint(out) or not (out / "trainer_state.pt").is_file():
        raise HybridGPTError(f"nothing to resume at {out}: no checkpoint with trainer_state.pt there")
    saved_config, saved_training = read_config(out)
    if saved_training.get("stage", stage.name) != stage.name:
        raise HybridGPTError(f"{out} holds a {saved_training['stage']} checkpoint, not {stage.name}")
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
    try:
        state = torch.load(out / "trainer_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged file
        raise HybridGPTError(
            f"{out}/trainer_state.pt is unreadable ({type(e).__name__}); start over with --overwrite"
        ) from e
    return state, read_metrics(out)


def run_stage(stage: Stage, *, device: str = "auto", resume: bool = False, overwrite: bool = False,
              log=print) -> TrainResult:
    if resume and overwrite:
        raise HybridGPTError("--resume and --overwrite contradict each other; pass one")
    _refuse_existing(stage, resume, overwrite)  # before the lock: a refused command leaves no trace
    if distributed_env()[0] != 0:  # only rank 0 writes checkpoints
        return _run_stage(stage, device, resume, overwrite, log)
    with exclusive_writer(stage.out):
        return _run_stage(stage, device, resume, overwrite, log)


def _refuse_existing(stage: Stage, resume: bool, overwrite: bool) -> None:
    old = stage.out.with_name(stage.out.name + ".old")
    if (stage.out.exists() or old.exists()) and not resume and not overwrite:
        raise HybridGPTError(f"{stage.out} already exists; pass --resume to continue it or --overwrite to start over")


def _run_stage(stage: Stage, device: str, resume: bool, overwrite: bool, log) -> TrainResult:
    # Holding the lock, we own every leftover of an earlier writer that was killed mid-save.
    for stale in stage.out.parent.glob(f".{stage.out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    recover_dir(stage.out)
    _refuse_existing(stage, resume, overwrite)
    resume_state, prior_metrics = None, None
    if resume:
        resume_state, prior_metrics = _check_resume(stage)
        if int(resume_state["step"]) >= stage.tcfg.max_steps:
            log(f"{stage.out} is already complete ({resume_state['step']} of {stage.tcfg.max_steps} steps); "
                "nothing to do")
            return TrainResult(step=int(resume_state["step"]), interrupted=False, elapsed=0.0, metrics=prior_metrics)

    # Weights, gradients and AdamW's two moments: 16 bytes per parameter before any activation.
    ensure_fits(16 * stage.config.num_params(), f"training this model ({stage.config.num_params():,} parameters)")
    rank, local_rank, world = distributed_env()
    dev = resolve_device(device, local_rank)
    init_distributed(dev)
    try:
        torch.manual_seed(stage.tcfg.seed)
        model = GPT(stage.config)
        state = load_weights(resolve(stage.out)[1]) if resume_state is not None else stage.init_state
        if state is not None:
            model.load_state_dict(state, strict=False)  # lm_head.weight is tied to transformer.wte.weight
        model.to(dev)
        if rank == 0:
            log(f"{stage.name}: model {stage.config.layers} ({stage.info.get('model_type')}), "
                f"{model.num_params():,} parameters, KV cache {stage.config.kv_bytes_per_token():,} bytes/token "
                f"(fp32); device {dev}" + (f", {world} processes" if world > 1 else ""))
        info = dict(stage.info, stage=stage.name, parameters=model.num_params(), fixed=stage.fixed)
        task = stage.make_task(model, dev)
        return train(model, task, stage.tcfg, stage.out, stage.tokenizer, info, dev, resume_state=resume_state,
                     prior_metrics=prior_metrics, log=log)
    finally:
        shutdown_distributed()


def seed_dir(run_dir: Path, seed: int) -> Path:
    """The default seed trains into the run directory itself (shared with the quick start)."""
    return run_dir if seed == DEFAULT_SEED else run_dir / f"seed-{seed}"


def is_complete(ckpt: Path) -> bool:
    if not is_checkpoint(ckpt):
        return False
    _, training = read_config(ckpt)
    return bool(training.get("complete"))


def run_or_skip(name: str, ckpt: Path, fn, log) -> float:
    """Run (or resume, or skip) one stage; returns the seconds it took in this invocation."""
    if is_complete(ckpt):
        log(f"[pipeline] {name}: complete at {ckpt}, skipped")
        return 0.0
    resume = ckpt.exists() and (ckpt / "trainer_state.pt").is_file()
    log(f"[pipeline] {name}: {'resuming' if resume else 'training'} -> {ckpt}")
    t0 = time.time()
    result = fn(resume=resume, overwrite=ckpt.exists() and not resume)
    if result.interrupted:
        raise KeyboardInterrupt
    return time.time() - t0
