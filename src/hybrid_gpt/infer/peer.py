"""The peer baseline: our standard model's weights in Hugging Face's GPT2LMHeadModel.

Our standard model is GPT-2's architecture (pre-LayerNorm, learned positions, tanh-GELU, tied
embeddings) with GPT-2's parameter names, so the mapping is exact: only GPT-2's Conv1D layers store
their weights transposed. `transformers` is an optional dependency (the `peer` extra).
"""

from __future__ import annotations

import torch

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.model.gpt import GPT

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MIXER = (".mixer.", ".attn.")  # our name for a block's token mixer, and GPT-2's


def to_hf_gpt2(model: GPT):
    """A GPT2LMHeadModel with the same configuration and weights (standard models only)."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:
        raise HybridGPTError("the peer baseline needs `transformers`: install it with `uv sync --extra peer`") from e
    cfg = model.config
    if set(cfg.layers) != {"A"}:
        raise HybridGPTError(f"only a standard (all-attention) model maps onto GPT-2, not {cfg.layers}")
    hf_config = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                           n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=4 * cfg.n_embd,
                           activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                           layer_norm_epsilon=1e-5, tie_word_embeddings=True, use_cache=True,
                           bos_token_id=0, eos_token_id=0)  # GPT-2's 50256 is outside our vocabulary
    hf = GPT2LMHeadModel(hf_config)
    ours = model.state_dict()
    state = {}
    for name, tensor in ours.items():
        if name == "lm_head.weight":
            continue
        key = name.replace(*MIXER)
        if key.endswith(CONV1D):
            tensor = tensor.t()
        state[key] = tensor.detach().clone().contiguous()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith(("attn.bias", "attn.masked_bias"))]
    if missing or unexpected:
        raise HybridGPTError(f"GPT-2 mapping failed: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    p = next(model.parameters())
    return hf.to(device=p.device, dtype=p.dtype).eval()


@torch.inference_mode()
def max_logit_difference(model: GPT, hf, idx: torch.Tensor) -> float:
    return (model(idx) - hf(idx).logits).abs().max().item()
