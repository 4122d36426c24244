"""What SFT and DPO share: finding the checkpoint to start from, naming the run, loading chat data."""

from __future__ import annotations

from pathlib import Path

from .chat_data import load_dpo, load_sft
from .checkpoint import load_checkpoint
from .errors import HybridGPTError
from .model import GPT
from .presets import layer_pattern
from .tokenizer import Tokenizer

PREVIOUS = {"sft": "pretrain", "dpo": "sft"}
HOW = {"pretrain": "hybrid-gpt pretrain", "sft": "hybrid-gpt sft"}


def resolve_init(stage: str, run_dir: Path, model_type: str | None, layers: str | None,
                 init: str | Path | None) -> tuple[str, Path, GPT, Tokenizer, dict]:
    """(run name, init path, model, tokenizer, init training info) for a fine-tuning stage.

    The name labels the output directory (``<stage>-<name>``); it comes from --model-type/--layers,
    else from the init checkpoint, else "standard".
    """
    if model_type and layers:
        raise HybridGPTError("pass either --model-type or --layers, not both")
    name = None
    if layers:
        name = layer_pattern(None, layers, len(layers.strip()))[1]
    elif model_type:
        if model_type not in ("standard", "hybrid"):
            raise HybridGPTError(f"unknown --model-type {model_type!r}; choose standard or hybrid")
        name = model_type
    prev = PREVIOUS[stage]
    if init is None:
        init = run_dir / f"{prev}-{name or 'standard'}"
        if not Path(init).exists():
            flag = f"--layers {layers}" if layers else f"--model-type {name or 'standard'}"
            raise HybridGPTError(
                f"no {prev} checkpoint at {init}; run `{HOW[prev]} {flag}` first, or pass --init CKPT"
            )
    model, tok, training = load_checkpoint(init)
    recorded = training.get("model_type")
    if name and recorded and recorded != name:
        raise HybridGPTError(f"--init {init} holds a {recorded} model, which contradicts {name}")
    return name or recorded or model.config.layers, Path(init), model, tok, training


def split_user_data(rows: list, what: str) -> tuple[list, list]:
    """Hold out the last 5% (at least one example) of a user's file when no validation file is given."""
    if len(rows) < 2:
        raise HybridGPTError(f"{what} needs at least 2 examples to hold one out for validation "
                             "(or pass a validation file)")
    n_val = max(1, len(rows) // 20)
    return rows[:-n_val], rows[-n_val:]


def load_stage_data(kind: str, chat_dir: Path, data: str | None, val_data: str | None) -> tuple[list, list, dict]:
    """Training and validation examples for SFT (``kind="sft"``) or DPO (``kind="dpo"``)."""
    loader = load_sft if kind == "sft" else load_dpo
    if data:
        train = loader(data)
        if val_data:
            val = loader(val_data)
        else:
            train, val = split_user_data(train, f"--{kind}-data")
        return train, val, {"data": str(Path(data).resolve()), "val_data": val_data and str(Path(val_data).resolve())}
    if val_data:
        raise HybridGPTError(f"--{kind}-val-data needs --{kind}-data too")
    if not (chat_dir / "meta.json").is_file():
        raise HybridGPTError(f"no chat data in {chat_dir}; run `hybrid-gpt prepare-chat` first, "
                             f"or pass --{kind}-data FILE.jsonl")
    train = loader(chat_dir / f"{kind}_train.jsonl")
    val = loader(chat_dir / f"{kind}_val.jsonl")
    return train, val, {"data": str((chat_dir / f"{kind}_train.jsonl").resolve())}
