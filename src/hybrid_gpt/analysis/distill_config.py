"""The distillation's options (DistillConfig) and per-preset defaults, torch-free: the CLI builds
`hybrid-gpt distill`'s flags from them without loading torch; analysis/distill.py runs them."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.options import MAX_REPEATS, MAX_TOKENS, MAX_WIDTH, option, pattern_problem
from hybrid_gpt.presets import DEFAULT_SEED
from hybrid_gpt.train.config import EVAL_TOKENS, MAX_ROWS, MAX_STEPS

logger = logging.getLogger(__name__)

# Per preset (read from the teacher's config.json): distillation and fine-tune steps, learning rates,
# rows per batch, and the held-out tokens for the MSE (mse_tokens) and for bits per byte (eval_tokens).
DEFAULTS = {
    "smoke": dict(steps=60, finetune_steps=10, lr=1e-2, finetune_lr=3e-4, batch_size=8, mse_tokens=2048,
                  eval_tokens=4096),
    "cpu": dict(steps=300, finetune_steps=200, lr=1e-2, finetune_lr=3e-4, batch_size=32, mse_tokens=16384,
                eval_tokens=EVAL_TOKENS),
    "seed": dict(steps=1000, finetune_steps=500, lr=3e-3, finetune_lr=1e-4, batch_size=64, mse_tokens=32768,
                 eval_tokens=EVAL_TOKENS),
}
DECODE_REPEATS = 5


@dataclass
class DistillConfig:
    """Every option of a distillation run, each with its default once. None: the value of the teacher's
    preset (DEFAULTS; the teacher's own M width for mlp_hidden, <checkpoint's parent>/distill-<layers> for
    out_dir)."""

    layers: str = option(required=True, check=pattern_problem, metavar="PATTERN",
                         help="target pattern, e.g. AAMM (A->M distilled, A->N dropped)")
    out_dir: str | Path | None = option(None, kind="outdir", flags=("--out",),
                                        help="output directory (default: <checkpoint's parent>/distill-<layers>)")
    steps: int | None = option(None, lo=1, hi=MAX_STEPS, help="distillation steps per layer (default: the preset's)")
    finetune_steps: int | None = option(None, lo=0, hi=MAX_STEPS,
                                        help="whole-model fine-tune steps after the swap (0: none)")
    lr: float | None = option(None, lo=0, lo_open=True, help="distillation learning rate (default: the preset's)")
    finetune_lr: float | None = option(None, lo=0, lo_open=True, help="fine-tune learning rate (default: the preset's)")
    batch_size: int | None = option(None, lo=1, hi=MAX_ROWS, help="rows per step, both phases (default: the preset's)")
    mse_tokens: int | None = option(None, lo=1, hi=MAX_TOKENS,
                                    help="held-out tokens for the MSE (default: the preset's)")
    eval_tokens: int | None = option(None, lo=1, hi=MAX_TOKENS,
                                     help="held-out tokens for bits per byte (default: the preset's)")
    mlp_hidden: int | None = option(None, lo=1, hi=MAX_WIDTH,
                                    help="hidden width of the M blocks (default: the teacher's, else n_embd / 4)")
    decode_repeats: int = option(DECODE_REPEATS, lo=1, hi=MAX_REPEATS, help="interleaved decode-speed repeats")
    seed: int = option(DEFAULT_SEED, kind="seed", help="random seed")
    data_dir: str | Path | None = option(None, kind="input", flags=("--data",),
                                         help="prepared data directory (default: the one the teacher was trained on)")
    device: str = option("auto", metavar="NAME", help="auto, cpu, cuda or mps")
    overwrite: bool = option(False, help="replace an earlier distill output in --out")

    def resolved(self, preset: str | None) -> "DistillConfig":
        """This config with every preset default filled in, checked."""
        if preset not in DEFAULTS:
            logger.warning(f"the teacher records no known preset ({preset!r}); using the cpu preset's distillation "
                           "defaults")
        values = {k: v for k, v in DEFAULTS.get(preset, DEFAULTS["cpu"]).items() if getattr(self, k) is None}
        cfg = replace(self, **values)
        for name in ("steps", "batch_size", "mse_tokens", "eval_tokens", "decode_repeats"):
            if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
                raise HybridGPTError(f"distill {name} must be a positive integer, got {getattr(cfg, name)!r}")
        if not isinstance(cfg.finetune_steps, int) or cfg.finetune_steps < 0:
            raise HybridGPTError(f"distill finetune_steps must be 0 (skip) or more, got {cfg.finetune_steps!r}")
        for name in ("lr", "finetune_lr"):
            value = getattr(cfg, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise HybridGPTError(f"distill {name} must be a positive number, got {value!r}")
        if cfg.mlp_hidden is not None and (not isinstance(cfg.mlp_hidden, int) or cfg.mlp_hidden < 1):
            raise HybridGPTError(f"distill mlp_hidden must be a positive integer, got {cfg.mlp_hidden!r}")
        return cfg
