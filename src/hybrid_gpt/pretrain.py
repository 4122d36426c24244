"""Pretraining: next-token prediction on the prepared token files, through the shared loop."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch

from .checkpoint import is_checkpoint, load_weights, read_config, resolve
from .data import TokenData, batch_offsets, get_batch
from .errors import HybridGPTError
from .evaluate import evaluate_lm
from .fsutil import recover_dir
from .model import GPT, GPTConfig
from .presets import get_preset, layer_pattern
from .runtime import init_distributed, resolve_device, shutdown_distributed
from .train import TrainConfig, TrainResult, distributed_env, train

MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "mlp_hidden", "dropout")
TRAIN_KEYS = tuple(f.name for f in fields(TrainConfig))
# Flags that may differ on --resume without contradicting the saved run.
RESUMABLE_KEYS = {"max_steps", "eval_interval", "save_interval", "progress", "stop_after", "compile", "eval_tokens"}


class PretrainTask:
    def __init__(self, data: TokenData, block_size: int, seed: int, rows_global: int):
        self.data, self.block_size, self.seed, self.rows_global = data, block_size, seed, rows_global
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

    def evaluate(self, model, max_tokens: int, autocast=None) -> dict:
        return evaluate_lm(model, self.data.val, self.byte_lengths, max_tokens, autocast=autocast)


def data_dir_for(run_dir: str | Path) -> Path:
    return Path(run_dir) / "data"


def run_pretrain(*, run_dir: str | Path, preset: str, model_type: str | None = None, layers: str | None = None,
                 out: str | Path | None = None, data_dir: str | Path | None = None, overrides: dict | None = None,
                 device: str = "auto", resume: bool = False, overwrite: bool = False, log=print) -> TrainResult:
    """Train one model; its checkpoint goes to ``out`` (default ``run_dir/pretrain-<model-type>``)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if resume and overwrite:
        raise HybridGPTError("--resume and --overwrite contradict each other; pass one")
    values = get_preset(preset)
    values.update(overrides)
    pattern, name = layer_pattern(model_type, layers, values["n_layer"], explicit_n_layer="n_layer" in overrides)
    out = Path(out) if out else Path(run_dir) / f"pretrain-{name}"
    data = TokenData.open(data_dir or data_dir_for(run_dir))
    if "vocab_size" in overrides and overrides["vocab_size"] != data.tokenizer.vocab_size:
        raise HybridGPTError(
            f"--vocab-size {overrides['vocab_size']} contradicts the prepared data's vocabulary of "
            f"{data.tokenizer.vocab_size}; re-run `hybrid-gpt prepare --vocab-size {overrides['vocab_size']}`"
        )
    config = GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=values["block_size"],
                       n_embd=values["n_embd"], n_head=values["n_head"], layers=pattern,
                       mlp_hidden=values.get("mlp_hidden") or 0, dropout=values["dropout"]).validate()
    tcfg = TrainConfig(**{k: values[k] for k in TRAIN_KEYS if k in values}).validate()

    recover_dir(out)
    resume_state, prior_metrics = None, None
    if out.exists() and not resume and not overwrite:
        raise HybridGPTError(f"{out} already exists; pass --resume to continue it or --overwrite to start over")
    if resume:
        if not is_checkpoint(out) or not (out / "trainer_state.pt").is_file():
            raise HybridGPTError(f"nothing to resume at {out}: no checkpoint with trainer_state.pt there")
        saved_config, saved_training = read_config(out)
        saved_train = saved_training.get("train_config", {})
        conflicts = [k for k, v in overrides.items() if k in saved_train and k not in RESUMABLE_KEYS
                     and saved_train[k] != v]
        if saved_config.layers != pattern and (model_type or layers):
            conflicts.append("layers")
        if conflicts:
            raise HybridGPTError(f"--resume with flags that contradict the saved run: {', '.join(sorted(conflicts))}")
        config = saved_config
        # Run controls (progress bar, simulated stop, compile) belong to this invocation, not the saved run.
        saved_train = {k: v for k, v in saved_train.items() if k not in ("progress", "stop_after", "compile")}
        merged = {**saved_train, **{k: v for k, v in overrides.items() if k in TRAIN_KEYS}}
        tcfg = TrainConfig(**{k: merged[k] for k in TRAIN_KEYS if k in merged}).validate()
        if saved_training.get("data_tokenizer_sha256") not in (None, data.meta["tokenizer_sha256"]):
            raise HybridGPTError(f"{out} was trained on other data (tokenizer differs from {data.root})")
        resume_state = torch.load(out / "trainer_state.pt", map_location="cpu", weights_only=True)
        if int(resume_state["step"]) >= tcfg.max_steps:
            log(f"{out} is already complete ({resume_state['step']} of {tcfg.max_steps} steps); nothing to do")
            return TrainResult(step=int(resume_state["step"]), interrupted=False, elapsed=0.0,
                               metrics=_read_metrics(out))
        prior_metrics = _read_metrics(out)

    rank, local_rank, world = distributed_env()
    dev = resolve_device(device, local_rank)
    init_distributed(dev)
    try:
        torch.manual_seed(tcfg.seed)
        model = GPT(config)
        if resume_state is not None:
            model.load_state_dict(load_weights(resolve(out)[1]), strict=False)
        if rank == 0:
            log(f"model {config.layers} ({name}): {model.num_params():,} parameters, "
                f"KV cache {config.kv_bytes_per_token():,} bytes/token (fp32); device {dev}"
                + (f", {world} processes" if world > 1 else ""))
        task = PretrainTask(data, config.block_size, tcfg.seed, tcfg.batch_size * tcfg.grad_accum)
        info = {"stage": "pretrain", "model_type": name, "preset": preset,
                "data_dir": str(Path(data.root).resolve()), "data_tokenizer_sha256": data.meta["tokenizer_sha256"],
                "data_source": data.meta["source"], "parameters": model.num_params()}
        result = train(model, task, tcfg, out, data.tokenizer, info, dev, resume_state=resume_state,
                       prior_metrics=prior_metrics, log=log)
    finally:
        shutdown_distributed()
    return result


def _read_metrics(ckpt: Path) -> list[dict]:
    path = ckpt / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoint_data_dir(ckpt: Path, training: dict) -> Path:
    """Where a checkpoint's validation data lives: recorded at training time, else ``<ckpt>/../data``."""
    recorded = training.get("data_dir")
    if recorded and (Path(recorded) / "meta.json").is_file():
        return Path(recorded)
    return ckpt.parent / "data"

