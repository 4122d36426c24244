"""interop.hf: the one mapping between our models and Hugging Face's, both directions."""

import json

import pytest
import torch
from hf_models import tiny_gpt2, tiny_llama

from hybrid_gpt.checkpoint import load_state
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.interop.hf import config_from_hf, from_hf_state, hf_config, to_hf_state
from hybrid_gpt.model.gpt import GPT, GPTConfig

pytest.importorskip("transformers")


def _ours(hf):
    """Our model of HF's ``hf`` through config_from_hf and from_hf_state."""
    cfg = config_from_hf(json.loads(hf.config.to_json_string()), "config.json")
    model = GPT(cfg)
    load_state(model, from_hf_state(hf.state_dict(), cfg, "hf"), "hf")
    return model.eval()


@pytest.mark.parametrize("make", [lambda: tiny_llama(tied=True), lambda: tiny_llama(tied=False),
                                  lambda: tiny_llama(attention_bias=True, mlp_bias=True), tiny_gpt2],
                         ids=["llama-tied", "llama-untied", "llama-bias", "gpt2"])
def test_mapped_weights_give_hf_logits_and_map_back_unchanged(make):
    hf = make()
    model = _ours(hf)
    idx = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() <= 1e-4
    # Back to HF's names: every tensor of HF's state dict, bit for bit (a tied lm_head is HF's wte).
    back, theirs = to_hf_state(model.state_dict(), model.config), hf.state_dict()
    assert set(theirs) - set(back) <= {"lm_head.weight"} and set(back) <= set(theirs)
    assert all(torch.equal(back[k], theirs[k]) for k in back)


@pytest.mark.parametrize("cfg", [
    GPTConfig.llama(vocab_size=300, block_size=64, n_embd=64, n_head=4, n_kv_head=2, layers="AAA", ffn_hidden=96,
                    rope_theta=5e5, norm_eps=1e-6, tie_embeddings=False),
    GPTConfig.llama(vocab_size=300, n_embd=64, n_head=8, layers="A", bias=True),
    GPTConfig(vocab_size=300, block_size=64, n_embd=64, n_head=4, layers="AA", norm_eps=1e-6)])
def test_configs_map_both_ways(cfg):
    back = config_from_hf(json.loads(json.dumps(hf_config(cfg))), "config.json")
    # The same model, its widths spelled out where ours were derived (ffn_hidden 0: 4 * n_embd).
    assert hf_config(back) == hf_config(cfg) and back.num_params() == cfg.num_params()
    assert (back.ffn_width, back.kv_heads, back.family) == (cfg.ffn_width, cfg.kv_heads, cfg.family)


def test_hf_config_is_the_one_transformers_reads():
    """hf_config's fields build HF's own config of the same model (what save_pretrained writes back)."""
    from transformers import LlamaConfig

    cfg = GPTConfig.llama(vocab_size=300, block_size=64, n_embd=64, n_head=4, n_kv_head=2, layers="AA",
                          ffn_hidden=96, rope_theta=5e5)
    theirs = LlamaConfig(**{k: v for k, v in hf_config(cfg).items() if k != "model_type"})
    assert hf_config(config_from_hf(json.loads(theirs.to_json_string()), "config.json")) == hf_config(cfg)


LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
         "num_hidden_layers": 2}


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "MistralForCausalLM.*is not supported"),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "gpt2"}, "is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling 'llama3'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "RoPE scaling 'yarn'"),
    ({"head_dim": 32}, "head_dim 32"),
    ({"attention_bias": True}, "attention_bias and mlp_bias differ"),
    ({"hidden_act": "gelu"}, "hidden_act must be one of silu, got 'gelu'"),
    ({"hidden_size": "64"}, "hidden_size must be a whole number"),
    ({"num_hidden_layers": True}, "num_hidden_layers must be a whole number"),
    ({"hidden_size": 63}, "divisible"),
])
def test_configs_we_cannot_compute_are_one_line_errors(change, message):
    with pytest.raises(HybridGPTError, match=message):
        config_from_hf({**LLAMA, **change}, "config.json")


def test_gpt2_variants_we_cannot_compute_are_refused():
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    with pytest.raises(HybridGPTError, match="activation_function must be one of gelu_new, .*got 'relu'"):
        config_from_hf({**gpt2, "activation_function": "relu"}, "config.json")
    with pytest.raises(HybridGPTError, match="attention-scaling"):
        config_from_hf({**gpt2, "scale_attn_by_inverse_layer_idx": True}, "config.json")


def test_missing_extra_and_misshaped_tensors_are_named():
    hf = tiny_llama()
    cfg = config_from_hf(json.loads(hf.config.to_json_string()), "config.json")
    state = hf.state_dict()
    with pytest.raises(HybridGPTError, match="lacks 1 tensor.*layers.1.self_attn.k_proj.weight"):
        from_hf_state({k: v for k, v in state.items() if k != "model.layers.1.self_attn.k_proj.weight"}, cfg, "d")
    with pytest.raises(HybridGPTError, match="none of its model's, e.g. model.layers.9.extra"):
        from_hf_state({**state, "model.layers.9.extra": torch.zeros(1)}, cfg, "d")
    bad = {**state, "model.layers.0.mlp.up_proj.weight": torch.zeros(95, 64)}
    with pytest.raises(HybridGPTError, match=r"up_proj.weight has shape \(95, 64\)"):
        from_hf_state(bad, cfg, "d")
