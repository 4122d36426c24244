"""Named sizes. Every value can be overridden by the matching CLI flag."""

from __future__ import annotations

from .errors import HybridGPTError

PRESETS: dict[str, dict] = {
    # Seconds on a CPU: what the test suite uses.
    "smoke": dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=512, batch_size=8, grad_accum=1,
                  max_steps=20, lr=3e-3, min_lr_ratio=0.1, warmup_steps=2, weight_decay=0.1,
                  eval_interval=10, eval_tokens=4096, dropout=0.0, grad_clip=1.0),
    # About 4 minutes per pretraining run on a 2-core CPU.
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=4096, batch_size=32, grad_accum=1,
                max_steps=800, lr=3e-3, min_lr_ratio=0.1, warmup_steps=50, weight_decay=0.1,
                eval_interval=200, eval_tokens=32768, dropout=0.0, grad_clip=1.0),
    # The original experiment's shape (4 layers, d 384, 6 heads, context 256), for a GPU.
    "seed": dict(n_layer=4, n_head=6, n_embd=384, block_size=256, vocab_size=4096, batch_size=64, grad_accum=1,
                 max_steps=5000, lr=1e-3, min_lr_ratio=0.1, warmup_steps=200, weight_decay=0.1,
                 eval_interval=500, eval_tokens=131072, dropout=0.1, grad_clip=1.0),
}


def default_preset() -> str:
    import torch

    return "seed" if torch.cuda.is_available() else "cpu"


def get_preset(name: str) -> dict:
    if name not in PRESETS:
        raise HybridGPTError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def layer_pattern(model_type: str | None, layers: str | None, n_layer: int, explicit_n_layer: bool = False
                  ) -> tuple[str, str]:
    """Return (pattern, name) from --model-type / --layers. The name labels run directories.

    --layers sets the depth itself; it conflicts with --n-layer only when both are given and disagree.
    """
    if layers:
        if model_type:
            raise HybridGPTError("pass either --model-type or --layers, not both")
        pattern = layers.strip().upper()
        if not pattern or set(pattern) - set("AMN"):
            raise HybridGPTError(f"--layers {layers!r} must use only A (attention), M (per-token MLP), N (none)")
        if explicit_n_layer and len(pattern) != n_layer:
            raise HybridGPTError(f"--layers {layers!r} has {len(pattern)} letters but --n-layer is {n_layer}")
        n = len(pattern)
        if pattern == "A" * n:
            return pattern, "standard"
        if n >= 2 and pattern == "A" * (n // 2) + "M" * (n - n // 2):
            return pattern, "hybrid"
        return pattern, pattern
    model_type = model_type or "standard"
    if model_type == "standard":
        return "A" * n_layer, "standard"
    if model_type == "hybrid":
        if n_layer < 2:
            raise HybridGPTError("a hybrid model needs at least 2 layers (attention first, MLP after)")
        return "A" * (n_layer // 2) + "M" * (n_layer - n_layer // 2), "hybrid"
    raise HybridGPTError(f"unknown --model-type {model_type!r}; choose standard or hybrid (or pass --layers)")
