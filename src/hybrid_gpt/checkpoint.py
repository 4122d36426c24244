"""Checkpoints are directories: config.json, model.safetensors, tokenizer.json, and for resume
trainer_state.pt (loaded with ``weights_only=True``: nothing is ever unpickled).

config.json holds the model config under "model" and how it was trained under "training".
A checkpoint is written to a temporary directory and swapped into place whole.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hybrid_gpt.data.tokenizer import Tokenizer
from hybrid_gpt.data.tokens import TokenData
from hybrid_gpt.errors import HybridGPTError, RunFailure
from hybrid_gpt.fsutil import read_json, recover_dir, replace_dir, write_json, write_text
from hybrid_gpt.model.gpt import GPT, GPTConfig
from hybrid_gpt.runtime import ensure_fits

FORMAT = "hybrid-gpt-checkpoint"
FORMAT_VERSION = 1
TIED = "lm_head.weight"  # stored once, as transformer.wte.weight


def is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "model.pt").is_file()
    )


def save_checkpoint(path: str | Path, model: GPT, tokenizer: Tokenizer, training: dict,
                    trainer_state: dict | None = None, files: dict[str, str] | None = None) -> None:
    """Write a complete checkpoint directory, atomically replacing any previous one at ``path``."""
    path = Path(path)
    model = getattr(model, "module", model)  # unwrap DDP
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.config.to_dict(),
                  "training": training}
        write_json(tmp / "config.json", config)
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if k != TIED}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_text(tmp / "tokenizer.json", tokenizer.to_str())
        for name, text in (files or {}).items():
            write_text(tmp / name, text)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer_state.pt")
    except (OSError, SafetensorError, RuntimeError) as e:  # safetensors and torch.save wrap I/O errors
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise RunFailure(f"could not write checkpoint {path}: {reason}; the previous one is intact") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, path)


def read_config(path: Path) -> tuple[GPTConfig, dict]:
    raw = read_json(path / "config.json", "checkpoint config")
    if not isinstance(raw, dict) or "model" not in raw:
        raise HybridGPTError(f"{path}/config.json is not a hybrid-gpt checkpoint config (no 'model' section)")
    return GPTConfig.from_dict(raw["model"]), raw.get("training", {})


def _check_tensors(state: dict, model: GPT, where: Path) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items() if k != TIED}
    state.pop(TIED, None)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if extra:
        problems.append(f"unexpected {extra}")
    if shapes:
        problems.append("mis-shaped " + ", ".join(
            f"{k} {tuple(state[k].shape)} != {tuple(expected[k])}" for k in shapes))
    if problems:
        raise HybridGPTError(f"weights in {where} do not match its config.json: " + "; ".join(problems))


def load_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".pt":
            state = torch.load(file, map_location="cpu", weights_only=True)
        else:
            state = load_file(str(file), device="cpu")
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HybridGPTError(f"cannot read weights {file}: it is corrupt or truncated ({reason})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HybridGPTError(f"{file} is not a state dict of tensors")
    return state


def resolve(path: str | Path) -> tuple[Path, Path]:
    """Return (checkpoint directory, weights file) for a checkpoint dir or a .pt/.safetensors file in one."""
    path = Path(path)
    if path.is_file() and path.suffix in (".pt", ".safetensors"):
        root, weights = path.parent, path
    else:
        recover_dir(path)
        if not path.exists():
            raise HybridGPTError(f"checkpoint {path} does not exist; train one with `hybrid-gpt pretrain`")
        if not path.is_dir():
            raise HybridGPTError(f"{path} is not a checkpoint directory (expected config.json and model.safetensors)")
        root = path
        weights = path / "model.safetensors"
        if not weights.is_file() and (path / "model.pt").is_file():
            weights = path / "model.pt"
    if not (root / "config.json").is_file() or not weights.is_file():
        raise HybridGPTError(f"{path} is not a checkpoint: it needs config.json and model.safetensors")
    return root, weights


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """Load (model, tokenizer, training info); the config is validated before any tensor is allocated."""
    root, weights = resolve(path)
    config, training = read_config(root)
    ensure_fits(4 * config.num_params(), f"the model in {root} ({config.num_params():,} fp32 parameters)")
    tokenizer = Tokenizer.from_file(root / "tokenizer.json")
    if tokenizer.vocab_size != config.vocab_size:
        raise HybridGPTError(
            f"{root}: tokenizer has {tokenizer.vocab_size} tokens but the model expects {config.vocab_size}"
        )
    state = load_weights(weights)
    model = GPT(config)
    _check_tensors(state, model, weights)
    model.load_state_dict(state, strict=False)  # strictness checked above; lm_head is tied to wte
    model.to(device).eval()
    return model, tokenizer, training


def checkpoint_data_dir(ckpt: Path, training: dict) -> Path:
    """Where a checkpoint's validation data lives: recorded at training time, else ``<ckpt>/../data``."""
    recorded = training.get("data_dir")
    if recorded and (Path(recorded) / "meta.json").is_file():
        return Path(recorded)
    return ckpt.parent / "data"


def checkpoint_data(ckpt: Path, tokenizer, training: dict, data_dir: str | Path | None = None) -> TokenData:
    """The prepared data a checkpoint is evaluated on (``data_dir``, else :func:`checkpoint_data_dir`),
    refused when it was tokenized with another tokenizer: its token ids would mean other text."""
    data = TokenData.open(data_dir or checkpoint_data_dir(ckpt, training))
    if data.meta["tokenizer_sha256"] != tokenizer.sha256():
        raise HybridGPTError(f"the checkpoint's tokenizer differs from the one in {data.root}; "
                             "pass --data with the data it was trained on")
    return data
