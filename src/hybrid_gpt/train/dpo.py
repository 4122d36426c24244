"""Direct Preference Optimization (Rafailov et al., 2023) through the shared loop.

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

Sequence log-probabilities are summed over the response tokens only; the reference is the frozen
starting model (the SFT checkpoint), run without gradients. Metric names follow TRL's.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hybrid_gpt.data.template import render, training_example
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.model.gpt import GPT
from hybrid_gpt.train.config import DEFAULT_BETA, MAX_BETA
from hybrid_gpt.train.evaluate import evaluating
from hybrid_gpt.train.finetune import LazyExamples, pad_batch
from hybrid_gpt.train.loop import TrainResult
from hybrid_gpt.train.sft import prepare_finetune
from hybrid_gpt.train.stage import Stage, run_stage

EVAL_PAIRS = 512  # held-out pairs scored at each periodic evaluation
FINAL_EVAL_PAIRS = 4096  # ... and at the final one (all of them, if fewer)
EVAL_BATCH = 32  # pairs per forward pass when evaluating


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of log-probabilities of the target tokens (targets < 0 are not counted), per row."""
    logps = torch.log_softmax(logits.float(), dim=-1)
    mask = targets >= 0
    picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """(mean loss, metrics) from per-pair sequence log-probabilities."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen - rejected).mean()
    metrics = {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/accuracies": (chosen > rejected).float().mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "logps/chosen": policy_chosen.detach().mean().item(),
        "logps/rejected": policy_rejected.detach().mean().item(),
    }
    return loss, metrics


def encode_pair(tok, p: dict, block_size: int):
    """(chosen example, rejected example), or None unless both keep a response token.

    The prompt is cropped once for both, as TRL does: the oldest turns are dropped until the longer
    response fits, so the two examples always share the same prompt turns and differ only in the
    response (cropped separately, one could keep a turn the other lost). A response too long for any
    prompt turn leaves both without one."""
    conversations = [p["prompt"] + [{"role": "assistant", "content": p[k]}] for k in ("chosen", "rejected")]
    drop = max(render(tok, c, block_size + 1).cropped_turns for c in conversations)
    chosen, rejected = (training_example(tok, c[drop:], block_size) for c in conversations)
    return (chosen, rejected) if chosen is not None and rejected is not None else None


def encode_pairs(tok, pairs: list[dict], block_size: int, what: str) -> tuple[list[int], list]:
    """(the indices of the pairs kept, their examples): a pair without a response token in the context is left
    out, and the indices say which, so that two models' per-pair results can be paired."""
    encoded = [encode_pair(tok, p, block_size) for p in pairs]
    kept = [i for i, e in enumerate(encoded) if e is not None]
    if not kept:
        raise HybridGPTError(f"no {what} preference pair keeps a response token within a context of {block_size}")
    return kept, [encoded[i] for i in kept]


class DPOTask:
    def __init__(self, tok, reference: GPT, train_pairs, val_pairs, block_size: int, beta: float, seed: int,
                 rows_global: int):
        self.pad_id, self.reference, self.beta = tok.end_id, reference.eval(), beta
        for p in self.reference.parameters():
            p.requires_grad_(False)
        self.train = LazyExamples(train_pairs, lambda p: encode_pair(tok, p, block_size), "training pair")
        self.val_total = min(len(val_pairs), FINAL_EVAL_PAIRS)
        self.val_index, self.val = encode_pairs(tok, val_pairs[:FINAL_EVAL_PAIRS], block_size, "validation")
        self.seed, self.rows_global = seed, rows_global
        self.tokens_per_row = int(np.mean([len(c[0]) + len(r[0]) for c, r in self.val]))
        self._val_ref: torch.Tensor | None = None  # reference log-probs [2, k] of the first k validation pairs

    def rows(self, step: int):
        return np.random.default_rng([self.seed, step]).integers(0, len(self.train), self.rows_global)

    def _batch(self, pairs, device):
        """Chosen rows first, then rejected rows, in one padded batch."""
        return (*pad_batch([c for c, _ in pairs] + [r for _, r in pairs], self.pad_id, device), len(pairs))

    def take(self, idx, lo: int, hi: int, device):
        return self._batch([self.train[i] for i in idx[lo:hi]], device)

    def _logps(self, model, x, y, n):
        lp = sequence_logps(model(x), y)
        return lp[:n], lp[n:]

    def loss(self, model, micro):
        x, y, n = micro
        pc, pr = self._logps(model, x, y, n)
        with torch.no_grad():
            rc, rr = self._logps(self.reference, x, y, n)
        return dpo_loss(pc, pr, rc, rr, self.beta)

    @torch.no_grad()
    def evaluate(self, model, final: bool, autocast=nullcontext) -> dict:
        pairs = self.val if final else self.val[:EVAL_PAIRS]
        policy = []
        with evaluating(model) as model:
            device = next(model.parameters()).device
            for i in range(0, len(pairs), EVAL_BATCH):
                x, y, n = self._batch(pairs[i:i + EVAL_BATCH], device)
                known = 0 if self._val_ref is None else self._val_ref.size(1)
                with autocast():
                    policy.append(torch.stack(self._logps(model, x, y, n)))
                    if i + n > known:  # the reference scores each pair once, whatever the evaluations' sizes
                        new = torch.stack(self._logps(self.reference, x, y, n))[:, known - i:]
                        self._val_ref = new if self._val_ref is None else torch.cat([self._val_ref, new], dim=1)
        policy, ref = torch.cat(policy, dim=1), self._val_ref[:, :len(pairs)]
        loss, metrics = dpo_loss(policy[0], policy[1], ref[0], ref[1], self.beta)
        # A 95% interval for the accuracy (normal approximation), so "above 0.5" can be judged.
        acc = metrics["rewards/accuracies"]
        half = 1.96 * math.sqrt(max(acc * (1 - acc), 1e-12) / len(pairs))
        out = {"loss": loss.item(), **metrics, "rewards/accuracies_ci95": [acc - half, acc + half],
               "pairs": len(pairs)}
        if final:
            out["pair_margins"] = self.pair_margins(policy, ref)
        return out

    def pair_margins(self, policy: torch.Tensor, ref: torch.Tensor) -> list[float | None]:
        """The reward margin beta * [(pi - ref)(chosen) - (pi - ref)(rejected)] of every validation pair, in the
        validation file's order (None for a pair left out for want of a response token): the model ranks the
        chosen reply first exactly where the margin is > 0. Kept per pair so that two models scored on the same
        pairs can be compared pair by pair (a paired test), not only by their accuracies."""
        margins = self.beta * (policy[0] - ref[0]) - self.beta * (policy[1] - ref[1])  # as dpo_loss computes it
        out: list[float | None] = [None] * self.val_total
        for i, m in zip(self.val_index, margins.tolist()):
            out[i] = float(f"{m:.9g}")  # float32's precision, in fewer characters; the sign is kept
        return out


def run_dpo(*, run_dir: str | Path, preset: str, model_type: str | None = None, layers: str | None = None,
            init: str | None = None, out: str | None = None, dpo_data: str | None = None,
            dpo_val_data: str | None = None, chat_dir: str | None = None, beta: float = DEFAULT_BETA,
            overrides: dict | None = None, device: str = "auto", resume: bool = False,
            overwrite: bool = False) -> TrainResult:
    if not 0 < beta <= MAX_BETA:  # also refuses nan
        raise HybridGPTError(f"beta must be in (0, {MAX_BETA:g}], got {beta}")
    run_dir = Path(run_dir)
    name, init_path, reference, tok, train_pairs, val_pairs, tcfg, info = prepare_finetune(
        "dpo", run_dir, preset, model_type, layers, init, chat_dir, dpo_data, dpo_val_data, overrides)
    info |= {"reference": "init", "beta": beta, "train_pairs": len(train_pairs), "val_pairs": len(val_pairs)}
    config = reference.config

    def make_task(_model, device):
        return DPOTask(tok, reference.to(device), train_pairs, val_pairs, config.block_size, beta, tcfg.seed,
                       tcfg.batch_size * tcfg.grad_accum)

    stage = Stage(name="dpo", out=Path(out) if out else run_dir / f"dpo-{name}", config=config, tokenizer=tok,
                  tcfg=tcfg, info=info, make_task=make_task,
                  init_state=reference.state_dict(),  # copied into the new model before the task moves it
                  fixed={"init": str(init_path.resolve()), "beta": beta})
    return run_stage(stage, device=device, resume=resume, overwrite=overwrite)
