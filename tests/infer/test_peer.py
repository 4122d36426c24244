import pytest
import torch
from helpers import smoke_model

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.infer.peer import max_logit_difference, to_hf_gpt2

pytest.importorskip("transformers")


def test_standard_model_logits_match_transformers_gpt2():
    model = smoke_model("AAAA", vocab_size=300)
    hf = to_hf_gpt2(model)
    idx = torch.randint(0, 300, (3, model.config.block_size))
    assert max_logit_difference(model, hf, idx) <= 1e-4
    # Greedy decoding with HF's own KV cache picks the same tokens as ours.
    from hybrid_gpt.infer.engine import generate

    prompt = idx[:1, :8]
    ours = torch.cat(list(generate(model, prompt, 12, temperature=0)), dim=1)
    theirs = hf.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0,
                         attention_mask=torch.ones_like(prompt))[:, 8:]
    assert torch.equal(ours, theirs)


def test_only_standard_models_map_onto_gpt2():
    with pytest.raises(HybridGPTError, match="only a standard"):
        to_hf_gpt2(smoke_model("AAMM"))
