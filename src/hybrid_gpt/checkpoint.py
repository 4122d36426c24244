"""Checkpoints are directories: config.json, model.safetensors, tokenizer.json, chat_template.json when
the chat template is not ours, and for resume trainer_state.pt (loaded with ``weights_only=True``: nothing
is ever unpickled).

config.json holds the model config under "model" and how it was trained under "training".
A checkpoint is written to a temporary directory and swapped into place whole.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from hybrid_gpt.data.tokenizer import TOKENIZER_FILES, Tokenizer, load_tokenizer, save_tokenizer
from hybrid_gpt.data.tokens import TokenData
from hybrid_gpt.errors import HybridGPTError, RunFailure
from hybrid_gpt.fsutil import clip, read_json, recover_dir, staged_dir, write_bytes, write_json, write_text
from hybrid_gpt.model.gpt import GPT, GPTConfig
from hybrid_gpt.runtime import ensure_fits

logger = logging.getLogger(__name__)

FORMAT = "hybrid-gpt-checkpoint"
FORMAT_VERSION = 1
TIED = "lm_head.weight"  # stored once, as transformer.wte.weight
# Every name a checkpoint directory may hold: replacing one that holds anything else would delete a user's file.
CHECKPOINT_FILES = ("config.json", "model.safetensors", "model.pt", *TOKENIZER_FILES,
                    "trainer_state.pt", "metrics.jsonl")


def is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "model.pt").is_file()
    )


def refuse_foreign(path: str | Path, mark: str = "model", whose: str = "a hybrid-gpt checkpoint's") -> None:
    """Refuse a directory whose config.json is some other program's (a Hugging Face model directory holds
    config.json, model.safetensors and tokenizer.json too, so names alone do not tell it from ours):
    replacing it would delete that model. Ours holds an object under ``mark`` ("model" in a checkpoint's; an
    export's has its own mark). A config.json that does not parse is left to the usual checks."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return
    try:
        raw = read_json(file, "config")
    except HybridGPTError:
        return
    if not isinstance(raw, dict) or not isinstance(raw.get(mark), dict):
        raise HybridGPTError(f"{path} holds a config.json that is not {whose} (another model's?); it is left "
                             "untouched (choose another output path)")


def save_checkpoint(path: str | Path, model: GPT, tokenizer: Tokenizer, training: dict,
                    trainer_state: dict | None = None, files: dict[str, str] | None = None) -> None:
    """Write a complete checkpoint directory, atomically replacing any previous one at ``path``.

    Weights that are not all finite are refused (nothing is written): such a checkpoint can never be used,
    and marking it complete would pass a diverged run off as a finished one.
    """
    path = Path(path)
    model = getattr(model, "module", model)  # unwrap DDP
    state = {k: v.detach().to("cpu").contiguous() for k, v in own_tensors(model.state_dict(), model).items()}
    bad = _non_finite(state)
    if bad:
        raise RunFailure(
            f"the weights of {path} became non-finite by step {training.get('step', '?')} (first in {bad}): training "
            "diverged, so nothing was saved (a previous checkpoint stays as it was); check that the learning rate, "
            "weight decay and gradient clip are finite and not too large"
        )
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.config.to_dict(),
              "training": training}
    allowed = (*CHECKPOINT_FILES, *(files or {}))
    with staged_dir(path, allowed, "checkpoint") as tmp:
        refuse_foreign(path)  # after staged_dir's own checks: a directory of other names says so first
        write_json(tmp / "config.json", config)
        write_bytes(tmp / "model.safetensors", save_safetensors(state, metadata={"format": "pt"}))
        save_tokenizer(tokenizer, tmp)
        for name, text in (files or {}).items():
            write_text(tmp / name, text)
        if trainer_state is not None:
            buf = io.BytesIO()  # serialized here, written by us: a full disk then says so instead of a C++ assert
            torch.save(trainer_state, buf)
            write_bytes(tmp / "trainer_state.pt", buf.getbuffer())


# Fields of the "training" section that code reads, with their types: a config.json of another shape
# is refused when read, not when some command trips over it.
TRAINING_TYPES = {"stage": str, "model_type": str, "preset": str, "data_dir": str, "data_tokenizer_sha256": str,
                  "init": str, "complete": bool, "step": int, "max_steps": int, "tokens_seen": int,
                  "train_config": dict, "fixed": dict, "last_eval": dict}


def _type_name(t: type) -> str:
    return {str: "a string", bool: "true or false", int: "a whole number", dict: "an object"}[t]


def read_config(path: Path) -> tuple[GPTConfig, dict]:
    """(model config, training info) of a checkpoint directory, validated before anything is allocated."""
    recover_dir(path)
    where = f"{path}/config.json"
    raw = read_json(path / "config.json", "checkpoint config")
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise HybridGPTError(f"{where} is not a hybrid-gpt checkpoint config (no 'model' object)")
    # Written by every version so far; a config of another format or of a later version would be misread.
    fmt, version = raw.get("format", FORMAT), raw.get("format_version", FORMAT_VERSION)
    if fmt != FORMAT or not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise HybridGPTError(f"{where} is of format {clip(json.dumps(fmt))} version {clip(json.dumps(version))}; this "
                             f"hybrid-gpt reads {FORMAT} versions 1 to {FORMAT_VERSION}")
    training = raw.get("training", {})
    if not isinstance(training, dict):
        raise HybridGPTError(f"{where}: 'training' must be an object, got {type(training).__name__}")
    for key, t in TRAINING_TYPES.items():
        value = training.get(key)
        if value is not None and (not isinstance(value, t) or (t is int and isinstance(value, bool))):
            raise HybridGPTError(f"{where}: training.{key} must be {_type_name(t)}, got {clip(json.dumps(value))}")
    try:  # every field's type and range (its layer pattern's length too) before anything is computed from it
        config = GPTConfig.from_dict(raw["model"])
    except (HybridGPTError, TypeError) as e:  # bounded: the error may quote the file's values
        raise HybridGPTError(f"{where}: {clip(e, 200)}") from e
    return config, training


def _non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding NaN or infinity, or None."""
    return next((k for k, v in state.items() if not bool(torch.isfinite(v).all())), None)


def _names(keys) -> str:
    keys = sorted(keys)
    return ", ".join(clip(k, 80) for k in keys[:5]) + (f" and {len(keys) - 5:,} more" if len(keys) > 5 else "")


def own_tensors(state: dict, model: GPT) -> dict:
    """``state`` without lm_head.weight when the model ties it to wte (one tensor, stored once); an untied
    lm_head is a tensor of its own and stays. What a checkpoint stores, and a hybrid's Hugging Face export."""
    tied = model.config.tie_embeddings
    return {k: v for k, v in state.items() if not (tied and k == TIED)}


def _check_tensors(state: dict, model: GPT, where: Path) -> None:
    expected = {k: v.shape for k, v in own_tensors(model.state_dict(), model).items()}
    if model.config.tie_embeddings:
        state.pop(TIED, None)
    missing = set(expected) - set(state)
    extra = set(state) - set(expected)
    shapes = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"missing {_names(missing)}")
    if extra:
        problems.append(f"unexpected {_names(extra)}")
    if shapes:
        problems.append("mis-shaped " + ", ".join(
            f"{clip(k, 80)} {tuple(state[k].shape)} != {tuple(expected[k])}" for k in shapes[:5]))
    if problems:
        raise HybridGPTError(f"weights in {where} do not match its config.json: " + "; ".join(problems))
    # Casting an integer, boolean or complex tensor into a float parameter would change its values silently.
    wrong = sorted(k for k, v in state.items() if not v.is_floating_point())
    if wrong:
        raise HybridGPTError(f"weights in {where} must be floating point: {_names(wrong)} "
                             f"{'is' if len(wrong) == 1 else 'are'} {state[wrong[0]].dtype}")
    bad = _non_finite(state)
    if bad:
        raise HybridGPTError(f"weights in {where} are not finite ({bad} holds NaN or infinity): "
                             "the run that wrote them diverged")


def load_state(model: GPT, state: dict[str, torch.Tensor], where: Path) -> None:
    """Load ``state`` into ``model``: exactly its tensors (a tied lm_head aside), in their shapes,
    floating point and finite; anything else is a one-line error naming the tensor. Used by every load
    and by --resume, so a damaged checkpoint never trains on with re-initialised tensors."""
    _check_tensors(state, model, where)
    model.load_state_dict(state, strict=False)  # strictness checked above; a tied lm_head is wte


def weights_limit(config: GPTConfig) -> int:
    """The most bytes a weights file of ``config`` may take: float64 (the widest we accept) plus headers
    (num_params counts an untied lm_head, which the file then holds).
    Checked before reading, so a file padded with a huge extra tensor is never loaded into memory."""
    return 8 * config.num_params() + (16 << 20)


def load_weights(file: Path, limit: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors in ``file`` (safetensors, or a state dict loaded with ``weights_only=True``);
    with ``limit``, a larger file is refused before it is read."""
    size = file.stat().st_size if file.is_file() else 0
    if limit is not None and size > limit:
        raise HybridGPTError(f"weights {file} are {size:,} bytes, more than its config.json's model can take "
                             f"({limit:,}); the file is damaged or belongs to another model")
    try:
        if file.suffix == ".pt":
            state = torch.load(file, map_location="cpu", weights_only=True)
        else:
            state = load_file(str(file), device="cpu")
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HybridGPTError(f"cannot read weights {file}: it is corrupt or truncated ({clip(reason, 120)})") from e
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


def weights_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint's weights file: its identity wherever it lies, which its path is not (a resumable
    analysis started under one path continues under another) and its config is not (it records paths)."""
    import hashlib

    _, weights = resolve(path)
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """Load (model, tokenizer, training info); the config is validated before any tensor is allocated."""
    root, weights = resolve(path)
    config, training = read_config(root)
    what = f"the model in {root} ({config.num_params():,} fp32 parameters)"
    hint = "free memory, or use a smaller model"
    ensure_fits(4 * config.num_params(), what, hint=hint)  # weights are read into host memory first
    if torch.device(device).type == "cuda":
        ensure_fits(4 * config.num_params(), what, device, hint=hint)
    tokenizer = load_tokenizer(root)
    if tokenizer.vocab_size != config.vocab_size:
        raise HybridGPTError(
            f"{root}: tokenizer has {tokenizer.vocab_size} tokens but the model expects {config.vocab_size}"
        )
    state = load_weights(weights, weights_limit(config))
    model = GPT(config)
    load_state(model, state, weights)
    model.to(device).eval()
    logger.debug(f"loaded {weights} ({config.layers}, {config.num_params():,} parameters) on {device}")
    return model, tokenizer, training


# Keys of a checkpoint's "training" that name the checkpoint it was made from (SFT/DPO: init; distill and
# retrofit: teacher): a checkpoint that records no data of its own was evaluated on that one's.
PARENT_KEYS = ("init", "teacher")
MAX_LINEAGE = 16  # checkpoints followed back before giving up (a cycle of configs cannot loop forever)


def _recorded_data_dir(ckpt: Path, training: dict) -> Path | None:
    """The data directory ``training`` (or, failing that, the checkpoint it was made from, and so on) records,
    where it still holds prepared data; None if none does."""
    seen = set()
    for _ in range(MAX_LINEAGE):
        recorded = training.get("data_dir")
        if isinstance(recorded, str) and recorded:  # a relative one (older retrofit arms): from here, or ckpt
            for path in dict.fromkeys((Path(recorded), ckpt / recorded)):
                if (path / "meta.json").is_file():
                    return path
        parent = next((training[k] for k in PARENT_KEYS if isinstance(training.get(k), str) and training[k]), None)
        if parent is None or parent in seen or not (Path(parent) / "config.json").is_file():
            return None
        seen.add(parent)
        try:
            ckpt, training = Path(parent), read_config(Path(parent))[1]
        except HybridGPTError:  # a damaged ancestor: only its data was wanted
            return None
    return None


def checkpoint_data_dir(ckpt: Path, training: dict) -> Path:
    """Where a checkpoint's validation data lives: the data directory its config.json records (or that of the
    checkpoint it was fine-tuned or distilled from, followed back), else ``<ckpt>/../data``. Recorded paths
    are absolute, so a checkpoint written with --out anywhere still finds its data."""
    return _recorded_data_dir(ckpt, training) or ckpt.parent / "data"


def checkpoint_data(ckpt: Path, tokenizer, training: dict, data_dir: str | Path | None = None) -> TokenData:
    """The prepared data a checkpoint is evaluated on (``data_dir``, else :func:`checkpoint_data_dir`),
    refused when it was tokenized with another tokenizer: its token ids would mean other text.

    The one check every analysis that reads a model's tokens goes through (eval, bench, importance, distill,
    retrofit, probe, static), called before any work, so that no figure is computed on data that is not the
    model's and no error comes after minutes of work."""
    root = Path(data_dir) if data_dir is not None else checkpoint_data_dir(ckpt, training)
    if data_dir is None and not (root / "meta.json").is_file():
        recorded = training.get("data_dir")
        said = (f"its config.json records data {clip(recorded)}, which holds no prepared data now, and "
                if recorded else "its config.json records no data directory, and ")
        raise HybridGPTError(f"no prepared data for the checkpoint {ckpt}: {said}{root} holds none; pass --data "
                             "with the directory it was trained on (from `hybrid-gpt prepare`), or prepare data "
                             f"with its tokenizer: `hybrid-gpt prepare --tokenizer {ckpt}`")
    data = TokenData.open(root)
    check_data_tokenizer(data, tokenizer, f"the checkpoint {ckpt}")
    return data


def check_data_tokenizer(data: TokenData, tokenizer, whose: str) -> None:
    """HybridGPTError unless ``data`` was tokenized with ``tokenizer`` (the same sha256): ids of another
    tokenizer are other text, and scoring a model on them gives a plausible, wrong figure."""
    if data.meta["tokenizer_sha256"] != tokenizer.sha256():
        raise HybridGPTError(f"the tokenizer of {whose} differs from the one the data in {data.root} was tokenized "
                             "with; pass --data with the data it was trained on, or prepare some with "
                             "`hybrid-gpt prepare --tokenizer CKPT`")


def open_checkpoint_data(path: str | Path, data_dir: str | Path | None = None) -> TokenData:
    """:func:`checkpoint_data` of the checkpoint at ``path`` from its config.json and tokenizer alone (no
    weights are loaded): the up-front check of a command that loads the model later."""
    root, _ = resolve(path)
    _, training = read_config(root)
    return checkpoint_data(root, load_tokenizer(root), training, data_dir)
