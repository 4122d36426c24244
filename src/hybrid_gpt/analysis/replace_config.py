"""The replacement study's options (ReplaceConfig), torch-free: the CLI builds `hybrid-gpt replace`'s flags from
them without loading torch; analysis/replace.py runs them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from hybrid_gpt.analysis.retrofit_config import CHOICES
from hybrid_gpt.options import MAX_CONTEXT, MAX_LAYERS, MAX_REPEATS, MAX_TOKENS, MAX_WIDTH, option
from hybrid_gpt.presets import DEFAULT_SEED
from hybrid_gpt.train.config import MAX_ROWS

KINDS = ("drop", "constant", "linear", "distil", "matched", "drop+heal", "distil+heal")


@dataclass
class ReplaceConfig:
    """Every option of a replacement study, each with its default once. The seeds are fixed before the run."""

    out_dir: str | Path | None = option(None, kind="outdir", flags=("--out",),
                                        help="output directory (default: <checkpoint's parent>/replace)")
    map_dir: str | Path | None = option(None, kind="input", flags=("--map",),
                                        help="the checkpoint's staticness map, with its captures (default: "
                                             "<checkpoint's parent>/static, from `hybrid-gpt static`)")
    ks: list[int] = option(default_factory=lambda: [4, 8], lo=1, hi=MAX_LAYERS, unique=True,
                           help="attention layers to replace, each a study point")
    choices: list[str] = option(default_factory=lambda: list(CHOICES), choices=CHOICES, unique=True,
                                help="which layers: the k deepest, and/or the k least important by residual "
                                     "similarity on the training split; chosen per k on the selection slice")
    width: int = option(144, lo=1, hi=MAX_WIDTH, help="hidden width of the distilled M blocks (the map's fits where "
                                                     "it has them, else fitted here by its recipe)")
    seeds: list[int] = option(default_factory=lambda: [DEFAULT_SEED, DEFAULT_SEED + 1], lo=0, hi=2**32 - 1,
                              unique=True, help="training seeds of the distil + heal arm (MLP fit and healing "
                                                "data order); the first also seeds every other arm")
    heal_tokens: list[int] = option(default_factory=lambda: [5120, 25600, 102400], lo=1, hi=MAX_TOKENS,
                                    unique=True, help="healing-curve points, in training tokens (the last is the "
                                                      "budget; 0 is always scored)")
    heal_context: int = option(1024, lo=2, hi=MAX_CONTEXT, help="tokens per healing row")
    heal_rows: int = option(1, lo=1, hi=MAX_ROWS, help="rows per healing step")
    heal_lr: float = option(1e-4, lo=0, lo_open=True, help="healing learning rate (constant after warmup)")
    heal_warmup: int = option(5, lo=0, hi=10**6, help="healing warmup steps")
    matched_compute: bool = option(True, flags=("--no-matched-compute",),
                                   help="do not continue drop + heal to the distillation's teacher forwards")
    eval_context: int = option(2048, lo=2, hi=MAX_CONTEXT, help="tokens per held-out window")
    select_windows: int = option(8, lo=1, hi=10**4, help="held-out windows of the selection slice")
    test_windows: int = option(16, lo=2, hi=10**4, help="held-out windows the results are reported on")
    similarity_tokens: int = option(32768, lo=1, hi=MAX_TOKENS,
                                    help="training tokens for the layers' residual similarity")
    passkey_contexts: list[int] = option(default_factory=lambda: [1024, 2048, 4096], lo=2, hi=MAX_CONTEXT,
                                         unique=True, help="candidate passkey lengths (kept where the full "
                                                           "model scores at least --passkey-floor)")
    passkey_trials: int = option(20, lo=1, hi=MAX_REPEATS, help="passkey trials per length")
    passkey_floor: float = option(0.9, lo=0, hi=1, help="the full model's accuracy a passkey length needs")
    passkey_kinds: list[str] = option(default_factory=lambda: ["distil", "drop+heal", "distil+heal"],
                                      choices=KINDS, unique=True, help="the arms that run the passkey")
    speed_runs: int = option(3, lo=0, hi=100, help="separate processes of the speed measurement (0: none)")
    speed_repeats: int = option(5, lo=1, hi=MAX_REPEATS, help="interleaved repeats within each speed run")
    decode_tokens: int = option(24, lo=2, hi=MAX_CONTEXT, help="new tokens per timed cached decode")
    seed: int = option(DEFAULT_SEED, kind="seed", help="random seed of everything but the training seeds")
    data_dir: str | Path | None = option(None, kind="input", flags=("--data",),
                                         help="prepared data directory (default: the checkpoint's)")
    device: str = option("auto", metavar="NAME", help="auto, cpu, cuda or mps")
    resume: bool = option(False, help="continue an unfinished study in --out (the same options)")
    overwrite: bool = option(False, help="replace an earlier study in --out")

    def fingerprint(self) -> dict:
        skip = {"out_dir", "device", "resume", "overwrite", "data_dir", "map_dir", "speed_runs"}
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def heal_steps(self) -> list[int]:
        """The healing curve's points in optimizer steps (0 first), from the token counts."""
        per_step = self.heal_context * self.heal_rows
        return sorted({0, *(max(1, math.ceil(t / per_step)) for t in self.heal_tokens)})
