"""Pretraining: next-token prediction on the prepared token files, through the shared loop."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from hybrid_gpt.data.tokens import TokenData, batch_offsets, get_batch
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.model.gpt import GPTConfig
from hybrid_gpt.presets import layer_pattern, stage_values
from hybrid_gpt.train.evaluate import EVAL_TOKENS, evaluate_lm
from hybrid_gpt.train.loop import TrainConfig, TrainResult
from hybrid_gpt.train.stage import TRAIN_KEYS, Stage, run_stage

MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "mlp_hidden", "dropout")


class PretrainTask:
    def __init__(self, data: TokenData, block_size: int, seed: int, rows_global: int, eval_tokens: int):
        self.data, self.block_size, self.seed, self.rows_global = data, block_size, seed, rows_global
        self.eval_tokens = eval_tokens
        self.byte_lengths = data.tokenizer.token_byte_lengths()
        self.tokens_per_row = block_size

    def rows(self, step: int):
        return batch_offsets(len(self.data.train), self.block_size, self.rows_global, self.seed, step)

    def take(self, offsets, lo: int, hi: int, device):
        x, y = get_batch(self.data.train, offsets[lo:hi], self.block_size)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def loss(self, model, micro):
        _, loss = model(*micro)
        return loss, {}

    def evaluate(self, model, final: bool, autocast=nullcontext) -> dict:
        # The final evaluation is the documented one (EVAL_TOKENS); periodic ones may be shorter.
        tokens = max(self.eval_tokens, EVAL_TOKENS) if final else self.eval_tokens
        return evaluate_lm(model, self.data.val, self.byte_lengths, tokens, autocast=autocast)


def data_dir_for(run_dir: str | Path) -> Path:
    return Path(run_dir) / "data"


def train_config(values: dict) -> TrainConfig:
    return TrainConfig(**{k: values[k] for k in TRAIN_KEYS if k in values}).validate()


def run_pretrain(*, run_dir: str | Path, preset: str, model_type: str | None = None, layers: str | None = None,
                 out: str | Path | None = None, data_dir: str | Path | None = None, overrides: dict | None = None,
                 device: str = "auto", resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Train one model from scratch; its checkpoint goes to ``out`` (default ``run_dir/pretrain-<model-type>``)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    values = stage_values(preset, "pretrain", overrides)
    pattern, name = layer_pattern(model_type, layers, values["n_layer"], explicit_n_layer="n_layer" in overrides)
    data = TokenData.open(data_dir or data_dir_for(run_dir))
    if "vocab_size" in overrides and overrides["vocab_size"] != data.tokenizer.vocab_size:
        raise HybridGPTError(
            f"vocab_size {overrides['vocab_size']} contradicts the prepared data's vocabulary of "
            f"{data.tokenizer.vocab_size}; re-run `hybrid-gpt prepare --vocab-size {overrides['vocab_size']}`"
        )
    config = GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=values["block_size"],
                       n_embd=values["n_embd"], n_head=values["n_head"], layers=pattern,
                       mlp_hidden=values.get("mlp_hidden") or 0, dropout=values["dropout"]).validate()
    tcfg = train_config(values)
    info = {"model_type": name, "preset": preset, "data_dir": str(Path(data.root).resolve()),
            "data_tokenizer_sha256": data.meta["tokenizer_sha256"], "data_source": data.meta["source"]}

    def make_task(model, device):
        return PretrainTask(data, config.block_size, tcfg.seed, tcfg.batch_size * tcfg.grad_accum, tcfg.eval_tokens)

    stage = Stage(name="pretrain", out=Path(out) if out else Path(run_dir) / f"pretrain-{name}", config=config,
                  tokenizer=data.tokenizer, tcfg=tcfg, info=info, make_task=make_task,
                  fixed={"data_tokenizer_sha256": data.meta["tokenizer_sha256"]})
    return run_stage(stage, device=device, resume=resume, overwrite=overwrite)

