"""One training loop for every stage (pretrain, SFT, DPO) and for the analyses' short trainings.

A *task* provides the data and the loss:

    task.rows(step) -> a batch object for all rows of the global batch at ``step`` (deterministic)
    task.take(batch, lo, hi) -> the rows lo:hi of it (one micro-batch of this rank)
    task.loss(model, micro) -> (mean loss over the micro-batch rows, {metric: float})
    task.evaluate(model, final, autocast) -> {metric: float}; keys become "val_<key>"
        (optional: a task without it, or with evaluate = None, is never evaluated)
    task.tokens_per_row -> tokens one row holds (for tokens/s)

The loop owns the optimizer, schedule, accumulation, clipping, DDP, autocast, checkpoints and resume.
Without an output directory it trains in memory: no checkpoint, nothing written.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from hybrid_gpt.checkpoint import save_checkpoint
from hybrid_gpt.data.tokenizer import Tokenizer
from hybrid_gpt.errors import HybridGPTError, RunFailure
from hybrid_gpt.model.gpt import GPT
from hybrid_gpt.runtime import distributed_env
from hybrid_gpt.train.config import TrainConfig

logger = logging.getLogger(__name__)

# Validation metrics logged after each evaluation (all of them go to metrics.jsonl).
SHOWN = ("val_loss", "val_bpb", "val_rewards/accuracies", "val_rewards/margins")


def format_eval(ev: dict) -> str:
    return "validation " + ", ".join(f"{k.removeprefix('val_')} {ev[k]:.4f}" for k in SHOWN if k in ev)


def cosine_lr(step: int, max_steps: int, lr: float, warmup_steps: int = 0, min_lr_ratio: float = 0.1) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``
    (held after it). A pure function of the step, so a resumed run continues the same schedule."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    ratio = min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr * ratio


@dataclass
class TrainResult:
    step: int
    interrupted: bool
    elapsed: float
    metrics: list[dict] = field(default_factory=list)
    best_step: int | None = None  # with early stopping: the evaluation whose weights the model holds
    stopped_early: bool = False  # the metric stopped improving before max_steps

    @property
    def final_eval(self) -> dict:
        evals = [m for m in self.metrics if "val_loss" in m]
        return evals[-1] if evals else {}


class _StopFlag:
    """Turn SIGINT/SIGTERM into a flag checked between steps, so the loop can save before exiting."""

    def __init__(self):
        self.signal = None

    @contextmanager
    def installed(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.signal is not None:  # a second Ctrl-C: stop now
                signal.signal(signum, old[signum] if callable(old[signum]) else signal.SIG_DFL)
                raise KeyboardInterrupt
            self.signal = signum

        for s in old:
            signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)  # every device's generator too
    random.seed(seed)


def _restore_rng(resume_state: dict, seed: int, rank: int, world: int, step: int, device: torch.device) -> None:
    """Each rank takes back its own random state; a checkpoint of another world size (or one written before
    states were kept per rank) has only rank 0's, and the other ranks then draw from a seed of their own."""
    per_rank = resume_state.get("rng_ranks")
    if per_rank and len(per_rank) == world:
        _set_rng_state(per_rank[rank], device)
        return
    _set_rng_state(resume_state["rng"], device)
    if rank:
        _seed(seed + rank + world * step)


def train(model: GPT, task, cfg: TrainConfig, out_dir: str | Path | None = None, tokenizer: Tokenizer | None = None,
          info: dict | None = None, device: torch.device | None = None, resume_state: dict | None = None,
          prior_metrics: list[dict] | None = None) -> TrainResult:
    """Run ``task`` on ``model`` until ``cfg.max_steps``, saving checkpoints to ``out_dir``.

    ``out_dir`` None trains in memory: nothing is written and the trained model is the caller's ``model``
    (the analyses' short trainings). ``resume_state`` is a loaded trainer_state.pt; the model must already
    hold the matching weights. Each rank seeds its random generators with ``cfg.seed + rank``, so that
    ranks draw different dropout masks while one process keeps ``cfg.seed``; the data order depends only
    on the task's rows(step), never on these generators.
    """
    cfg.validate()
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is None and resume_state is not None:
        raise HybridGPTError("a resumed run needs its checkpoint directory")
    if cfg.patience and (out_dir is not None or distributed_env()[2] > 1 or getattr(task, "evaluate", None) is None):
        raise HybridGPTError("early stopping (patience) needs an in-memory run on one process with an evaluated task")
    run = _Run(model, task, cfg, out_dir, tokenizer, dict(info or {}),
               device if device is not None else next(model.parameters()).device, resume_state, prior_metrics)
    return run.loop()


class _Run:
    """One call of :func:`train`: the batch split over ranks and micro-batches, the optimizer, the step counter
    and metrics, the best weights under early stopping, and the methods of one step, one evaluation and one
    checkpoint."""

    def __init__(self, model: GPT, task, cfg: TrainConfig, out_dir: Path | None, tokenizer, info: dict,
                 device: torch.device, resume_state: dict | None, prior_metrics: list[dict] | None):
        self.task, self.cfg, self.out_dir, self.tokenizer, self.info, self.device = (task, cfg, out_dir, tokenizer,
                                                                                     info, device)
        self.rank, _, self.world = distributed_env()
        self.master = self.rank == 0
        rows_global = cfg.batch_size * cfg.grad_accum
        if rows_global % self.world:
            raise HybridGPTError(
                f"the global batch ({cfg.batch_size} x {cfg.grad_accum} = {rows_global} rows) must divide evenly "
                f"over {self.world} processes; change batch_size or grad_accum"
            )
        self.rows_rank = rows_global // self.world
        micro = min(cfg.batch_size, self.rows_rank)
        self.chunks = [(lo, min(lo + micro, self.rows_rank)) for lo in range(0, self.rows_rank, micro)]
        _seed(cfg.seed + self.rank)
        model.to(device)
        self.raw_model = model
        self.optimizer = torch.optim.AdamW(model.optimizer_groups(cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95),
                                           eps=1e-8, fused=device.type == "cuda")
        self.step = 0
        self.metrics: list[dict] = list(prior_metrics or [])
        if resume_state is not None:
            self.optimizer.load_state_dict(resume_state["optimizer"])
            self.step = int(resume_state["step"])
            _restore_rng(resume_state, cfg.seed, self.rank, self.world, self.step, device)
            self.metrics = [m for m in self.metrics if m.get("step", 0) <= self.step]
        if cfg.compile:
            model = torch.compile(model)
        if self.world > 1:
            device_ids = [device.index] if device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self.model = model
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
        self.tokens_per_step = task.tokens_per_row * rows_global
        self.evaluate = getattr(task, "evaluate", None)
        self.best = {"value": math.inf, "step": None, "state": None, "misses": 0}
        self.elapsed_before = float(resume_state.get("elapsed", 0.0)) if resume_state else 0.0
        self.t_start = time.time()

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.t_start

    def loop(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (cfg.progress and self.master),
                        unit="step", dynamic_ncols=True, desc=self.info.get("stage", "train"))
        stop = _StopFlag()
        interrupted = stopped_early = False
        self.t_start = time.time()
        self.model.train()
        if cfg.eval_at_start and self.step == 0:
            self.run_eval(final=False)
        with stop.installed():
            while self.step < cfg.max_steps:
                self.one_step()
                last = self.step == cfg.max_steps
                if (self.step % cfg.eval_interval == 0 or last) and self.run_eval(final=last):
                    stopped_early = True
                    break
                requested = self.stop_requested(stop)
                if self.out_dir is not None and (last or requested or self.step % (cfg.save_interval
                                                                                   or cfg.eval_interval) == 0):
                    self.snapshot(final=last)
                    if self.world > 1:
                        dist.barrier()
                if requested and not last:
                    interrupted = True
                    break
        self.bar.close()
        if self.best["state"] is not None:
            self.raw_model.load_state_dict(self.best["state"])
        return TrainResult(step=self.step, interrupted=interrupted, elapsed=self.elapsed(), metrics=self.metrics,
                           best_step=self.best["step"], stopped_early=stopped_early)

    def one_step(self) -> None:
        """One optimizer step over this rank's micro-batches; a non-finite loss or gradient fails the run, or with
        skip_nonfinite skips the update (recorded)."""
        cfg, t0 = self.cfg, time.time()
        lr = cosine_lr(self.step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_value, extra = self.accumulate(self.task.rows(self.step))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip or float("inf"))
        finite = math.isfinite(loss_value) and bool(torch.isfinite(grad_norm))
        if not finite and not cfg.skip_nonfinite:
            self.bar.close()
            what = f"loss or gradient became non-finite at step {self.step + 1} (loss {loss_value})"
            if self.out_dir is None:
                raise RunFailure(f"{self.info.get('stage', 'training')}: {what}; try a lower learning rate")
            raise RunFailure(f"{what}; the last good checkpoint in {self.out_dir} is kept; try a lower --lr, "
                             "or --skip-nonfinite")
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        rec = {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
               "tokens_per_sec": self.tokens_per_step / max(time.time() - t0, 1e-9), "elapsed": self.elapsed(),
               **extra}
        if not finite:
            rec["skipped"] = True
            logger.warning(f"step {self.step}: non-finite loss or gradient; batch skipped")
        self.metrics.append(rec)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{rec['tokens_per_sec']:,.0f}")

    def accumulate(self, batch) -> tuple[float, dict[str, float]]:
        """Forward and backward over this rank's rows of ``batch`` in micro-batches (gradients synchronised at the
        last one only); returns the loss averaged over ranks and the task's extra metrics."""
        loss_sum = torch.zeros((), device=self.device)
        extra_sum: dict[str, float] = {}
        offset = self.rank * self.rows_rank
        for i, (lo, hi) in enumerate(self.chunks):
            micro_batch = self.task.take(batch, offset + lo, offset + hi, self.device)
            sync = nullcontext() if (self.world == 1 or i == len(self.chunks) - 1) else self.model.no_sync()
            with sync:
                with self.autocast():
                    loss, extra = self.task.loss(self.model, micro_batch)
                weight = (hi - lo) / self.rows_rank
                (loss * weight).backward()
            loss_sum += loss.detach() * weight
            for k, v in extra.items():
                extra_sum[k] = extra_sum.get(k, 0.0) + v * weight
        if self.world > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        return loss_sum.item(), extra_sum

    def stop_requested(self, stop: _StopFlag) -> bool:
        """A signal or stop_after; under DDP every rank must agree, or the others would hang in all_reduce."""
        requested = stop.signal is not None or bool(self.cfg.stop_after and self.step >= self.cfg.stop_after)
        if self.world > 1:
            flag = torch.tensor([1.0 if requested else 0.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = bool(flag.item())
        return requested

    def run_eval(self, final: bool) -> bool:
        """Evaluate; True when early stopping says to stop."""
        if not (self.master and self.evaluate is not None):
            return False
        res = self.evaluate(self.raw_model, final, self.autocast)
        rec = {"step": self.step, **{f"val_{k}": v for k, v in res.items()}}
        self.metrics.append(rec)
        if any(k in rec for k in SHOWN):
            logger.info(f"step {self.step}: {format_eval(rec)}")
        if not self.cfg.patience:
            return False
        value, best = rec[f"val_{self.cfg.stop_metric}"], self.best
        if value < best["value"]:
            best.update(value=value, step=self.step, misses=0,
                        state={k: v.detach().clone() for k, v in self.raw_model.state_dict().items()})
            return False
        best["misses"] += 1
        return best["misses"] >= self.cfg.patience

    def snapshot(self, final: bool) -> None:
        """The checkpoint at this step (rank 0 writes it; every rank's generators go into its trainer state)."""
        rng = _rng_state(self.device)
        per_rank = None
        if self.world > 1:  # every rank's generators, so that a resume gives each its own back
            per_rank = [None] * self.world
            dist.all_gather_object(per_rank, rng)
        if not self.master:
            return
        cfg, step, metrics = self.cfg, self.step, self.metrics
        state = {"step": step, "optimizer": self.optimizer.state_dict(), "rng": rng, "elapsed": self.elapsed()}
        if per_rank is not None:
            state["rng_ranks"] = per_rank
        training = dict(self.info, step=step, max_steps=cfg.max_steps, complete=final and step >= cfg.max_steps,
                        tokens_seen=step * self.tokens_per_step, train_config=asdict(cfg), world_size=self.world,
                        skipped_steps=sum(1 for m in metrics if m.get("skipped")))
        evals = [m for m in metrics if "val_loss" in m]
        if evals:  # its scalars: per-item lists (DPO's per-pair margins) stay in metrics.jsonl
            training["last_eval"] = {k: v for k, v in evals[-1].items() if not isinstance(v, list)}
        save_checkpoint(self.out_dir, self.raw_model, self.tokenizer, training, trainer_state=state,
                        files={"metrics.jsonl": "".join(json.dumps(m) + "\n" for m in metrics)})
        logger.debug(f"step {step}: checkpoint saved to {self.out_dir}")
