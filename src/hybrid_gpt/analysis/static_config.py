"""The staticness map's options (StaticConfig), torch-free: the CLI builds `hybrid-gpt static`'s flags from
them without loading torch; analysis/static.py runs them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from hybrid_gpt.options import MAX_CONTEXT, MAX_LAYERS, MAX_TOKENS, MAX_WIDTH, option
from hybrid_gpt.presets import DEFAULT_SEED
from hybrid_gpt.train.config import MAX_ROWS, MAX_STEPS

# The smallest budgets that mean anything: a fit needs more tokens than the MLP has inputs, and R^2 needs
# several windows of held-out text.
MIN_FIT_TOKENS = 4096
MIN_EVAL_TOKENS = 1024


@dataclass
class StaticConfig:
    """Every option of a staticness map, each with its default once."""

    out_dir: str | Path | None = option(None, kind="outdir", flags=("--out",),
                                        help="output directory (default: <checkpoint's parent>/static)")
    context: int = option(2048, lo=2, hi=MAX_CONTEXT, help="tokens per captured window")
    train_tokens: int = option(131072, lo=MIN_FIT_TOKENS, hi=MAX_TOKENS,
                               help="training-split tokens the predictors are fitted on")
    stop_tokens: int = option(16384, lo=MIN_EVAL_TOKENS, hi=MAX_TOKENS,
                              help="training-split tokens, apart from the fit, that stop the MLPs early")
    eval_tokens: int = option(32768, lo=MIN_EVAL_TOKENS, hi=MAX_TOKENS,
                              help="held-out tokens the R^2 is scored on, in windows spread over the whole split")
    widths: list[int] = option(default_factory=lambda: [144, 576, 2304], lo=1, hi=MAX_WIDTH, unique=True,
                               help="hidden widths of the per-token MLP predictors")
    short_context: int = option(256, lo=0, hi=MAX_CONTEXT,
                                help="also fit and score the linear predictor at this context (0: not)")
    blocks: list[int] | None = option(None, lo=1, hi=MAX_LAYERS, unique=True,
                                      help="the attention blocks to map, numbered from 1 (default: every one)")
    lr: float = option(1e-3, lo=0, lo_open=True, help="peak learning rate of the MLP fits")
    batch_tokens: int = option(1024, lo=1, hi=MAX_ROWS, help="tokens per MLP training step")
    max_epochs: int = option(40, lo=1, hi=MAX_STEPS, help="the most passes over the fit tokens an MLP may take")
    patience: int = option(4, lo=1, hi=MAX_STEPS,
                           help="stop an MLP after this many evaluations (two per epoch) without a better "
                                "stopping-slice MSE")
    ridge: float = option(1e-4, lo=0, help="ridge penalty, relative to the mean input variance")
    seed: int = option(DEFAULT_SEED, kind="seed", help="random seed")
    data_dir: str | Path | None = option(None, kind="input", flags=("--data",),
                                         help="prepared data directory (default: the checkpoint's)")
    device: str = option("auto", metavar="NAME", help="auto, cpu, cuda or mps")
    resume: bool = option(False, help="continue an unfinished map in --out (the same options)")
    overwrite: bool = option(False, help="replace an earlier map in --out")

    def fingerprint(self) -> dict:
        """What the results depend on: a resumed map must match it."""
        skip = {"out_dir", "device", "resume", "overwrite", "data_dir"}
        return {k: v for k, v in asdict(self).items() if k not in skip}
