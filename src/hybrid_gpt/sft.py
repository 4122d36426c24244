"""Supervised fine-tuning: next-token loss on assistant turns only, through the shared loop."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from .errors import HybridGPTError
from .evaluate import evaluating
from .finetune import load_stage_data, resolve_init
from .pretrain import train_config
from .presets import stage_values
from .stage import Stage, run_stage
from .template import training_example
from .train import TrainResult

EVAL_EXAMPLES = 1024  # validation conversations scored at each periodic evaluation
FINAL_EVAL_EXAMPLES = 4096  # ... and at the final one (all of them, if fewer)


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


def encode_conversations(tok, conversations: list[list[dict]], block_size: int, what: str) -> list:
    examples = [e for e in (training_example(tok, c, block_size) for c in conversations) if e is not None]
    if not examples:
        raise HybridGPTError(f"no {what} conversation keeps an assistant token within a context of {block_size}")
    return examples


class SFTTask:
    def __init__(self, tok, train_convs, val_convs, block_size: int, seed: int, rows_global: int):
        self.pad_id = tok.end_id
        self.train = LazyExamples(train_convs, lambda c: training_example(tok, c, block_size),
                                  "training conversation")
        self.val = encode_conversations(tok, val_convs[:FINAL_EVAL_EXAMPLES], block_size, "validation")
        self.seed, self.rows_global = seed, rows_global
        self.tokens_per_row = int(np.mean([len(x) for x, _ in self.val]))

    def rows(self, step: int):
        return np.random.default_rng([self.seed, step]).integers(0, len(self.train), self.rows_global)

    def take(self, idx, lo: int, hi: int, device):
        return pad_batch([self.train[i] for i in idx[lo:hi]], self.pad_id, device)

    def loss(self, model, micro):
        _, loss = model(*micro)
        return loss, {}

    @torch.no_grad()
    def evaluate(self, model, final: bool, autocast=nullcontext) -> dict:
        """Mean loss per assistant token over the validation conversations."""
        total, count = 0.0, 0
        examples = self.val if final else self.val[:EVAL_EXAMPLES]
        with evaluating(model) as model:
            device = next(model.parameters()).device
            for i in range(0, len(examples), 32):
                x, y = pad_batch(examples[i:i + 32], self.pad_id, device)
                with autocast():
                    _, loss = model(x, y, loss_reduction="sum")
                total += loss.item()
                count += int((y >= 0).sum())
        return {"loss": total / max(count, 1), "tokens": count, "examples": len(examples)}


def run_sft(*, run_dir: str | Path, preset: str, model_type: str | None = None, layers: str | None = None,
            init: str | None = None, out: str | None = None, sft_data: str | None = None,
            sft_val_data: str | None = None, chat_dir: str | None = None, overrides: dict | None = None,
            device: str = "auto", resume: bool = False, overwrite: bool = False, log=print) -> TrainResult:
    run_dir = Path(run_dir)
    name, init_path, model, tok, _ = resolve_init("sft", run_dir, model_type, layers, init)
    train_convs, val_convs, data_info = load_stage_data("sft", Path(chat_dir or run_dir / "chat"), sft_data,
                                                        sft_val_data)
    tcfg = train_config(stage_values(preset, "sft", overrides))
    config = model.config
    info = {"model_type": name, "preset": preset, "init": str(init_path.resolve()), **data_info,
            "train_examples": len(train_convs), "val_examples": len(val_convs)}

    def make_task(_model, _device):
        return SFTTask(tok, train_convs, val_convs, config.block_size, tcfg.seed, tcfg.batch_size * tcfg.grad_accum)

    stage = Stage(name="sft", out=Path(out) if out else run_dir / f"sft-{name}", config=config, tokenizer=tok,
                  tcfg=tcfg, info=info, make_task=make_task, init_state=model.state_dict(),
                  fixed={"init": str(init_path.resolve())})
    return run_stage(stage, device=device, resume=resume, overwrite=overwrite, log=log)
