"""Supervised fine-tuning: next-token loss on assistant turns only, through the shared loop."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from hybrid_gpt.data.template import training_example
from hybrid_gpt.data.tokenizer import Tokenizer
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.model.gpt import GPT
from hybrid_gpt.presets import stage_values
from hybrid_gpt.train.evaluate import evaluating
from hybrid_gpt.train.finetune import LazyExamples, load_stage_data, pad_batch, resolve_init
from hybrid_gpt.train.loop import TrainConfig, TrainResult
from hybrid_gpt.train.pretrain import train_config
from hybrid_gpt.train.stage import Stage, run_stage

EVAL_EXAMPLES = 1024  # validation conversations scored at each periodic evaluation
FINAL_EVAL_EXAMPLES = 4096  # ... and at the final one (all of them, if fewer)


def encode_conversations(tok, conversations: list[list[dict]], block_size: int, what: str) -> list:
    examples = [e for e in (training_example(tok, c, block_size) for c in conversations) if e is not None]
    if not examples:
        raise HybridGPTError(f"no {what} conversation keeps an assistant token within a context of {block_size}")
    return examples


class SFTTask:
    """The loss of a step is the mean over all its target tokens, however the step is split.

    The loop weights each micro-batch's loss by its share of the step's rows; a token mean per
    micro-batch would then weight tokens by how the rows fall into micro-batches (a token of a short
    micro-batch would count more). So ``rows`` counts the step's target tokens and ``loss`` returns
    the micro-batch's summed token loss scaled so that the loop's row weighting turns it into its
    share of the step's token mean (under DDP too, whose gradient average the scale anticipates).
    """

    def __init__(self, tok, train_convs, val_convs, block_size: int, seed: int, rows_global: int):
        self.pad_id = tok.end_id  # the template's turn end (<|end|>, <|im_end|>); padding is never a target
        self.train = LazyExamples(train_convs, lambda c: training_example(tok, c, block_size),
                                  "training conversation")
        self.val = encode_conversations(tok, val_convs[:FINAL_EVAL_EXAMPLES], block_size, "validation")
        self.seed, self.rows_global = seed, rows_global
        self.tokens_per_row = int(np.mean([len(x) for x, _ in self.val]))

    def rows(self, step: int) -> tuple[np.ndarray, int]:
        """The step's rows (all ranks') and the count of their target tokens."""
        idx = np.random.default_rng([self.seed, step]).integers(0, len(self.train), self.rows_global)
        return idx, sum(sum(t >= 0 for t in self.train[i][1]) for i in idx)

    def take(self, batch, lo: int, hi: int, device):
        idx, targets = batch
        x, y = pad_batch([self.train[i] for i in idx[lo:hi]], self.pad_id, device)
        # The loop multiplies the loss by (hi - lo) / rows per rank and DDP averages over the ranks:
        # this scale makes the product this micro-batch's summed loss over the step's target count.
        return x, y, len(idx) / ((hi - lo) * targets)

    def loss(self, model, micro):
        x, y, scale = micro
        _, loss = model(x, y, loss_reduction="sum")
        return loss * scale, {}

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


class FineTuneInputs(NamedTuple):
    name: str  # labels the output directory, <stage>-<name>
    init_path: Path
    model: GPT  # the init checkpoint's model
    tokenizer: Tokenizer
    train: list  # conversations (SFT) or preference pairs (DPO)
    val: list
    tcfg: TrainConfig
    info: dict  # recorded with the run; the stage adds its own keys


def prepare_finetune(stage: str, run_dir: Path, preset: str, model_type: str | None, layers: str | None,
                     init: str | None, chat_dir: str | None, data: str | None, val_data: str | None,
                     overrides: dict | None) -> FineTuneInputs:
    """What SFT and DPO (``stage``) set up alike before their task: the checkpoint to start from, the
    chat data, the stage's settings and the run's info."""
    name, init_path, model, tok, _ = resolve_init(stage, run_dir, model_type, layers, init)
    train, val, data_info = load_stage_data(stage, Path(chat_dir or run_dir / "chat"), data, val_data)
    info = {"model_type": name, "preset": preset, "init": str(init_path.resolve()), **data_info}
    return FineTuneInputs(name, init_path, model, tok, train, val, train_config(stage_values(preset, stage, overrides)),
                          info)


def run_sft(*, run_dir: str | Path, preset: str, model_type: str | None = None, layers: str | None = None,
            init: str | None = None, out: str | None = None, sft_data: str | None = None,
            sft_val_data: str | None = None, chat_dir: str | None = None, overrides: dict | None = None,
            device: str = "auto", resume: bool = False, overwrite: bool = False) -> TrainResult:
    run_dir = Path(run_dir)
    name, init_path, model, tok, train_convs, val_convs, tcfg, info = prepare_finetune(
        "sft", run_dir, preset, model_type, layers, init, chat_dir, sft_data, sft_val_data, overrides)
    info |= {"train_examples": len(train_convs), "val_examples": len(val_convs)}
    config = model.config

    def make_task(_model, _device):
        return SFTTask(tok, train_convs, val_convs, config.block_size, tcfg.seed, tcfg.batch_size * tcfg.grad_accum)

    stage = Stage(name="sft", out=Path(out) if out else run_dir / f"sft-{name}", config=config, tokenizer=tok,
                  tcfg=tcfg, info=info, make_task=make_task, init_state=model.state_dict(),
                  fixed={"init": str(init_path.resolve())})
    return run_stage(stage, device=device, resume=resume, overwrite=overwrite)
