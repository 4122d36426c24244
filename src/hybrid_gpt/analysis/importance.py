"""Layer importance: which attention layers does a trained model need?

For each attention layer, two measures over validation tokens, without retraining:

- similarity: the mean cosine between the residual stream before and after the attention sub-layer,
  the criterion of He et al. (2024), "What Matters in Transformers? Not All Attention is Needed".
  A layer whose output barely turns the residual stream (cosine near 1) is a candidate to drop.
- loss increase: validation loss when the layer's attention is dropped (the block acts as `N`) or
  replaced by its mean output vector over the validation tokens (a constant: the crudest static function).

Layers are ranked from least to most important, and the k least important by the drop loss increase
give a recommended pattern (those layers become `M`), set against the original hybrid's choice of
replacing the deepest attention layers.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import check_replaceable, output_dir
from hybrid_gpt.model.gpt import GPT, mixer_activations
from hybrid_gpt.present.importance import write_outputs
from hybrid_gpt.train.evaluate import (
    EVAL_TOKENS,
    check_budget,
    evaluate_lm,
    evaluating,
    model_windows,
    window_length,
)

logger = logging.getLogger(__name__)

INTERVENTIONS = ("drop", "mean")


class ConstantMixer(nn.Module):
    """Stands in for an attention sub-layer: the same output vector at every position, whatever the input."""

    def __init__(self, vector: torch.Tensor):
        super().__init__()
        self.register_buffer("vector", vector.detach().clone())

    def forward(self, x: torch.Tensor, kv_cache=None) -> torch.Tensor:
        return self.vector.to(x.dtype).expand_as(x)


# What an importance output directory holds: it replaces only a directory of these.
IMPORTANCE_FILES = ("importance.json", "importance.md", "importance-layers.png")

def attention_layers(model: GPT) -> list[int]:
    """Block indices (0-based) whose mixer is attention."""
    return [i for i, kind in enumerate(model.config.layers) if kind == "A"]


@contextmanager
def swapped_mixers(model: GPT, replacements: dict[int, nn.Module | None]):
    """Temporarily replace the token mixer of some attention blocks (None: drop it, the block acts as `N`).

    The original modules are put back in ``finally``, so the model is exactly as before even after an error.
    """
    blocks = model.transformer.h
    for i in replacements:
        if not 0 <= i < len(blocks) or blocks[i].kind != "A":
            raise HybridGPTError(f"block {i} of pattern {model.config.layers!r} is not an attention layer")
    originals = {i: blocks[i].mixer for i in replacements}
    try:
        for i, module in replacements.items():
            blocks[i].mixer = module
        yield model
    finally:
        for i, module in originals.items():
            blocks[i].mixer = module


@torch.no_grad()
def attention_stats(model: GPT, tokens: np.ndarray, max_tokens: int = EVAL_TOKENS, batch_size: int = 16,
                    context: int | None = None) -> tuple[list[float | None], list[torch.Tensor | None]]:
    """Per block: mean cos(x, x + mixer(ln_1(x))) over tokens, and the attention's mean output vector.

    Over the windows evaluate_lm reads, from the model's own forward (model.gpt.mixer_activations), so
    nothing here re-implements the block. Non-attention blocks give None.
    """
    layers = attention_layers(model)
    cos_sum = {i: 0.0 for i in layers}
    out_sum = {i: None for i in layers}
    count = 0
    with evaluating(model) as model:
        device = next(model.parameters()).device
        for chunk in model_windows(model, tokens, max_tokens, batch_size, context):
            x = chunk[:, :-1].to(device)
            for i, (before, out) in mixer_activations(model, x, layers).items():
                before, out = before.float(), out.float()
                cos_sum[i] += F.cosine_similarity(before, before + out, dim=-1).double().sum().item()
                total = out.double().sum(dim=(0, 1))
                out_sum[i] = total if out_sum[i] is None else out_sum[i] + total
            count += x.numel()
    dtype = next(model.parameters()).dtype
    similarity = [cos_sum[i] / count if i in cos_sum else None for i in range(model.config.n_layer)]
    means = [(out_sum[i] / count).to(dtype) if i in out_sum else None for i in range(model.config.n_layer)]
    return similarity, means


def _require_attention(model: GPT, what: str) -> list[int]:
    layers = attention_layers(model)
    if not layers:
        raise HybridGPTError(f"{what} has pattern {model.config.layers!r} with no attention layers (A); "
                             "layer importance ranks attention layers, so analyse a model that has some")
    return layers


def layer_similarity(model: GPT, tokens: np.ndarray, max_tokens: int = EVAL_TOKENS) -> list[float | None]:
    """Mean cosine between the residual stream before and after each attention sub-layer (None elsewhere)."""
    return attention_stats(model, tokens, max_tokens)[0]


def _replacements(kind: str, layers: list[int], means: list) -> dict[int, nn.Module | None]:
    if kind == "drop":
        return {i: None for i in layers}
    return {i: ConstantMixer(means[i]) for i in layers}


def _scored(ev: dict, intact: dict) -> dict:
    return {"loss": ev["loss"], "bpb": ev["bpb"], "loss_increase": ev["loss"] - intact["loss"],
            "bpb_increase": ev["bpb"] - intact["bpb"]}


def _spearman(a: list[int], b: list[int]) -> float | None:
    """Rank correlation of two orderings of the same layers (no ties: each is a permutation)."""
    n = len(a)
    if n < 2:
        return None
    pos = {layer: r for r, layer in enumerate(b)}
    d2 = sum((r - pos[layer]) ** 2 for r, layer in enumerate(a))
    return 1.0 - 6.0 * d2 / (n * (n * n - 1))


def _pattern(layers: str, replace: list[int]) -> str:
    return "".join("M" if i in replace else c for i, c in enumerate(layers))


def analyse(model: GPT, tokens: np.ndarray, byte_lengths: np.ndarray, max_tokens: int = EVAL_TOKENS,
            replace: int | None = None, context: int | None = None) -> dict:
    """Similarity, intervention losses, rankings and the recommended pattern for one model (layers 1-based)."""
    pattern = model.config.layers
    attn = _require_attention(model, "the model")
    k = max(1, len(attn) // 2) if replace is None else replace
    if not 1 <= k <= len(attn):
        raise HybridGPTError(f"replace {k} must be between 1 and the model's {len(attn)} attention layers")
    # From one token every mean-output loss is exactly the intact one: a ranking of nothing, refused.
    check_budget("max_tokens", max_tokens, len(tokens), window_length(model, context))

    def evaluate(kind=None, layers=()):
        if kind is None:
            return evaluate_lm(model, tokens, byte_lengths, max_tokens, context=context)
        with swapped_mixers(model, _replacements(kind, list(layers), means)):
            return evaluate_lm(model, tokens, byte_lengths, max_tokens, context=context)

    logger.info(f"measuring the residual stream around {len(attn)} attention layers of {pattern}")
    similarity, means = attention_stats(model, tokens, max_tokens, context=context)
    intact = evaluate()
    logger.info(f"intact: loss {intact['loss']:.4f}, {intact['bpb']:.4f} bits/byte over {intact['tokens']:,} tokens")
    per_layer = []
    for i in attn:
        row = {"layer": i + 1, "similarity": similarity[i]}
        for kind in INTERVENTIONS:
            row[kind] = _scored(evaluate(kind, [i]), intact)
        logger.info(f"layer {i + 1}: cos {similarity[i]:.4f}, drop {row['drop']['loss_increase']:+.4f}, "
                    f"mean {row['mean']['loss_increase']:+.4f} nats/token")
        per_layer.append(row)

    # Least important first; sorted() is stable, so ties keep layer order.
    by_similarity = [r["layer"] for r in sorted(per_layer, key=lambda r: -r["similarity"])]
    by_drop = [r["layer"] for r in sorted(per_layer, key=lambda r: r["drop"]["loss_increase"])]
    by_mean = [r["layer"] for r in sorted(per_layer, key=lambda r: r["mean"]["loss_increase"])]
    chosen = sorted(by_drop[:k])
    deep = sorted(i + 1 for i in attn[-k:])
    sets = {"recommended": chosen} if chosen == deep else {"recommended": chosen, "deep": deep}
    joint = {}
    for name, layers in sets.items():
        joint[name] = {kind: _scored(evaluate(kind, [n - 1 for n in layers]), intact) for kind in INTERVENTIONS}
    joint.setdefault("deep", joint["recommended"])
    return {
        "layers": pattern,
        "intact": {key: intact[key] for key in ("loss", "bpb", "perplexity", "tokens", "bytes")},
        "similarity": similarity,
        "per_layer": per_layer,
        "ranking": {
            "by_similarity": by_similarity,
            "by_drop": by_drop,
            "by_mean": by_mean,
            "orders_agree": by_similarity == by_drop,
            "spearman": _spearman(by_similarity, by_drop),
            "least_important_agree": sorted(by_similarity[:k]) == chosen,
        },
        "recommendation": {
            "k": k,
            "chosen_by": "drop loss increase",
            "replace": chosen,
            "pattern": _pattern(pattern, [n - 1 for n in chosen]),
            "deep_replace": deep,
            "deep_pattern": _pattern(pattern, [n - 1 for n in deep]),
            "same_as_deep": chosen == deep,
            "joint": joint,
        },
    }


def default_out_dir(checkpoint_root: Path) -> Path:
    """``<run dir>/importance/<checkpoint name>``: beside the checkpoint, never inside it."""
    return checkpoint_root.parent / "importance" / checkpoint_root.name


def run_importance(checkpoint: str | Path, out_dir: str | Path | None = None, max_tokens: int = EVAL_TOKENS,
                   replace: int | None = None, data_dir: str | Path | None = None, device: str = "cpu",
                   context: int | None = None) -> dict:
    """Analyse one checkpoint; write importance.json, importance.md and importance-layers.png; return the dict."""
    from hybrid_gpt.checkpoint import checkpoint_data, load_checkpoint, resolve
    from hybrid_gpt.runtime import resolve_device

    if max_tokens < 1:
        raise HybridGPTError(f"max_tokens must be positive, got {max_tokens}")
    root, _ = resolve(checkpoint)
    out = Path(out_dir) if out_dir is not None else default_out_dir(root)
    if out.resolve() == root.resolve() or root.resolve() in out.resolve().parents:
        raise HybridGPTError(f"the output directory {out} is inside the checkpoint {root}; choose another")
    check_replaceable(out, IMPORTANCE_FILES, "layer-importance output")  # before the work, not after it
    model, tok, training = load_checkpoint(checkpoint, resolve_device(device))
    _require_attention(model, str(root))
    context = window_length(model, context)  # checked before the work
    data = checkpoint_data(root, tok, training, data_dir)

    result = {
        "checkpoint": str(root),
        "model": model.config.to_dict(),
        "settings": {"max_tokens": max_tokens, "replace": replace, "context": context,
                     "device": str(next(model.parameters()).device)},
        "data": {"dir": str(Path(data.root).resolve()), "source": data.meta["source"],
                 "documents": data.meta["splits"]["val"]["documents"]},
        **analyse(model, data.val, tok.token_byte_lengths(), max_tokens, replace, context=context),
    }
    result["out_dir"] = str(out)
    with output_dir(out, allowed=IMPORTANCE_FILES, what="layer-importance output", overwrite=True) as tmp:
        write_outputs(result, tmp)
    logger.info(f"wrote {out / 'importance.md'}")
    return result
