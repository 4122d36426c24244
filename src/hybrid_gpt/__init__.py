"""hybrid-gpt: GPTs whose deep attention is replaced by a tiny static per-token MLP, measured honestly.

    from hybrid_gpt import load
    model, tokenizer = load("runs/cpu/pretrain-hybrid")
    logits = model(idx)            # idx: LongTensor [B, T] -> logits [B, T, vocab]
"""

from __future__ import annotations

__version__ = "0.1.0"

from hybrid_gpt.data.tokenizer import Tokenizer
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.infer.engine import KVCache, generate
from hybrid_gpt.model.gpt import GPT, GPTConfig


def load(path, device: str = "cpu"):
    """Load ``(model, tokenizer)`` from a checkpoint directory (or a .safetensors/.pt file inside one).

    ``.pt`` state dicts are read with ``weights_only=True``; nothing is unpickled.
    """
    from hybrid_gpt.checkpoint import load_checkpoint

    model, tokenizer, _ = load_checkpoint(path, device)
    return model, tokenizer


__all__ = ["GPT", "GPTConfig", "KVCache", "Tokenizer", "HybridGPTError", "generate", "load", "__version__"]
