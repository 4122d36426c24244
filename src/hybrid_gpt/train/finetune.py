"""What SFT and DPO share: finding the checkpoint to start from, naming the run, loading chat data."""

from __future__ import annotations

from pathlib import Path

import torch

from hybrid_gpt.checkpoint import load_checkpoint
from hybrid_gpt.data.chat_data import has_chat_data, load_dpo, load_sft
from hybrid_gpt.data.tokenizer import Tokenizer
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import recover_dir
from hybrid_gpt.model.gpt import GPT, parse_layers
from hybrid_gpt.presets import layer_pattern

PREVIOUS = {"sft": "pretrain", "dpo": "sft"}
HOW = {"pretrain": "hybrid-gpt pretrain", "sft": "hybrid-gpt sft"}


def resolve_init(stage: str, run_dir: Path, model_type: str | None, layers: str | None,
                 init: str | Path | None) -> tuple[str, Path, GPT, Tokenizer, dict]:
    """(run name, init path, model, tokenizer, init training info) for a fine-tuning stage.

    The name labels the output directory (``<stage>-<name>``); it comes from --model-type/--layers,
    else from the init checkpoint, else "standard".
    """
    if model_type and layers:
        raise HybridGPTError("give either model_type or layers, not both")
    name = None
    if layers:
        pattern = parse_layers(layers)
        name = layer_pattern(None, pattern, len(pattern))[1]
    elif model_type:
        if model_type not in ("standard", "hybrid"):
            raise HybridGPTError(f"unknown model_type {model_type!r}; choose standard or hybrid")
        name = model_type
    prev = PREVIOUS[stage]
    if init is None:
        init = run_dir / f"{prev}-{name or 'standard'}"
        recover_dir(Path(init))  # a crash mid-swap leaves it as <init>.old
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
    if not has_chat_data(chat_dir):  # recovers a half-finished swap first
        raise HybridGPTError(f"no chat data in {chat_dir}; run `hybrid-gpt prepare-chat` first, "
                             f"or pass --{kind}-data FILE.jsonl")
    train = loader(chat_dir / f"{kind}_train.jsonl")
    val = loader(chat_dir / f"{kind}_val.jsonl")
    return train, val, {"data": str((chat_dir / f"{kind}_train.jsonl").resolve())}


def pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (inputs, targets); padded targets are -1, so they never count (the model is causal)."""
    T = max(len(x) for x, _ in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (xi, yi) in enumerate(rows):
        x[i, : len(xi)] = torch.tensor(xi)
        y[i, : len(yi)] = torch.tensor(yi)
    return x.to(device), y.to(device)


class LazyExamples:
    """Examples encoded on first use (a run touches a fraction of them) and memoised.

    An item that yields no example (``encode`` returns None: no target left in the context) is
    replaced by the next one that does, deterministically.
    """

    def __init__(self, items: list, encode, what: str, check: int = 64):
        self.items, self.encode, self.what = items, encode, what
        self.cache: dict[int, object] = {}
        if all(self._get(i) is None for i in range(min(check, len(items)))):
            raise HybridGPTError(f"no {what} keeps a target token within the model's context")

    def _get(self, i: int):
        if i not in self.cache:
            self.cache[i] = self.encode(self.items[i])
        return self.cache[i]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return (self[i] for i in range(len(self.items)))

    def __getitem__(self, i: int):
        for k in range(len(self.items)):
            example = self._get((i + k) % len(self.items))
            if example is not None:
                return example
        raise HybridGPTError(f"no {self.what} keeps a target token within the model's context")
