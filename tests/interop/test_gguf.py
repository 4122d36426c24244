"""interop.gguf: GGUF files, written here with gguf.GGUFWriter as llama.cpp lays them out, read into our model
and tokenizer."""

import json
import sys

import numpy as np
import pytest
import torch
from data.chatml import CHATML_SPECIALS
from hf_models import VOCAB, llama_cpp_permute, tiny_gpt2, tiny_llama, write_gguf

from hybrid_gpt.checkpoint import load_state
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.interop.gguf import read_gguf, unpermute
from hybrid_gpt.model.gpt import GPT

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

TEXTS = ["To be, or not to be: that is the question 1234567.", "  two spaces\tand a tab\n\nnew lines",
         "émojis 🎉 and 中文, x1y22z333", "<|im_start|>user\ntyped control tokens<|im_end|>"]


def _read(path):
    cfg, state, tokenizer, template = read_gguf(path)
    model = GPT(cfg)
    load_state(model, state, path)
    return model.eval(), tokenizer, template


@pytest.mark.parametrize("make", [lambda: tiny_llama(tied=True), lambda: tiny_llama(tied=False), tiny_gpt2],
                         ids=["llama-tied", "llama-untied", "gpt2"])
def test_gguf_model_computes_what_hf_computes_with_the_dequantised_weights(make, bpe, tmp_path):
    hf = make()
    path = write_gguf(hf, bpe, tmp_path / "tiny.gguf")  # hf now holds the dequantised weights
    model, _, template = _read(path)
    assert model.config.family == hf.config.model_type
    assert model.config.tie_embeddings == hf.config.tie_word_embeddings
    assert template.startswith("{% for message in messages %}")
    idx = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() <= 1e-4


def test_transformers_reads_the_test_files_as_we_do(bpe, tmp_path):
    """The writer here lays Llama's q/k rows out as transformers' own GGUF loader expects llama.cpp to: its
    tensors are the dequantised weights in HF's order, so the file is llama.cpp's, not merely our inverse."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf = tiny_llama()
    path = write_gguf(hf, bpe, tmp_path / "tiny.gguf")
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf)["tensors"]
    ours = hf.state_dict()
    assert {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"} <= set(theirs)
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (9, 3)])
def test_unpermute_undoes_llama_cpp_permute(heads, kv_heads):
    w = torch.randn(kv_heads * 16, 24)
    assert torch.equal(unpermute(llama_cpp_permute(w, heads, kv_heads), kv_heads), w)
    assert not torch.equal(llama_cpp_permute(w, heads, kv_heads), w)
    q = torch.randn(heads * 16)  # a bias: one dimension
    assert torch.equal(unpermute(llama_cpp_permute(q, heads, heads), heads), q)


@pytest.mark.parametrize("pre", ["smollm", "gpt-2"])
def test_tokenizer_is_rebuilt_from_the_vocabulary_and_merges(bpe, tmp_path, pre):
    from tokenizers import Tokenizer, pre_tokenizers

    source = Tokenizer.from_str(bpe.to_str())
    if pre == "gpt-2":
        source.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    _, text, _ = _read(write_gguf(tiny_llama(), source, tmp_path / "tiny.gguf", pre=pre))
    rebuilt = Tokenizer.from_str(text)
    assert rebuilt.get_vocab(with_added_tokens=True) == source.get_vocab(with_added_tokens=True)
    for s in TEXTS:
        assert rebuilt.encode(s, add_special_tokens=False).ids == source.encode(s, add_special_tokens=False).ids
        assert rebuilt.decode(rebuilt.encode(s).ids, skip_special_tokens=False) == s
    added = {t["content"]: t["special"] for t in json.loads(text)["added_tokens"]}
    assert added == {t: True for t in CHATML_SPECIALS}


def _q8_1_bytes(n: int) -> tuple[np.ndarray, object]:
    """``n`` values as raw Q8_1 blocks: a type gguf stores but cannot dequantise."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    return np.zeros(n // block * size, dtype=np.uint8), gguf.GGMLQuantizationType.Q8_1


@pytest.mark.parametrize("kw, message", [
    (dict(arch="qwen2"), "architecture 'qwen2' is not supported; hybrid-gpt imports llama and gpt2"),
    (dict(tokenizer_model="llama"), "SentencePiece tokenizer, which is not supported"),
    (dict(tokenizer_model="bert"), "tokenizer.ggml.model 'bert' is not supported"),
    (dict(pre="llama-bpe"), "pre-tokenizer 'llama-bpe' is not supported"),
    (dict(tensors={"blk.0.attn_norm.weight": _q8_1_bytes(64)}), "blk.0.attn_norm.weight is of type Q8_1, which the "
                                                                   "gguf package cannot dequantise"),
    (dict(tensors={"rope_freqs.weight": (np.ones(8, np.float32), None)}), "no place for, e.g. rope_freqs.weight"),
    (dict(meta=lambda w: w.add_expert_count(4)), "mixture of experts"),
    (dict(tensors={"blk.1.attn_k.weight": (np.zeros((24, 64), np.float32), None)}),
     r"blk.1.attn_k.weight has shape \(24, 64\), not 2 heads of 16 rows"),
    (dict(tensors={"blk.1.ffn_up.weight": (np.zeros((90, 64), np.float32), None)}),
     r"up_proj.weight has shape \(90, 64\), not \(96, 64\)"),
    (dict(meta=lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN)), "RoPE scaling 'yarn'"),
])
def test_files_we_cannot_read_are_one_line_errors(bpe, tmp_path, kw, message):
    path = write_gguf(tiny_llama(), bpe, tmp_path / "tiny.gguf", **kw)
    with pytest.raises(HybridGPTError, match=message):
        read_gguf(path)


def test_a_missing_tensor_and_a_damaged_file_are_named(bpe, tmp_path):
    path = write_gguf(tiny_llama(), bpe, tmp_path / "tiny.gguf")
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) // 2])
    with pytest.raises(HybridGPTError, match="cannot read .*cut.gguf as a GGUF file"):
        read_gguf(tmp_path / "cut.gguf")
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(HybridGPTError, match="cannot read .*text.gguf as a GGUF file"):
        read_gguf(tmp_path / "text.gguf")


def test_without_the_gguf_package_the_error_names_the_extra(bpe, tmp_path, monkeypatch):
    path = write_gguf(tiny_llama(), bpe, tmp_path / "tiny.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(HybridGPTError, match=r"needs the `gguf` package: .*--extra smollm2.*hybrid-gpt\[smollm2\]"):
        read_gguf(path)
