import pytest
import torch
from helpers import smoke_model

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.infer.engine import generate
from hybrid_gpt.infer.peer import max_logit_difference, to_hf, to_hf_gpt2, to_hf_llama
from hybrid_gpt.model.gpt import GPT, GPTConfig

pytest.importorskip("transformers")


def _llama(tied: bool) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig.llama(vocab_size=300, block_size=64, n_embd=64, n_head=4, n_kv_head=2, layers="AAA",
                          ffn_hidden=96, rope_theta=5e4, tie_embeddings=tied)
    model = GPT(cfg)
    with torch.no_grad():  # norm gains away from 1, so that a wrong mapping of them shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.1)
    return model.eval()


def _same_greedy_tokens(model, hf, idx, n=12):
    prompt = idx[:1, :8]
    ours = torch.cat(list(generate(model, prompt, n, temperature=0)), dim=1)
    theirs = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                         eos_token_id=None, attention_mask=torch.ones_like(prompt))[:, 8:]
    return torch.equal(ours, theirs)


def test_standard_model_logits_match_transformers_gpt2():
    model = smoke_model("AAAA", vocab_size=300)
    hf = to_hf_gpt2(model)
    idx = torch.randint(0, 300, (3, model.config.block_size))
    assert max_logit_difference(model, hf, idx) <= 1e-4
    # Greedy decoding with HF's own KV cache picks the same tokens as ours.
    assert _same_greedy_tokens(model, hf, idx)


@pytest.mark.parametrize("tied", [True, False])
def test_llama_family_logits_match_transformers_llama(tied):
    model = _llama(tied)
    hf = to_hf_llama(model)
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_key_value_heads == 2
    assert hf.config.tie_word_embeddings is tied
    idx = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(1))
    assert max_logit_difference(model, hf, idx) <= 1e-4
    assert _same_greedy_tokens(model, hf, idx)


def test_to_hf_picks_the_family():
    assert type(to_hf(_llama(True))).__name__ == "LlamaForCausalLM"
    assert type(to_hf(smoke_model("AAAA"))).__name__ == "GPT2LMHeadModel"


def test_only_all_attention_models_of_a_hf_family_map():
    with pytest.raises(HybridGPTError, match="only all-attention models"):
        to_hf_gpt2(smoke_model("AAMM"))
    with pytest.raises(HybridGPTError, match="only all-attention models"):
        to_hf(smoke_model("AAMM"))
    with pytest.raises(HybridGPTError, match="family 'custom' maps onto no Hugging Face class"):
        to_hf(GPT(GPTConfig(vocab_size=97, n_embd=32, n_head=4, layers="AA", norm="rmsnorm")))
    with pytest.raises(HybridGPTError, match="llama family does not map onto GPT-2"):
        to_hf_gpt2(_llama(True))
    with pytest.raises(HybridGPTError, match="gpt2 family does not map onto Llama"):
        to_hf_llama(smoke_model("AAAA"))
