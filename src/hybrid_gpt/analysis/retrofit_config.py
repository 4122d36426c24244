"""The retrofit study's options (RetrofitConfig) and budgets, torch-free: the CLI builds `hybrid-gpt retrofit`'s
flags from them without loading torch; analysis/retrofit.py runs them."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.infer.config import check_new_tokens
from hybrid_gpt.options import (
    DTYPE_NAMES,
    MAX_CONTEXT,
    MAX_LAYERS,
    MAX_REPEATS,
    MAX_TOKENS,
    MAX_WIDTH,
    check_fields,
    option,
)
from hybrid_gpt.presets import DEFAULT_SEED
from hybrid_gpt.train.config import EVAL_TOKENS, MAX_ROWS, MAX_STEPS

CHOICES = ("deepest", "importance")
TREATMENTS = ("drop", "distil", "heal")
# Every budget of the study, per mode. quick: about 20 minutes on a 2-core CPU for the SmolLM2 study (sized
# by cost alone: a forward there costs ~1.5 s per 1,024 tokens, a training step on 2 x 256 tokens a few
# seconds); full: the study, for a GPU.
DEFAULTS = {
    "quick": dict(ks=[0, 8, 16], distil_steps=40, heal_steps=10, distil_lr=1e-2, heal_lr=1e-4, rows=2,
                  tokens_per_row=256, mse_tokens=1024, similarity_tokens=2048, eval_context=1024, eval_tokens=4096,
                  agreement_tokens=2048, passkey_contexts=[1024, 2048], passkey_trials=5, answer_tokens=48,
                  speed_contexts=[512, 2048], batch_sizes=[1], dtypes=["float32"], speed_repeats=3,
                  decode_tokens=24),
    "full": dict(ks=[0, 4, 8, 12, 16, 20], distil_steps=1000, heal_steps=200, distil_lr=3e-3, heal_lr=1e-4,
                 rows=16, tokens_per_row=1024, mse_tokens=16384, similarity_tokens=32768, eval_context=1024,
                 eval_tokens=EVAL_TOKENS, agreement_tokens=32768, passkey_contexts=[1024, 2048, 4096, 8192],
                 passkey_trials=20, answer_tokens=48, speed_contexts=[512, 2048, 8192], batch_sizes=[1, 8],
                 dtypes=["float32", "bfloat16"], speed_repeats=5, decode_tokens=24),
}
ANSWER_KS = (8, 16)  # the k whose arms answer the fixed questions, where the study has them


def _budget(text: str, name: str) -> str:
    """An option's help with both modes' defaults, read from DEFAULTS."""
    def shown(v):
        return ",".join(map(str, v)) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else str(v)
    return f"{text} (default: {shown(DEFAULTS['full'][name])}; quick: {shown(DEFAULTS['quick'][name])})"


@dataclass
class RetrofitConfig:
    """Every option of a retrofit study, each with its default once. None: the mode's value (DEFAULTS: quick
    with ``quick``, else full); out_dir None: <checkpoint's parent>/retrofit (retrofit-quick)."""

    out_dir: str | Path | None = option(None, kind="outdir", flags=("--out",),
                                        help="output directory (default: <checkpoint's parent>/retrofit, or "
                                             "retrofit-quick with --quick)")
    quick: bool = option(False, help="the quick study's budgets (each option's quick default: about 20 minutes on a "
                                     "2-core CPU for SmolLM2-135M) instead of the full study's")
    ks: list[int] | None = option(None, lo=0, hi=MAX_LAYERS, unique=True,
                                  help=_budget("attention layers to replace, each a study point; 0 is the full "
                                               "model", "ks"))
    choices: list[str] = option(default_factory=lambda: list(CHOICES), choices=CHOICES, unique=True,
                                help="which layers: the k deepest, and/or the k least important by residual "
                                     "similarity on the training split")
    treatments: list[str] = option(default_factory=lambda: list(TREATMENTS), choices=TREATMENTS, unique=True,
                                   help="drop (N blocks), distil (M blocks trained on the teacher's attention "
                                        "output), heal (each of those arms again after a KL fine-tune to the "
                                        "teacher's logits)")
    distil_steps: int | None = option(None, lo=1, hi=MAX_STEPS,
                                      help=_budget("steps of the shared distillation", "distil_steps"))
    heal_steps: int | None = option(None, lo=1, hi=MAX_STEPS, help=_budget("steps of each healing", "heal_steps"))
    distil_lr: float | None = option(None, lo=0, lo_open=True,
                                     help=_budget("distillation learning rate", "distil_lr"))
    heal_lr: float | None = option(None, lo=0, lo_open=True, help=_budget("healing learning rate", "heal_lr"))
    rows: int | None = option(None, lo=1, hi=MAX_ROWS, help=_budget("rows per step, distillation and healing", "rows"))
    tokens_per_row: int | None = option(None, lo=2, hi=MAX_CONTEXT,
                                        help=_budget("tokens per training row", "tokens_per_row"))
    mse_tokens: int | None = option(None, lo=1, hi=MAX_TOKENS,
                                    help=_budget("held-out tokens for the distillation MSE", "mse_tokens"))
    similarity_tokens: int | None = option(None, lo=1, hi=MAX_TOKENS,
                                           help=_budget("training tokens for the layers' residual similarity",
                                                        "similarity_tokens"))
    eval_context: int | None = option(None, lo=2, hi=MAX_CONTEXT,
                                      help=_budget("window of the bits per byte, in tokens", "eval_context"))
    eval_tokens: int | None = option(None, lo=1, hi=MAX_TOKENS,
                                     help=_budget("held-out tokens for the bits per byte", "eval_tokens"))
    agreement_tokens: int | None = option(None, lo=1, hi=MAX_TOKENS,
                                          help=_budget("held-out chat tokens for the agreement with the full model",
                                                       "agreement_tokens"))
    passkey_contexts: list[int] | None = option(None, lo=2, hi=MAX_CONTEXT, unique=True,
                                                help=_budget("passkey prompt lengths", "passkey_contexts"))
    passkey_trials: int | None = option(None, lo=1, hi=MAX_REPEATS,
                                        help=_budget("passkey trials per context", "passkey_trials"))
    answer_ks: list[int] | None = option(None, lo=1, hi=MAX_LAYERS, unique=True,
                                         help="the k whose arms answer the fixed questions, beside the full model; "
                                              "each must be one of --ks (default: those of "
                                              f"{', '.join(map(str, ANSWER_KS))} that --ks studies)")
    answer_tokens: int | None = option(None, lo=1, hi=MAX_CONTEXT,
                                       help=_budget("new tokens of each greedy answer", "answer_tokens"))
    speed_contexts: list[int] | None = option(None, lo=2, hi=MAX_CONTEXT, unique=True,
                                              help=_budget("contexts of the speed measurement", "speed_contexts"))
    batch_sizes: list[int] | None = option(None, lo=1, hi=MAX_ROWS, unique=True,
                                           help=_budget("batch sizes of the speed measurement", "batch_sizes"))
    dtypes: list[str] | None = option(None, choices=DTYPE_NAMES, unique=True,
                                      help=_budget("precisions of the speed measurement", "dtypes"))
    speed_repeats: int | None = option(None, lo=1, hi=MAX_REPEATS,
                                       help=_budget("interleaved repeats of each speed figure", "speed_repeats"))
    decode_tokens: int | None = option(None, lo=2, hi=MAX_CONTEXT,
                                       help=_budget("new tokens per timed cached decode", "decode_tokens"))
    mlp_hidden: int | None = option(None, lo=1, hi=MAX_WIDTH,
                                    help="hidden width of the M blocks (default: n_embd / 4)")
    save_arms: bool = option(True, flags=("--no-checkpoints",),
                             help="do not save each arm's checkpoint under <out>/arms/")
    seed: int = option(DEFAULT_SEED, kind="seed", help="random seed")
    data_dir: str | Path | None = option(None, kind="input", flags=("--data",),
                                         help="prepared data directory (default: the checkpoint's)")
    chat_dir: str | Path | None = option(None, kind="input", flags=("--chat-data",),
                                         help="directory written by `prepare-chat`, whose sft_val.jsonl holds the "
                                              "held-out transcripts (default: <checkpoint's parent>/chat)")
    device: str = option("auto", metavar="NAME", help="auto, cpu, cuda or mps")
    overwrite: bool = option(False, help="replace an earlier retrofit output in --out")

    @property
    def answering(self) -> list[int]:
        """The k whose arms answer the fixed questions: answer_ks, by default those of ANSWER_KS in ks."""
        return self.answer_ks if self.answer_ks is not None else [k for k in ANSWER_KS if k in self.ks]

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"

    def resolved(self) -> "RetrofitConfig":
        """This config with the mode's budgets filled in."""
        return replace(self, **{k: v for k, v in DEFAULTS[self.mode].items() if getattr(self, k) is None})

    def check(self, teacher_layers: str, block_size: int) -> None:
        """Every field within its option's range, and the rules that need the model: one-line errors before
        any work."""
        check_fields(replace(self, **{f.name: str(getattr(self, f.name)) for f in fields(self)
                                      if isinstance(getattr(self, f.name), Path)}))
        n_attn = teacher_layers.count("A")
        if not n_attn:
            raise HybridGPTError(f"the checkpoint's pattern {teacher_layers} has no attention layer to replace")
        for k in self.ks:
            if not 0 <= k <= n_attn:
                raise HybridGPTError(f"k = {k}: the model has {n_attn} attention layers; give ks between 0 and "
                                     f"{n_attn}")
        unstudied = [k for k in self.answer_ks or [] if k not in self.ks]
        if unstudied:  # else the study would end without those answers, silently
            raise HybridGPTError(f"answer_ks {unstudied[0]} is not one of ks ({', '.join(map(str, self.ks))}): no "
                                 "arm of it is built to answer; add it to --ks or leave it out of --answer-ks")
        if "heal" in self.treatments and not {"drop", "distil"} & set(self.treatments):
            raise HybridGPTError("heal fine-tunes the drop and distil arms; list drop or distil with it")
        for name in ("eval_context", "tokens_per_row"):
            if getattr(self, name) > block_size:
                raise HybridGPTError(f"{name} {getattr(self, name):,} exceeds the model's context of {block_size:,}")
        for name in ("passkey_contexts", "speed_contexts"):
            over = [c for c in getattr(self, name) if c > block_size]
            if over:
                raise HybridGPTError(f"{name}: {over[0]:,} exceeds the model's context of {block_size:,}")
        check_new_tokens(self.answer_tokens, block_size, "answer_tokens")
        short = [c for c in self.speed_contexts if c <= self.decode_tokens]
        if short:
            raise HybridGPTError(f"speed context {short[0]} must exceed decode_tokens {self.decode_tokens}")
