"""hybrid-gpt: GPTs whose deep attention is replaced by a tiny static per-token MLP, measured honestly.

    from hybrid_gpt import load
    model, tokenizer = load("runs/cpu/pretrain-hybrid")
    logits = model(idx)            # idx: LongTensor [B, T] -> logits [B, T, vocab]

The public names are loaded on first use (PEP 562), so that importing the package, and with it the CLI's
`--help`, loads no torch.
"""

from __future__ import annotations

import importlib
import logging

from hybrid_gpt.errors import HybridGPTError

__version__ = "0.1.0"

# Every module logs to logging.getLogger(__name__), under this package's logger; the library configures
# nothing else (the CLI does, in hybrid_gpt.cli.main), so an application that imports it sees no message
# unless it configures logging itself.
logging.getLogger(__name__).addHandler(logging.NullHandler())

# Each lazily loaded public name -> the module that defines it.
_LAZY = {
    "GPT": "hybrid_gpt.model.gpt",
    "GPTConfig": "hybrid_gpt.model.gpt",
    "KVCache": "hybrid_gpt.infer.engine",
    "Tokenizer": "hybrid_gpt.data.tokenizer",
    "generate": "hybrid_gpt.infer.engine",
}


def load(path, device: str = "cpu"):
    """Load ``(model, tokenizer)`` from a checkpoint directory (or a .safetensors/.pt file inside one).

    ``.pt`` state dicts are read with ``weights_only=True``; nothing is unpickled.
    """
    from hybrid_gpt.checkpoint import load_checkpoint

    model, tokenizer, _ = load_checkpoint(path, device)
    return model, tokenizer


def __getattr__(name: str):
    """A public name of ``_LAZY``, imported from its module on first use and kept here; AttributeError else."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["GPT", "GPTConfig", "KVCache", "Tokenizer", "HybridGPTError", "generate", "load", "__version__"]
