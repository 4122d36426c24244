import json
import logging

import pytest
from helpers import smoke_model

from hybrid_gpt.cli import main
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.infer import bench, timing
from hybrid_gpt.infer.bench import BenchConfig, bench_shape, default_contexts, run_bench
from hybrid_gpt.infer.entries import shape_models
from hybrid_gpt.present.bench import format_table
from hybrid_gpt.stats import ratio_ci


def test_default_contexts_reach_the_models_maximum():
    assert default_contexts(128, 32) == [64, 128]
    assert default_contexts(128, 24) == [32, 64, 128]
    assert default_contexts(256, 32) == [64, 128, 256]
    assert default_contexts(1024, 32) == [128, 256, 512, 1024]


def test_bench_reports_every_figure_for_both_models_and_the_peer():
    pytest.importorskip("transformers")
    models = {"standard": smoke_model("AA"), "hybrid": smoke_model("AM")}
    cfg = BenchConfig(contexts=[16, 32], new_tokens=4, batch_sizes=[1, 2], repeats=2, warmup=0)
    res = run_bench(models, cfg)
    for name in ("standard", "hybrid"):
        rows = res["models"][name]["rows"]
        assert [(r["context"], r["batch"]) for r in rows] == [(16, 1), (16, 2), (32, 1), (32, 2)]
        for r in rows:
            for fig in ("prefill_ms", "decode_tok_s", "naive_decode_tok_s"):
                assert r[fig]["n"] == 2 and 0 < r[fig]["min"] <= r[fig]["median"] <= r[fig]["max"]
    assert res["models"]["hybrid"]["rows"][0]["kv_cache_bytes"] * 2 == res["models"]["standard"]["rows"][0][
        "kv_cache_bytes"]
    assert res["peer"]["max_abs_logit_diff"] <= 1e-4
    assert len(res["ratios"]["hybrid/standard"]) == 4 and len(res["ratios"]["standard/peer"]) == 4
    assert all(r["kv_cache_ratio"] == 0.5 for r in res["ratios"]["hybrid/standard"])
    assert res["peak_memory_bytes"] > 0
    hw = res["hardware"]
    assert hw["memory_bandwidth_bytes_per_s"] > 0 and hw["matmul_flops_per_s"] > 0
    # 5 reads of its own, plus one per repeat of every (context, batch) pair, taken between the timed runs
    assert hw["streaming_read_samples"] == 5 + 2 * 4
    low, high = hw["streaming_read_range_bytes_per_s"]
    assert 0 < low <= hw["streaming_read_bytes_per_s"] <= high
    assert all(r["decode_limit_tok_s"] > 0 and r["decode_fraction_of_limit"] > 0 for r in rows)
    env = res["environment"]
    assert {"device", "dtype", "threads", "torch"} <= set(env)
    text = format_table(res)
    assert "cached tok/s" in text and "speedup hybrid/standard" in text and "peer" in text and "of limit" in text


def test_bench_refuses_contexts_beyond_the_model():
    with pytest.raises(HybridGPTError, match="exceeds"):
        run_bench({"s": smoke_model("AA")}, BenchConfig(contexts=[64], new_tokens=4, peer=False))


def test_bench_measures_each_precision_side_by_side_with_its_quality_cost(smoke_run):
    pytest.importorskip("transformers")
    import torch

    from hybrid_gpt.data.tokens import TokenData

    data = TokenData.open(smoke_run / "data")
    models = {"standard": smoke_model("AA", vocab_size=data.tokenizer.vocab_size),
              "hybrid": smoke_model("AM", vocab_size=data.tokenizer.vocab_size)}
    cfg = BenchConfig(contexts=[16], new_tokens=4, batch_sizes=[1], repeats=1, warmup=0, naive=False,
                      dtypes=["float32", "bfloat16"], quality_tokens=512, peers=["transformers"])
    res = run_bench(models, cfg, val={name: (data.val, data.tokenizer.token_byte_lengths())
                                                            for name in models})
    assert set(res["models"]) == {"standard", "hybrid", "standard@bfloat16", "hybrid@bfloat16"}
    assert res["models"]["hybrid@bfloat16"]["dtype"] == "bfloat16"
    # Half the bytes per KV entry, so the limit of the bf16 model is higher.
    assert res["models"]["standard@bfloat16"]["kv_bytes_per_token"] * 2 == res["models"]["standard"][
        "kv_bytes_per_token"]
    assert res["models"]["standard@bfloat16"]["rows"][0]["decode_limit_tok_s"] > res["models"]["standard"]["rows"][
        0]["decode_limit_tok_s"]
    assert set(res["peers"]) == {"peer", "peer@bfloat16"} and res["peer"] is res["peers"]["peer"]
    assert res["peers"]["peer"]["max_abs_logit_diff"] <= 1e-4
    for key in ("hybrid/standard", "hybrid@bfloat16/standard@bfloat16", "standard@bfloat16/standard",
                "standard/peer", "standard@bfloat16/peer@bfloat16", "standard@bfloat16/peer"):
        assert len(res["ratios"][key]) == 1, key
    q = res["quality"]
    assert q["standard"]["cost_bpb"] == 0.0 and q["standard@bfloat16"]["bpb_float32"] == q["standard"]["bpb"]
    assert 0 < abs(q["standard@bfloat16"]["cost_bpb"]) < 0.1  # rounding changes the loss, but only a little
    assert all(next(m.parameters()).dtype == torch.float32 for m in models.values())  # copies were converted
    assert "quality standard@bfloat16" in format_table(res)


def test_bench_cli_json(pretrained, capsys, tmp_path):
    out = tmp_path / "bench.json"
    code = main(["bench", str(pretrained / "pretrain-standard"), str(pretrained / "pretrain-hybrid"), "--json",
                 "--contexts", "16,32", "--new-tokens", "4", "--repeats", "1", "--batch-sizes", "1", "--no-peer",
                 "--out", str(out)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert set(printed["models"]) == {"standard", "hybrid"}
    assert "peers" not in printed, "--no-peer skips every peer, transformers and CTranslate2 alike"


def test_training_throughput_bench_leaves_the_models_untouched():
    pytest.importorskip("transformers")
    import torch

    from hybrid_gpt.infer.bench import run_train_bench
    from hybrid_gpt.present.bench import format_train_table

    models = {"standard": smoke_model("AA"), "hybrid": smoke_model("AM")}
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in models.items()}
    res = run_train_bench(models, batch_size=2, repeats=2, warmup=0)
    assert set(res["tokens_per_sec"]) == {"standard", "hybrid", "peer"}
    assert all(s["n"] == 2 and s["median"] > 0 for s in res["tokens_per_sec"].values())
    assert res["standard_vs_peer"] > 0
    for n, m in models.items():
        assert all(torch.equal(before[n][k], v) for k, v in m.state_dict().items())
    assert "standard / peer" in format_train_table(res)


def test_precision_copies_are_ordinary_tensors_even_inside_inference_mode():
    """run_bench runs in inference mode; its bf16 copies must still be able to keep packed oneDNN weights."""
    import torch

    from hybrid_gpt.infer.entries import with_dtypes

    model = smoke_model("AM")
    with torch.inference_mode():
        copies = with_dtypes({"m": model}, ["float32", "bfloat16"])
    assert copies["m"] is model
    assert all(not p.is_inference() and p.dtype == torch.bfloat16 for p in copies["m@bfloat16"].parameters())
    assert next(model.parameters()).dtype == torch.float32


def test_bench_measures_compiled_static_steps_beside_eager():
    """--compile adds "<name>+compile" entries whose decode runs the compiled static step, checked against the
    eager greedy tokens at every size, with their own ratios and no prefill of their own."""
    import torch

    torch._dynamo.reset()
    models = {"standard": smoke_model("AA"), "hybrid": smoke_model("AM")}
    cfg = BenchConfig(contexts=[16], new_tokens=4, batch_sizes=[2], repeats=1, warmup=1, naive=False,
                      peer=False, compile=True, dtypes=["float32", "int8"])
    recompile_limit = torch._dynamo.config.recompile_limit
    res = run_bench(models, cfg)  # fails should a step recompile past its one graph a size
    assert torch._dynamo.config.recompile_limit == recompile_limit, "the dynamo settings are put back"
    compiled = {"standard+compile", "hybrid+compile", "standard@int8+compile", "hybrid@int8+compile"}
    assert set(res["models"]) == {"standard", "hybrid", "standard@int8", "hybrid@int8"} | compiled
    assert res["models"]["standard+compile"]["compiled"] and not res["models"]["standard"]["compiled"]
    for name in compiled:
        assert res["compiled"][name]["same_greedy_tokens"] == 1.0
        assert [(r["context"], r["batch"]) for r in res["compiled"][name]["checks"]] == [(16, 2)]
        assert all(r["decode_tok_s"]["median"] > 0 and "prefill_ms" not in r for r in res["models"][name]["rows"])
    assert {"hybrid/standard", "hybrid+compile/standard+compile", "standard+compile/standard"} <= set(res["ratios"])
    assert "hybrid+compile/standard" not in res["ratios"], "compiled entries are compared with compiled ones"
    assert "static decode step" in format_table(res)


def test_bench_compile_needs_a_warmup():
    with pytest.raises(HybridGPTError, match="needs warmup 1"):
        run_bench({"s": smoke_model("AA")}, BenchConfig(contexts=[16], new_tokens=4, warmup=0, peer=False,
                                                         compile=True))


def test_bench_compile_failure_is_one_clear_error(monkeypatch):
    import torch

    from hybrid_gpt.errors import RunFailure

    class Broken(torch.nn.Module):
        def forward(self, *a, **k):
            raise RuntimeError("no C++ compiler found\nlong traceback text")

    monkeypatch.setattr(torch, "compile", lambda model, **kw: Broken())
    with pytest.raises(RunFailure, match=r"torch.compile failed for s \(RuntimeError: no C\+\+ compiler found\); "
                                         r"run bench without --compile"):
        run_bench({"s": smoke_model("AA")}, BenchConfig(contexts=[16], new_tokens=4, peer=False, compile=True))


def test_the_compute_ceiling_is_measured_with_the_models_own_linear_layers(monkeypatch):
    import torch

    from hybrid_gpt.infer.hardware import measure_hardware
    from hybrid_gpt.model import kernels

    calls = []
    real = kernels.linear

    def spy(x, weight, *args, **kwargs):
        calls.append((tuple(x.shape), tuple(weight.shape), kernels._use_onednn(x, x.size(0), weight, None)))
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(kernels, "linear", spy)
    hw = measure_hardware(torch.device("cpu"), repeats=1, probe=torch.randn(64, 64))
    # A weight made outside inference mode, so that the oneDNN path (packed, as in generation) can take it.
    assert calls and set(calls) == {((1024, 1024), (1024, 1024), kernels.onednn_enabled())}
    assert hw["matmul_flops_per_s"] > 0 and "linear layers" in hw["method"]


def test_new_tokens_that_leave_no_context_are_refused():
    model = smoke_model("AAAA")
    with pytest.raises(HybridGPTError, match="leaves no context"):
        run_bench({"standard": model}, BenchConfig(new_tokens=model.config.block_size, repeats=1, peer=False))


def test_the_decode_estimator_steps_the_greedy_tokens_generation_gives():
    """The estimator's loop (prefill, rewind, cached greedy steps) is generation's computation: same tokens."""
    import torch

    from hybrid_gpt.infer.decoders import OursDecoder
    from hybrid_gpt.infer.engine import generate

    model = smoke_model("AM")
    tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    n = 6
    with torch.inference_mode():
        dec = OursDecoder(model, 2, 24)
        dec.prefill(tokens)
        dec.rewind(24 - n)
        token, stepped = tokens[:, 24 - n:24 - n + 1], []
        for _ in range(n):
            token = dec.step(token)
            stepped.append(token)
        expected = list(generate(model, tokens[:, :24 - n + 1], n, temperature=0))
    assert all(torch.equal(a, b) for a, b in zip(stepped, expected))


def test_a_model_transformers_has_no_class_for_is_measured_without_a_peer(caplog):
    pytest.importorskip("transformers")
    caplog.set_level(logging.INFO, logger="hybrid_gpt")
    model = smoke_model("AA", bias=False)  # GPT-2 without biases: the "custom" family
    cfg = BenchConfig(contexts=[16], new_tokens=4, batch_sizes=[1], repeats=1, warmup=0, naive=False)
    res = run_bench({"standard": model}, cfg)
    assert "peers" not in res and any(line.startswith("peer: skipped for standard") for line in caplog.messages)


def test_kv_caches_that_would_not_fit_are_refused_before_measuring(monkeypatch):
    from hybrid_gpt import runtime

    monkeypatch.setattr(runtime, "available_memory_bytes", lambda device=None: 1000)
    with pytest.raises(HybridGPTError, match="KV caches of 1 models at context 16.*--contexts and --batch-sizes"):
        run_bench({"s": smoke_model("AA")}, BenchConfig(contexts=[16], new_tokens=4, peer=False))


def test_bench_shape_builds_each_pattern_with_random_weights_and_no_checkpoint():
    import torch

    cfg = BenchConfig(contexts=[16], new_tokens=4, batch_sizes=[1], repeats=1, warmup=0, peer=False, naive=False)
    res = bench_shape("smoke", ["aa", "AM"], cfg, block_size=24, seed=5)
    assert list(res["models"]) == ["AA", "AM"] and res["models"]["AM"]["layers"] == "AM"
    assert res["shape"] == {"preset": "smoke", "layers": ["AA", "AM"], "block_size": 24, "seed": 5}
    assert "random" in res["weights"] and "speed does not depend on what weights learned" in res["weights"]
    assert list(res["ratios"]) == ["AM/AA"], "the first pattern listed is the ratios' base"
    assert res["weights"] in format_table(res)
    state = torch.get_rng_state()
    a, b = shape_models("smoke", ["AM"], seed=5)["AM"], shape_models("smoke", ["AM"], seed=5)["AM"]
    assert torch.equal(torch.get_rng_state(), state), "the global random state is left as it was"
    assert a.config.vocab_size == 512 and a.config.block_size == 32 and a.config.n_embd == 32  # the preset's
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())), "the seed fixes the weights"
    c = shape_models("smoke", ["AM"], seed=6)["AM"]
    assert shape_models("smoke", ["AM"], contexts=[16, 64])["AM"].config.block_size == 64  # as long as the longest
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


@pytest.mark.parametrize("patterns, block, match", [([], None, "at least one layer pattern"),
                                                   (["AA", "aa"], None, "given twice"),
                                                   (["AX"], None, "letters 'X'"),
                                                   (["AA"], 1, "at least 2")])
def test_bench_shape_refuses_bad_input(patterns, block, match):
    with pytest.raises(HybridGPTError, match=match):
        shape_models("smoke", patterns, block_size=block)


def test_bench_shape_cli_needs_no_checkpoint(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing on disk
    code = main(["bench", "--shape", "smoke", "--layers", "AA,AM", "--block-size", "24", "--contexts", "16",
                 "--new-tokens", "4", "--repeats", "1", "--batch-sizes", "1", "--no-peer", "--no-naive", "--json"])
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    assert list(res["models"]) == ["AA", "AM"] and res["shape"]["block_size"] == 24
    assert "random" in res["weights"] and list(res["ratios"]) == ["AM/AA"]


@pytest.mark.parametrize("argv, match", [([], "give checkpoints to measure, or --shape"),
                                         (["--shape", "smoke"], "--shape needs --layers"),
                                         (["--layers", "AA"], "go with --shape"),
                                         (["--shape", "smoke", "--layers", "AA", "CKPT"], "not both")])
def test_bench_cli_takes_checkpoints_or_a_shape(argv, match, capsys, tmp_path):
    argv = [str(tmp_path) if a == "CKPT" else a for a in argv]
    assert main(["bench", *argv, "--contexts", "16", "--no-peer"]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1


def _constructed_rates(monkeypatch, rates: dict[str, list[float]]) -> list[str]:
    """decode_rate returns rates[model's layers][i] on a model's i-th call (cyclically); returns the calls' order."""
    calls, count = [], {}

    def fake(decoder, tokens, n, device):
        name = decoder.model.config.layers
        calls.append(name)
        count[name] = count.get(name, 0) + 1
        return rates[name][(count[name] - 1) % len(rates[name])]

    monkeypatch.setattr(bench, "decode_rate", fake)
    return calls


def test_the_models_run_in_a_recorded_order_shuffled_every_repeat(monkeypatch):
    models = {p: smoke_model(p) for p in ("AA", "AM", "AN")}
    calls = _constructed_rates(monkeypatch, {p: [1.0] * 12 for p in models})
    cfg = BenchConfig(contexts=[16], new_tokens=4, batch_sizes=[1, 2], repeats=6, warmup=0, peer=False, naive=False,
                      prefill=False, seed=3)
    res = run_bench(models, cfg)
    rounds = res["order"]["rounds"]
    assert res["order"]["seed"] == 3 and [(r["context"], r["batch"]) for r in rounds] == [(16, 1), (16, 2)]
    orders = [o for r in rounds for o in r["orders"]]
    assert len(orders) == 12 and all(sorted(o) == ["AA", "AM", "AN"] for o in orders)
    assert [name for o in orders for name in o] == calls, "the recorded order is the order they ran in"
    assert len({tuple(o) for o in orders}) > 1, "the order changes between repeats"
    again = run_bench(models, cfg)["order"]
    assert again == res["order"], "the seed fixes the orders"


def test_speedups_are_paired_ratios_with_intervals(monkeypatch):
    """The machine drifts between repeats; the ratio pairs repeat i of each model, not their medians."""
    base, other = [100.0, 200.0, 400.0], [150.0, 500.0, 700.0]
    _constructed_rates(monkeypatch, {"AA": base, "AM": other})
    cfg = BenchConfig(contexts=[16], new_tokens=4, batch_sizes=[1], repeats=3, warmup=0, peer=False, naive=False,
                      prefill=False)
    res = run_bench({"standard": smoke_model("AA"), "hybrid": smoke_model("AM")}, cfg)
    assert res["models"]["standard"]["rows"][0]["decode_tok_s"]["values"] == base
    (row,) = res["ratios"]["hybrid/standard"]
    expected = ratio_ci(other, base)
    assert row["decode_speedup"] == pytest.approx(expected["ratio"]) != pytest.approx(500 / 200)
    assert row["decode_speedup_ci95"] == pytest.approx(expected["ci95"])
    assert "prefill_speedup" not in row and "prefill_ms" not in res["models"]["standard"]["rows"][0]
    text = format_table(res)
    assert f"decode {expected['ratio']:.2f}x [{expected['ci95'][0]:.2f}, {expected['ci95'][1]:.2f}]" in text
    assert "prefill not timed" in text


def test_ratios_of_a_constructed_result_pair_every_figure():
    def row(prefill, decode):
        return {"context": 16, "batch": 1, "kv_cache_bytes": 8, "prefill_ms": timing.summary(prefill),
                "decode_tok_s": timing.summary(decode)}

    results = {"models": {"standard": {"layers": "AA", "rows": [row([2.0, 4.0], [10.0, 20.0])]},
                          "hybrid": {"layers": "AM", "rows": [row([1.0, 2.0], [30.0, None])]}}}
    (r,) = timing.ratios(results)["hybrid/standard"]
    assert r["prefill_speedup"] == pytest.approx(2.0) and r["prefill_speedup_ci95"] == pytest.approx([2.0, 2.0])
    # a repeat without a figure (None) drops out of the pairs, leaving one: the ratio without an interval
    assert r["decode_speedup"] == pytest.approx(3.0) and r["decode_speedup_ci95"] is None
    assert "predicted_decode_speedup" not in r  # no hardware limits in this result
    # with each row's roofline limit, the row carries the cost model's ratio beside the measured one
    results["models"]["standard"]["rows"][0]["decode_limit_tok_s"] = 100.0
    results["models"]["hybrid"]["rows"][0]["decode_limit_tok_s"] = 150.0
    assert timing.ratios(results)["hybrid/standard"][0]["predicted_decode_speedup"] == pytest.approx(1.5)


def test_naive_decode_is_skipped_above_its_context_limit():
    cfg = BenchConfig(contexts=[16, 24], new_tokens=4, batch_sizes=[1], repeats=1, warmup=0, peer=False,
                      naive_max_context=16)
    res = run_bench({"standard": smoke_model("AA"), "hybrid": smoke_model("AM")}, cfg)
    rows = res["models"]["hybrid"]["rows"]
    assert "naive_decode_tok_s" in rows[0] and "naive_decode_tok_s" not in rows[1]
    ratios = res["ratios"]["hybrid/standard"]
    assert "naive_decode_speedup" in ratios[0] and "naive_decode_speedup" not in ratios[1]
    text = format_table(res)
    assert "skipped" in text and "naive decode skipped above context 16" in text
