"""Training's options and limits, torch-free: the CLI builds its flags from them without loading torch, and
the loop, the evaluation and DPO import them from here."""

from __future__ import annotations

from dataclasses import dataclass

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.options import MAX_TOKENS, check_fields, option
from hybrid_gpt.presets import DEFAULT_SEED

MAX_STEPS = 10**9
MAX_ROWS = 2**16  # rows per forward pass
MAX_GLOBAL_ROWS = 2**20  # rows per optimizer step (batch_size x grad_accum), drawn before any step runs


@dataclass
class TrainConfig:
    """One training run's settings. Each field's metadata is its help and valid range: the CLI's flags are
    built from it, and :meth:`validate` holds library callers to the same ranges, naming the field."""

    max_steps: int = option(1000, lo=1, hi=MAX_STEPS, help="optimizer steps")
    batch_size: int = option(32, lo=1, hi=MAX_ROWS, help="rows per forward pass")
    grad_accum: int = option(1, lo=1, hi=MAX_GLOBAL_ROWS, help="micro-batches per optimizer step")
    lr: float = option(3e-3, lo=0, lo_open=True, help="peak learning rate")
    min_lr_ratio: float = option(0.1, lo=0, hi=1, help="the cosine schedule decays to lr x this")
    warmup_steps: int = option(100, lo=0, hi=MAX_STEPS, help="steps of linear warmup")
    weight_decay: float = option(0.1, lo=0, help="AdamW's decoupled weight decay (biases and norms excluded)")
    grad_clip: float = option(1.0, lo=0, help="clip the gradient norm to this (0: no clipping)")
    eval_interval: int = option(250, lo=1, hi=MAX_STEPS, help="steps between evaluations")
    eval_tokens: int = option(32768, lo=1, hi=MAX_TOKENS, help="validation tokens per periodic evaluation")
    save_interval: int = option(0, lo=0, hi=MAX_STEPS, help="steps between checkpoints (0: at each evaluation)")
    seed: int = option(DEFAULT_SEED, kind="seed", help="random seed")
    compile: bool = option(False, help="torch.compile the model")
    progress: bool = option(True, flags=("--no-progress",), help="no progress bar")
    # Stop (as if interrupted) after this step; simulates an interruption in tests of --resume.
    stop_after: int = option(0, lo=0, hi=MAX_STEPS, flags=("--stop-after-steps",), hidden=True)
    # Also evaluate before the first step (the baseline a fine-tune starts from).
    eval_at_start: bool = option(False, cli=False)
    skip_nonfinite: bool = option(False, help="skip (and count) a batch whose loss or gradient is not finite, "
                                              "instead of stopping")
    # Early stopping (in-memory runs on one process): stop once the evaluated ``val_<stop_metric>`` has not
    # improved for this many evaluations in a row, and put back the weights of its best evaluation (0: never).
    patience: int = option(0, lo=0, hi=MAX_STEPS, cli=False)
    stop_metric: str = option("loss", cli=False)

    def validate(self) -> "TrainConfig":
        check_fields(self)  # types, finite numbers, ranges
        if self.batch_size * self.grad_accum > MAX_GLOBAL_ROWS:
            raise HybridGPTError(f"batch_size x grad_accum = {self.batch_size * self.grad_accum:,} rows per step; "
                                 f"the limit is {MAX_GLOBAL_ROWS:,}")
        if self.lr * self.weight_decay >= 1:
            raise HybridGPTError(f"weight_decay {self.weight_decay:g} x lr {self.lr:g} must be below 1: each step "
                                 "multiplies the weights by 1 - lr x weight_decay")
        return self


# The documented default: the first 131,072 predicted tokens of the validation split (or all of it,
# if shorter), in non-overlapping windows of the model's full context.
EVAL_TOKENS = 131072

DEFAULT_BETA = 0.1
MAX_BETA = 100.0  # beta x a log-probability margin must stay finite in float32
