"""Named sizes. Every value can be overridden by the matching CLI flag."""

from __future__ import annotations

from hybrid_gpt.errors import HybridGPTError

DEFAULT_SEED = 1337  # every stage's and analysis's default seed, defined once

PRESETS: dict[str, dict] = {
    # Seconds on a CPU: what the test suite uses.
    "smoke": dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=512, batch_size=8, grad_accum=1,
                  max_steps=20, lr=3e-3, min_lr_ratio=0.1, warmup_steps=2, weight_decay=0.1,
                  eval_interval=10, eval_tokens=4096, dropout=0.0, grad_clip=1.0,
                  sft=dict(max_steps=10, lr=1e-3, batch_size=8, warmup_steps=2, eval_interval=5, weight_decay=0.0),
                  dpo=dict(max_steps=10, lr=1e-4, batch_size=4, warmup_steps=2, eval_interval=5, weight_decay=0.0)),
    # About 4 minutes per pretraining run on a 2-core CPU.
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=4096, batch_size=32, grad_accum=1,
                max_steps=800, lr=3e-3, min_lr_ratio=0.1, warmup_steps=50, weight_decay=0.1,
                eval_interval=200, eval_tokens=32768, dropout=0.0, grad_clip=1.0,
                sft=dict(max_steps=300, lr=1e-3, batch_size=32, warmup_steps=20, eval_interval=100,
                         weight_decay=0.0),
                dpo=dict(max_steps=300, lr=1.5e-4, batch_size=16, warmup_steps=10, eval_interval=100,
                         weight_decay=0.0)),
    # The original experiment's shape (4 layers, d 384, 6 heads, context 256), for a GPU.
    "seed": dict(n_layer=4, n_head=6, n_embd=384, block_size=256, vocab_size=4096, batch_size=64, grad_accum=1,
                 max_steps=5000, lr=1e-3, min_lr_ratio=0.1, warmup_steps=200, weight_decay=0.1,
                 eval_interval=500, eval_tokens=131072, dropout=0.1, grad_clip=1.0,
                 sft=dict(max_steps=1000, lr=3e-4, batch_size=64, warmup_steps=50, eval_interval=250,
                          weight_decay=0.0),
                 dpo=dict(max_steps=500, lr=1e-5, batch_size=32, warmup_steps=25, eval_interval=100,
                          weight_decay=0.0)),
}
# The cpu shape at context 1,024 with the same 4,096 tokens per step: a from-scratch testbed whose context is long
# enough for the hybrid's speed gain to show; whether it can see depth is ablate's AA - AAAA check.
_cpu = PRESETS["cpu"]
PRESETS["depth"] = {**_cpu, "block_size": 1024, "batch_size": 4, "sft": {**_cpu["sft"], "batch_size": 4},
                    "dpo": {**_cpu["dpo"], "batch_size": 2}}
STAGES = ("pretrain", "sft", "dpo")
for _preset in PRESETS.values():  # fine-tuning stages record the baseline they start from
    for _stage in ("sft", "dpo"):
        _preset[_stage]["eval_at_start"] = True


def default_preset() -> str:
    import torch

    return "seed" if torch.cuda.is_available() else "cpu"


def get_preset(name: str) -> dict:
    """The preset's pretraining values (model shape and training settings)."""
    if name not in PRESETS:
        raise HybridGPTError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return {k: v for k, v in PRESETS[name].items() if k not in STAGES}


def stage_values(name: str, stage: str, overrides: dict | None = None) -> dict:
    """A stage's settings: the preset's base values, its stage-specific ones, then explicit flags."""
    values = get_preset(name)
    values.update(PRESETS[name].get(stage, {}))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return values


def layer_pattern(model_type: str | None, layers: str | None, n_layer: int, explicit_n_layer: bool = False
                  ) -> tuple[str, str]:
    """Return (pattern, name) from --model-type / --layers. The name labels run directories.

    --layers sets the depth itself; it conflicts with --n-layer only when both are given and disagree.
    Its letters are checked where the pattern is used, by GPTConfig.validate (model.gpt.check_layers, the
    one validator of layer patterns, which this module cannot import: presets come before the model).
    """
    if layers:
        if model_type:
            raise HybridGPTError("give either model_type or layers, not both")
        pattern = layers.strip().upper()
        if explicit_n_layer and len(pattern) != n_layer:
            raise HybridGPTError(f"layers {layers!r} has {len(pattern)} letters but n_layer is {n_layer}")
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
    raise HybridGPTError(f"unknown model_type {model_type!r}; choose standard or hybrid (or give a layer pattern)")
