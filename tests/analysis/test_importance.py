import json

import numpy as np
import pytest
import torch
from helpers import smoke_model

from hybrid_gpt.analysis.importance import (
    ConstantMixer,
    analyse,
    attention_stats,
    default_out_dir,
    layer_similarity,
    run_importance,
    swapped_mixers,
)
from hybrid_gpt.checkpoint import load_checkpoint, save_checkpoint
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.model.gpt import GPT
from hybrid_gpt.present.importance import render_importance_markdown

VOCAB = 97


def val_tokens(n=8 * 32 + 1, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, size=n).astype(np.uint16)


BYTES = np.ones(VOCAB, dtype=np.int64)


def with_identity_layer(layers="AAAA", index=1):
    """A model whose attention in block ``index`` adds nothing to the residual stream."""
    model = smoke_model(layers)
    with torch.no_grad():
        model.transformer.h[index].mixer.c_proj.weight.zero_()
        model.transformer.h[index].mixer.c_proj.bias.zero_()
    return model


def logits(model, tokens):
    return model(torch.from_numpy(tokens[:64].astype(np.int64)).view(2, 32))


def test_identity_layer_has_similarity_one_ranks_first_and_costs_nothing_to_drop():
    model, tokens = with_identity_layer(), val_tokens()
    sim = layer_similarity(model, tokens, max_tokens=len(tokens))
    assert sim[1] == pytest.approx(1.0, abs=1e-6)
    assert all(s < 0.999 for i, s in enumerate(sim) if i != 1)  # the others do turn the stream

    res = analyse(model, tokens, BYTES, max_tokens=len(tokens), replace=1)
    assert res["ranking"]["by_similarity"][0] == 2
    layer2 = res["per_layer"][1]
    assert layer2["layer"] == 2 and abs(layer2["drop"]["loss_increase"]) < 1e-6
    assert max(abs(r["drop"]["loss_increase"]) for r in res["per_layer"]) > 1e-3  # dropping is not free in general
    # In an untrained model dropping a layer can also lower the loss, so the drop order is checked as such.
    increase = {r["layer"]: r["drop"]["loss_increase"] for r in res["per_layer"]}
    order = res["ranking"]["by_drop"]
    assert [increase[n] for n in order] == sorted(increase.values())
    rec = res["recommendation"]
    assert rec["replace"] == [order[0]] and rec["pattern"] == "".join(
        "M" if n == order[0] else "A" for n in range(1, 5))
    assert rec["deep_replace"] == [4] and rec["deep_pattern"] == "AAAM" and rec["same_as_deep"] == (order[0] == 4)
    assert rec["joint"]["recommended"]["drop"]["loss_increase"] == pytest.approx(increase[order[0]], abs=1e-9)


def test_the_identity_layer_is_recommended_when_the_others_matter(pretrained):
    # A trained model whose first layer is made the identity: dropping layer 2 costs more than nothing.
    model, _, _ = load_checkpoint(pretrained / "pretrain-standard")
    with torch.no_grad():
        model.transformer.h[0].mixer.c_proj.weight.zero_()
        model.transformer.h[0].mixer.c_proj.bias.zero_()
    tokens = np.fromfile(pretrained / "data" / "val.bin", dtype=np.uint16)
    res = analyse(model, tokens, np.ones(model.config.vocab_size, dtype=np.int64), max_tokens=1024)
    assert res["per_layer"][1]["drop"]["loss_increase"] > 1e-3
    assert res["ranking"]["by_similarity"] == res["ranking"]["by_drop"] == [1, 2]
    assert res["ranking"]["orders_agree"] and res["ranking"]["spearman"] == 1.0
    rec = res["recommendation"]
    assert rec["pattern"] == "MA" and rec["deep_pattern"] == "AM" and not rec["same_as_deep"]
    assert set(rec["joint"]) == {"recommended", "deep"}
    md = render_importance_markdown({**res, "checkpoint": "x/pretrain-standard", "plot": "p.png",
                                     "data": {"source": "test"}})
    assert "**Recommended pattern: `MA`**" in md and "costs" in md


def test_similarity_and_mean_match_an_explicit_walk_of_the_blocks():
    model, tokens = smoke_model("AMAN"), val_tokens()
    sim, means = attention_stats(model, tokens, max_tokens=len(tokens))
    assert sim[1] is None and sim[3] is None and means[1] is None
    x = torch.from_numpy(tokens[:256].astype(np.int64)).view(8, 32)
    with torch.no_grad():
        h = model.transformer.wte(x) + model.transformer.wpe(torch.arange(32))
        for i, block in enumerate(model.transformer.h):
            if block.kind == "A":
                out = block.mixer(block.ln_1(h))
                cos = torch.nn.functional.cosine_similarity(h, h + out, dim=-1).mean().item()
                assert sim[i] == pytest.approx(cos, abs=1e-5)
                torch.testing.assert_close(means[i], out.mean(dim=(0, 1)), atol=1e-6, rtol=1e-5)
            h = block(h)


def test_interventions_restore_the_model_exactly():
    model, tokens = smoke_model("AAAA"), val_tokens()
    originals = [b.mixer for b in model.transformer.h]
    before = logits(model, tokens)
    with swapped_mixers(model, {0: None, 2: ConstantMixer(torch.ones(model.config.n_embd))}):
        assert model.transformer.h[0].mixer is None
        assert not torch.equal(logits(model, tokens), before)
    with pytest.raises(RuntimeError):
        with swapped_mixers(model, {1: None}):
            raise RuntimeError("interrupted")
    analyse(model, tokens, BYTES, max_tokens=len(tokens))
    assert [b.mixer for b in model.transformer.h] == originals
    assert torch.equal(logits(model, tokens), before)
    with pytest.raises(HybridGPTError):
        with swapped_mixers(smoke_model("AM"), {1: None}):
            pass


def test_dropping_a_layer_is_the_n_pattern_and_the_mean_is_a_constant():
    model, tokens = smoke_model("AAAA"), val_tokens()
    as_n = GPT(model.config.__class__(**{**model.config.to_dict(), "layers": "ANAA"})).eval()
    as_n.load_state_dict(model.state_dict(), strict=False)
    with swapped_mixers(model, {1: None}):
        assert torch.equal(logits(model, tokens), logits(as_n, tokens))
    vector = torch.randn(model.config.n_embd)
    out = ConstantMixer(vector)(torch.randn(2, 5, model.config.n_embd))
    assert torch.equal(out, vector.expand(2, 5, -1))


def test_a_model_without_attention_or_a_bad_k_is_a_clear_error(pretrained, tmp_path):
    tokens = val_tokens()
    with pytest.raises(HybridGPTError, match="no attention layers"):
        analyse(smoke_model("MMMM"), tokens, BYTES)
    with pytest.raises(HybridGPTError, match="between 1 and"):
        analyse(smoke_model("AAMM"), tokens, BYTES, replace=3)
    _, tok, _ = load_checkpoint(pretrained / "pretrain-standard")
    save_checkpoint(tmp_path / "mm", smoke_model("MM", vocab_size=tok.vocab_size), tok, training={})
    with pytest.raises(HybridGPTError, match="no attention layers"):
        run_importance(tmp_path / "mm", out_dir=tmp_path / "out")


def test_run_importance_writes_json_markdown_and_plot(pretrained, tmp_path):
    ckpt = pretrained / "pretrain-standard"
    res = run_importance(ckpt, out_dir=tmp_path / "imp", max_tokens=2048)
    saved = json.loads((tmp_path / "imp" / "importance.json").read_text())
    assert saved == json.loads(json.dumps(res))
    for key in ("checkpoint", "model", "settings", "data", "intact", "similarity", "per_layer", "ranking",
                "recommendation", "plot"):
        assert key in saved
    n_attn = saved["layers"].count("A")
    assert len(saved["per_layer"]) == n_attn and len(saved["similarity"]) == len(saved["layers"])
    assert saved["intact"]["tokens"] == 2048
    assert sorted(saved["ranking"]["by_drop"]) == [i + 1 for i, c in enumerate(saved["layers"]) if c == "A"]
    md = (tmp_path / "imp" / "importance.md").read_text()
    assert md.startswith("## ") and saved["plot"] in md and saved["recommendation"]["pattern"] in md
    assert md == render_importance_markdown(saved)
    assert (tmp_path / "imp" / saved["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert default_out_dir(ckpt) == pretrained / "importance" / "pretrain-standard"
    with pytest.raises(HybridGPTError, match="inside the checkpoint"):
        run_importance(ckpt, out_dir=ckpt / "imp", max_tokens=64)
    with pytest.raises(HybridGPTError, match="no prepared data"):
        run_importance(ckpt, out_dir=tmp_path / "x", data_dir=tmp_path / "nodata")
