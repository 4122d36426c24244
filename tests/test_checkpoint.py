import json

import pytest
import torch
from helpers import LLAMA, smoke_model
from safetensors.torch import load_file, save_file

from hybrid_gpt import load
from hybrid_gpt.checkpoint import load_checkpoint, save_checkpoint
from hybrid_gpt.data.tokenizer import Tokenizer
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import recover_dir


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["ROMEO:\nBut soft, what light!\n\n"] * 10, vocab_size=300)


@pytest.fixture
def ckpt(tmp_path, tok):
    model = smoke_model("AAMM", vocab_size=tok.vocab_size)
    path = tmp_path / "pretrain-hybrid"
    save_checkpoint(path, model, tok, {"stage": "test"})
    return path, model


def test_round_trip_gives_identical_logits(ckpt):
    path, model = ckpt
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    loaded, tok = load(path)
    idx = torch.randint(0, tok.vocab_size, (2, 16))
    torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert json.loads((path / "config.json").read_text())["model"]["layers"] == "AAMM"


def test_pt_state_dict_loads_with_weights_only(ckpt):
    path, model = ckpt
    state = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    torch.save(state, path / "model.pt")
    loaded, _ = load(path / "model.pt")
    idx = torch.randint(0, model.config.vocab_size, (1, 8))
    torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)


def test_pickled_objects_are_refused(ckpt):
    path, _ = ckpt
    (path / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, path / "model.pt")
    with pytest.raises(HybridGPTError, match="cannot read weights"):
        load(path)


def test_mismatched_tensors_are_named(ckpt):
    path, _ = ckpt
    state = load_file(str(path / "model.safetensors"))
    del state["transformer.h.0.mixer.c_attn.weight"]
    state["transformer.h.9.extra"] = torch.zeros(1)
    state["transformer.ln_f.weight"] = torch.zeros(3)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(HybridGPTError) as e:
        load(path)
    msg = str(e.value)
    assert "transformer.h.0.mixer.c_attn.weight" in msg and "transformer.h.9.extra" in msg
    assert "transformer.ln_f.weight" in msg


def test_truncated_weights_are_refused(ckpt):
    path, _ = ckpt
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(HybridGPTError, match="corrupt or truncated"):
        load(path)


def test_bad_config_and_vocab_mismatch(ckpt):
    path, _ = ckpt
    config = json.loads((path / "config.json").read_text())
    config["model"]["layers"] = "AAQM"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HybridGPTError, match="letters 'Q'"):
        load(path)
    config["model"]["layers"] = "AAMM"
    vocab = config["model"]["vocab_size"]
    config["model"]["vocab_size"] = vocab + 1
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HybridGPTError, match=f"tokenizer has {vocab} tokens but the model expects {vocab + 1}"):
        load(path)
    (path / "config.json").write_text("{truncated")
    with pytest.raises(HybridGPTError, match="not valid JSON"):
        load(path)


def test_missing_and_non_checkpoint_paths(tmp_path):
    with pytest.raises(HybridGPTError, match="does not exist"):
        load(tmp_path / "nope")
    with pytest.raises(HybridGPTError, match="is not a checkpoint"):
        load(tmp_path)


def test_overwrite_is_atomic_and_an_interrupted_swap_recovers(ckpt, tok):
    path, model = ckpt
    other = smoke_model("AAMM", seed=1, vocab_size=tok.vocab_size)
    save_checkpoint(path, other, tok, {"stage": "test"})
    assert not path.with_name(path.name + ".old").exists()
    assert not list(path.parent.glob(".*tmp*"))
    idx = torch.randint(0, model.config.vocab_size, (1, 8))
    torch.testing.assert_close(load_checkpoint(path)[0](idx), other(idx))
    # A crash between the two renames leaves only "<dir>.old"; loading puts it back.
    path.rename(path.with_name(path.name + ".old"))
    recover_dir(path)
    torch.testing.assert_close(load(path)[0](idx), other(idx))


def test_a_model_too_big_for_memory_is_refused_before_allocation(ckpt):
    path, _ = ckpt
    config = json.loads((path / "config.json").read_text())
    config["model"].update(n_embd=2**17, n_head=2)  # hundreds of billions of parameters
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HybridGPTError, match=r"would need about [\d.]+ GiB but only"):
        load(path)




@pytest.mark.parametrize("tie", [True, False])
def test_llama_family_round_trip_stores_lm_head_only_when_untied(tmp_path, tok, tie):
    model = smoke_model("AAMN", vocab_size=tok.vocab_size, **LLAMA, n_head=4, n_kv_head=2, tie_embeddings=tie)
    save_checkpoint(tmp_path / "c", model, tok, {"stage": "test"})
    stored = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert ("lm_head.weight" in stored) is not tie and "transformer.wpe.weight" not in stored
    loaded, _, _ = load_checkpoint(tmp_path / "c")
    assert loaded.config == model.config and loaded.config.family == "llama"
    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) is tie
    idx = torch.randint(0, tok.vocab_size, (2, 16))
    torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)
    if not tie:  # an untied head is a tensor of its own: without it the checkpoint is incomplete
        del stored["lm_head.weight"]
        save_file(stored, str(tmp_path / "c" / "model.safetensors"))
        with pytest.raises(HybridGPTError, match="missing lm_head.weight"):
            load(tmp_path / "c")


# -- chat templates travel with the checkpoint --------------------------------------------------------------------

def test_a_template_that_is_not_ours_is_stored_as_chat_template_json(tmp_path, tok):
    from data.chatml import SMOLLM2_SYSTEM, chatml_checkpoint

    from hybrid_gpt.data.template import chatml_template

    path = tmp_path / "imported"
    chatml_checkpoint(path)
    assert json.loads((path / "chat_template.json").read_text())["default_system"] == SMOLLM2_SYSTEM
    assert load(path)[1].template == chatml_template(SMOLLM2_SYSTEM)
    # replaced by a checkpoint with our template: the file is gone, and ours is used again
    save_checkpoint(path, smoke_model("AM", vocab_size=tok.vocab_size), tok, {"stage": "test"})
    assert not (path / "chat_template.json").exists() and load(path)[1].template == tok.template


@pytest.mark.parametrize("text, message", [
    ("{not json", "chat template file .*chat_template.json"),
    ('{"format": "hybrid-gpt-chat-template", "version": 1, "name": "x", "turn_start": "", "turn_end": "e"}',
     "chat_template.json: 'turn_start' must be a non-empty string"),
    ('{"format": "hybrid-gpt-chat-template", "version": 1, "name": "x", "turn_start": "<|im_start|>", "turn_end": "e"}',
     r"lacks the special token that opens turn_end \('e'\)"),
])
def test_a_damaged_chat_template_is_a_one_line_error(tmp_path, text, message):
    from data.chatml import chatml_checkpoint

    path = tmp_path / "imported"
    chatml_checkpoint(path)
    (path / "chat_template.json").write_text(text)
    with pytest.raises(HybridGPTError, match=message):
        load(path)
