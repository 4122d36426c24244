"""The peer baseline: our all-attention model's weights in Hugging Face's own class of its family,
GPT2LMHeadModel (the GPT-2 family) or LlamaForCausalLM (the Llama family).

The configs and weights go through interop.hf, the one mapping between our names and HF's. `transformers`
is an optional dependency (the `peer` extra).
"""

from __future__ import annotations

import torch

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.interop.hf import family_of, hf_config, to_hf_state
from hybrid_gpt.model.gpt import GPT


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise HybridGPTError("the peer baseline needs `transformers`: install it with `uv sync --extra peer`") from e
    return transformers


def _build(model: GPT, config_class: str, model_class: str, **extra):
    """HF's ``model_class`` holding ``model``'s weights, on its device and in its dtype, in eval mode."""
    transformers = _transformers()
    cfg = model.config
    fields = {k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type")}
    hf = getattr(transformers, model_class)(getattr(transformers, config_class)(**fields, use_cache=True, **extra))
    state = to_hf_state(model.state_dict(), cfg)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:
        raise HybridGPTError(f"{model_class} mapping failed: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        hf.tie_weights()
    p = next(model.parameters())
    return hf.to(device=p.device, dtype=p.dtype).eval()


def to_hf_gpt2(model: GPT):
    """A GPT2LMHeadModel with the same configuration and weights (all-attention GPT-2-family models only)."""
    if family_of(model.config) != "gpt2":
        raise HybridGPTError(f"a model of the {model.config.family} family does not map onto GPT-2")
    # GPT-2's own bos/eos (50256) lie outside our vocabularies.
    return _build(model, "GPT2Config", "GPT2LMHeadModel", bos_token_id=0, eos_token_id=0)


def to_hf_llama(model: GPT):
    """A LlamaForCausalLM with the same configuration and weights (all-attention Llama-family models only)."""
    if family_of(model.config) != "llama":
        raise HybridGPTError(f"a model of the {model.config.family} family does not map onto Llama")
    return _build(model, "LlamaConfig", "LlamaForCausalLM", bos_token_id=None, eos_token_id=None, pad_token_id=None)


def to_hf(model: GPT):
    """HF's model of ``model``'s family (GPT-2 or Llama) with the same weights."""
    return {"gpt2": to_hf_gpt2, "llama": to_hf_llama}[family_of(model.config)](model)


@torch.inference_mode()
def max_logit_difference(model: GPT, hf, idx: torch.Tensor) -> float:
    return (model(idx) - hf(idx).logits).abs().max().item()
