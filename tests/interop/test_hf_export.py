"""interop.hf_export: checkpoints of both families and of every kind of block, exported as Hugging Face
directories, load in transformers (a standard model with no custom code, a hybrid with its modeling file) and
compute what ours computes: float32 logits within 1e-4, the same greedy tokens (transformers' own KV cache), the
same token ids and chat renderings."""

import json

import pytest
import torch
from hf_models import greedy_hf, greedy_ours, our_model

from hybrid_gpt.checkpoint import save_checkpoint
from hybrid_gpt.data.template import render
from hybrid_gpt.data.tokenizer import load_tokenizer
from hybrid_gpt.interop.exporter import export_model
from hybrid_gpt.interop.hf_export import EXPORT_MARK, REMOTE_MODULE

transformers = pytest.importorskip("transformers")

STRINGS = ["To be, or not to be: 1234567 ways.", "  two spaces\tand a tab\n\nnew lines  ",
           "émojis 🎉 and 中文, x1y22z333", "ROMEO:\nBut soft! What light?", ""]
MESSAGES = [{"role": "user", "content": "Who goes there? 42"}, {"role": "assistant", "content": " A friend.\n"},
            {"role": "user", "content": "Ay, émoi 🎉"}]
# (family, pattern, tokenizer, config overrides): both families, every kind of block, tied and untied embeddings,
# biases in Llama, our own tokenizer (its chat template) and a ChatML one (SmolLM2's pre-tokenizer and template).
CASES = [("gpt2", "AAAA", "ours", {}), ("gpt2", "AAMM", "chatml", {}), ("gpt2", "AANN", "ours", {}),
         ("gpt2", "MMAA", "chatml", {}), ("llama", "AAAA", "chatml", {"tie_embeddings": False}),
         ("llama", "AAAA", "ours", {"bias": True}), ("llama", "AAMM", "ours", {}),
         ("llama", "AANN", "chatml", {"tie_embeddings": False}), ("llama", "MMAA", "ours", {"bias": True}),
         ("gpt2", "AAAA", "ours", {"positions": "rope"})]  # all attention, but no transformers class: GPT-2 with RoPE
NATIVE = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


@pytest.fixture(scope="module")
def tokenizers(smoke_run):
    from data.chatml import chatml_tokenizer

    return {"ours": load_tokenizer(smoke_run / "data"), "chatml": chatml_tokenizer()}


def _export(tmp_path, family, layers, tok, dtype="float32", **kw):
    """(our model, its checkpoint, the export's directory)."""
    model = our_model(family, layers, tok.vocab_size, **kw)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, model, tok, {"stage": "test"})
    out = tmp_path / "hf"
    export_model(ckpt, "hf", out, dtype)
    return model, ckpt, out


def _load(out, native: bool):
    """The export's model and tokenizer as transformers loads them: with no custom code for a standard model."""
    kw = {} if native else {"trust_remote_code": True}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, **kw).eval()
    return hf, transformers.AutoTokenizer.from_pretrained(out, **kw)


@pytest.mark.parametrize("family, layers, which, kw", CASES,
                         ids=[f"{f}-{p}-{t}{'-' + '-'.join(k) if k else ''}" for f, p, t, k in CASES])
def test_an_export_computes_what_our_model_computes(family, layers, which, kw, tokenizers, tmp_path,
                                                    remote_code_cache):
    tok = tokenizers[which]
    model, _, out = _export(tmp_path, family, layers, tok, **kw)
    native = model.config.family in NATIVE and set(layers) == {"A"}
    assert (out / f"{REMOTE_MODULE}.py").exists() is not native
    config = json.loads((out / "config.json").read_text())
    assert config[EXPORT_MARK]["native"] is native and ("auto_map" in config) is not native
    hf, theirs = _load(out, native)
    assert type(hf).__name__ == (NATIVE[family] if native else "HybridGPTForCausalLM")
    assert hf.dtype == torch.float32
    idx = torch.randint(0, tok.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() <= 1e-4
    prompt = idx[:1, :12]
    assert torch.equal(greedy_hf(hf, prompt, 8), greedy_ours(model, prompt, 8))
    for text in STRINGS:
        assert theirs(text)["input_ids"] == tok.encode(text)
        assert theirs.decode(tok.encode(text)) == text == tok.decode(tok.encode(text))


@pytest.mark.parametrize("which", ["ours", "chatml"])
def test_the_chat_template_renders_and_tokenizes_as_ours(which, tokenizers, tmp_path, remote_code_cache):
    tok = tokenizers[which]
    _, _, out = _export(tmp_path, "llama", "AM", tok)
    _, theirs = _load(out, native=False)
    for gen in (False, True):
        text = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        assert text == tok.template.text(MESSAGES, gen)
        assert theirs(text, add_special_tokens=False)["input_ids"] == render(tok, MESSAGES,
                                                                            add_generation_prompt=gen).ids
    assert theirs.eos_token == tok.template.turn_end and theirs.bos_token == tok.template.bos
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"][0] == tok.end_id and set(generation["eos_token_id"]) == tok.stop_ids


@pytest.mark.parametrize("family, layers", [("llama", "AAMM"), ("gpt2", "MMAA"), ("gpt2", "AAAA")])
def test_left_padded_batches_generate_as_each_row_alone(family, layers, tokenizers, tmp_path, remote_code_cache):
    """The modeling file's padding mask and positions (transformers' generate gives them) against our engine on
    each prompt alone; the native GPT-2 beside it as the reference of what transformers does."""
    tok = tokenizers["chatml"]
    model, _, out = _export(tmp_path, family, layers, tok)
    hf, _ = _load(out, native=set(layers) == {"A"})
    prompts = [torch.randint(4, tok.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)) for n in (11, 5)]
    batch = torch.zeros(2, 11, dtype=torch.long)
    mask = torch.zeros(2, 11, dtype=torch.long)
    for row, p in enumerate(prompts):
        batch[row, -p.size(1):], mask[row, -p.size(1):] = p[0], 1
    got = hf.generate(batch, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                      pad_token_id=0, eos_token_id=None)[:, 11:]
    for row, p in enumerate(prompts):
        assert torch.equal(got[row:row + 1], greedy_ours(model, p, 6)), row


@pytest.mark.parametrize("layers", ["AAAA", "AAMM"])
def test_float16_weights_load_as_float16(layers, tokenizers, tmp_path, remote_code_cache):
    model, _, out = _export(tmp_path, "llama", layers, tokenizers["ours"], dtype="float16")
    hf, _ = _load(out, native=layers == "AAAA")
    assert hf.dtype == torch.float16
    assert torch.equal(hf.get_input_embeddings().weight, model.transformer.wte.weight.half())
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
