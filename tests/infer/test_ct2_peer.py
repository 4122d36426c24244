"""The CTranslate2 peer: conversion of our standard models, its logits and greedy tokens against ours, and its
rows and ratios in bench. Skipped where ctranslate2 is not installed (it comes with the `peer` extra)."""

import pytest
import torch
from helpers import smoke_model

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.infer.bench import BenchConfig, run_bench
from hybrid_gpt.infer.engine import generate
from hybrid_gpt.infer.peer import CT2Decoder, ct2_agreement, ct2_generator, ct2_greedy, to_ctranslate2
from hybrid_gpt.model.gpt import GPT, GPTConfig
from hybrid_gpt.present.bench import format_table

pytest.importorskip("ctranslate2")
pytest.importorskip("transformers")


def _peaked(model: GPT) -> GPT:
    """``model`` with larger weights, so that its greedy tokens vary (a smoke model's repeat one token, which
    would let a wrong decode pass)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    return model


def _llama() -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig.llama(vocab_size=300, block_size=64, n_embd=64, n_head=4, n_kv_head=2, layers="AAA",
                          ffn_hidden=96, rope_theta=5e4, tie_embeddings=True)
    return _peaked(GPT(cfg).eval())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_converted_model_decodes_our_greedy_tokens_in_float32(family, tmp_path):
    model = _peaked(smoke_model("AAAA", vocab_size=300)) if family == "gpt2" else _llama()
    gen = ct2_generator(to_ctranslate2(model, tmp_path), "float32", threads=1)
    idx = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    check = ct2_agreement(model, gen, idx)
    assert check["max_abs_logit_diff"] <= 1e-3 and check["top1_agreement"] == 1.0
    prompt, n = idx[:, :9], 12
    with torch.inference_mode():
        ours = torch.cat(list(generate(model, prompt, n, temperature=0)), dim=1)
    assert len(set(ours.flatten().tolist())) > 3, "greedy tokens that vary, or the test could not fail"
    # a shared static context, then each row's own start token: as the bench decodes at batch > 1
    shared = torch.cat([prompt[:1, :8].expand(2, 8), prompt[:, 8:]], dim=1)
    with torch.inference_mode():
        ours = torch.cat(list(generate(model, shared, n, temperature=0)), dim=1)
    theirs = ct2_greedy(gen, shared[0, :8].tolist(), shared[:, 8].tolist(), n)
    assert theirs == ours.tolist()
    assert ct2_greedy(gen, shared[0, :8].tolist(), shared[:, 8].tolist(), n) == theirs, "from the cached context"


def test_int8_follows_float32_closely_and_its_agreement_is_measured(tmp_path):
    model = _peaked(smoke_model("AAAA", vocab_size=300))
    path = to_ctranslate2(model, tmp_path)
    idx = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(2))
    f32 = ct2_agreement(model, ct2_generator(path, "float32", threads=1), idx)
    int8 = ct2_agreement(model, ct2_generator(path, "int8", threads=1), idx)
    assert int8["max_abs_logit_diff"] > f32["max_abs_logit_diff"], "int8 rounds the weights"
    assert int8["top1_agreement"] >= 0.8


def test_the_ct2_decoder_times_the_positions_ours_decodes(tmp_path):
    """CT2Decoder.decode gives the greedy tokens of our estimator's loop from the same context."""
    from hybrid_gpt.infer.decoders import OursDecoder

    model = _peaked(smoke_model("AAAA", vocab_size=300))
    gen = ct2_generator(to_ctranslate2(model, tmp_path), "float32", threads=1)
    tokens = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ours = OursDecoder(model, 1, 24)
        ours.prefill(tokens)
        expected = ours.decode(tokens, 6)
    dec = CT2Decoder(gen, tokens, 6)
    dec.prefill(tokens)
    assert torch.equal(dec.decode(tokens, 6), expected)


def test_only_standard_models_of_a_family_convert(tmp_path):
    with pytest.raises(HybridGPTError, match="only all-attention models"):
        to_ctranslate2(smoke_model("AAMM"), tmp_path)
    with pytest.raises(HybridGPTError, match="compute type"):
        ct2_generator(str(tmp_path), "float16")


def test_bench_times_ctranslate2_in_float32_and_int8_beside_transformers():
    models = {"standard": smoke_model("AA"), "hybrid": smoke_model("AM")}
    cfg = BenchConfig(contexts=[16], new_tokens=4, batch_sizes=[1, 2], repeats=2, warmup=0, naive=False)
    res = run_bench(models, cfg)
    assert set(res["peers"]) == {"peer", "ctranslate2", "ctranslate2@int8"} and res["peer"] is res["peers"]["peer"]
    ct2 = res["peers"]["ctranslate2"]
    assert ct2["kind"] == "ctranslate2" and ct2["weights_of"] == "standard" and ct2["dtype"] == "float32"
    assert ct2["max_abs_logit_diff"] <= 1e-3 and ct2["top1_agreement"] == 1.0
    assert 0 <= res["peers"]["ctranslate2@int8"]["top1_agreement"] <= 1
    for name in ("ctranslate2", "ctranslate2@int8"):
        rows = res["peers"][name]["rows"]
        assert [(r["context"], r["batch"]) for r in rows] == [(16, 1), (16, 2)]
        assert all(r[f]["n"] == 2 and r[f]["median"] > 0 for r in rows for f in ("prefill_ms", "decode_tok_s"))
        assert len(res["ratios"][f"standard/{name}"]) == 2
    assert "ctranslate2" in res["environment"]
    text = format_table(res)
    assert "speedup standard/ctranslate2@int8" in text and "same greedy token at" in text


def test_bench_peers_choose_which_to_run():
    models = {"standard": smoke_model("AA")}
    cfg = BenchConfig(contexts=[16], new_tokens=4, batch_sizes=[1], repeats=1, warmup=0, naive=False,
                      peers=["ctranslate2"])
    assert set(run_bench(models, cfg)["peers"]) == {"ctranslate2", "ctranslate2@int8"}
    with pytest.raises(HybridGPTError, match="unknown peer 'vllm'"):
        run_bench(models, BenchConfig(contexts=[16], new_tokens=4, peers=["vllm"]))
