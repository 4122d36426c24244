import json

import pytest
from helpers import smoke_model

from hybrid_gpt.cli import main
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.infer.bench import BenchConfig, default_contexts, format_table, run_bench


def test_default_contexts_reach_the_models_maximum():
    assert default_contexts(128, 32) == [64, 128]
    assert default_contexts(128, 24) == [32, 64, 128]
    assert default_contexts(256, 32) == [64, 128, 256]
    assert default_contexts(1024, 32) == [128, 256, 512, 1024]


def test_bench_reports_every_figure_for_both_models_and_the_peer():
    pytest.importorskip("transformers")
    models = {"standard": smoke_model("AA"), "hybrid": smoke_model("AM")}
    cfg = BenchConfig(contexts=[16, 32], new_tokens=4, batch_sizes=[1, 2], repeats=2, warmup=0)
    res = run_bench(models, cfg, log=lambda *a: None)
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
        run_bench({"s": smoke_model("AA")}, BenchConfig(contexts=[64], new_tokens=4, peer=False), log=print)


def test_bench_measures_each_precision_side_by_side_with_its_quality_cost(smoke_run):
    pytest.importorskip("transformers")
    import torch

    from hybrid_gpt.data.tokens import TokenData

    data = TokenData.open(smoke_run / "data")
    models = {"standard": smoke_model("AA", vocab_size=data.tokenizer.vocab_size),
              "hybrid": smoke_model("AM", vocab_size=data.tokenizer.vocab_size)}
    cfg = BenchConfig(contexts=[16], new_tokens=4, batch_sizes=[1], repeats=1, warmup=0, naive=False,
                      dtypes=["float32", "bfloat16"], quality_tokens=512)
    res = run_bench(models, cfg, log=lambda *a: None, val=(data.val, data.tokenizer.token_byte_lengths()))
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


def test_training_throughput_bench_leaves_the_models_untouched():
    pytest.importorskip("transformers")
    import torch

    from hybrid_gpt.infer.bench import format_train_table, run_train_bench

    models = {"standard": smoke_model("AA"), "hybrid": smoke_model("AM")}
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in models.items()}
    res = run_train_bench(models, batch_size=2, repeats=2, warmup=0, log=lambda *a: None)
    assert set(res["tokens_per_sec"]) == {"standard", "hybrid", "peer"}
    assert all(s["n"] == 2 and s["median"] > 0 for s in res["tokens_per_sec"].values())
    assert res["standard_vs_peer"] > 0
    for n, m in models.items():
        assert all(torch.equal(before[n][k], v) for k, v in m.state_dict().items())
    assert "standard / peer" in format_train_table(res)


def test_precision_copies_are_ordinary_tensors_even_inside_inference_mode():
    """run_bench runs in inference mode; its bf16 copies must still be able to keep packed oneDNN weights."""
    import torch

    from hybrid_gpt.infer.bench import with_dtypes

    model = smoke_model("AM")
    with torch.inference_mode():
        copies = with_dtypes({"m": model}, ["float32", "bfloat16"])
    assert copies["m"] is model
    assert all(not p.is_inference() and p.dtype == torch.bfloat16 for p in copies["m@bfloat16"].parameters())
    assert next(model.parameters()).dtype == torch.float32


def test_bench_measures_compiled_entries_beside_eager():
    """--compile adds "<name>+compile" entries, checked against eager logits, with their own ratios."""
    import torch

    torch._dynamo.reset()
    models = {"standard": smoke_model("AA"), "hybrid": smoke_model("AM")}
    cfg = BenchConfig(contexts=[16], new_tokens=4, batch_sizes=[1, 2], repeats=1, warmup=1, naive=False,
                      peer=False, compile=True)
    recompile_limit = torch._dynamo.config.recompile_limit
    res = run_bench(models, cfg, log=lambda *a: None)
    assert torch._dynamo.config.recompile_limit == recompile_limit, "the dynamo settings are put back"
    assert set(res["models"]) == {"standard", "hybrid", "standard+compile", "hybrid+compile"}
    assert res["models"]["standard+compile"]["compiled"] and not res["models"]["standard"]["compiled"]
    for name in ("standard+compile", "hybrid+compile"):
        assert res["compiled"][name]["max_abs_logit_diff_from_eager"] <= 1e-4
        assert all(r["decode_tok_s"]["median"] > 0 for r in res["models"][name]["rows"])
    assert {"hybrid/standard", "hybrid+compile/standard+compile", "standard+compile/standard"} <= set(res["ratios"])
    assert "hybrid+compile/standard" not in res["ratios"], "compiled entries are compared with compiled ones"
    assert "(torch.compile, dynamic shapes) logits vs eager" in format_table(res)


def test_bench_compile_needs_a_warmup():
    with pytest.raises(HybridGPTError, match="needs warmup 1"):
        run_bench({"s": smoke_model("AA")}, BenchConfig(contexts=[16], new_tokens=4, warmup=0, peer=False,
                                                         compile=True), log=print)


def test_bench_compile_failure_is_one_clear_error(monkeypatch):
    import torch

    from hybrid_gpt.errors import RunFailure

    class Broken(torch.nn.Module):
        def forward(self, *a, **k):
            raise RuntimeError("no C++ compiler found\nlong traceback text")

    monkeypatch.setattr(torch, "compile", lambda model, **kw: Broken())
    with pytest.raises(RunFailure, match=r"torch.compile failed for s \(RuntimeError: no C\+\+ compiler found\); "
                                         r"run bench without --compile"):
        run_bench({"s": smoke_model("AA")}, BenchConfig(contexts=[16], new_tokens=4, peer=False, compile=True),
                  log=lambda *a: None)


def test_the_compute_ceiling_is_measured_with_the_models_own_linear_layers(monkeypatch):
    import torch

    from hybrid_gpt.infer.bench import measure_hardware
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

    from hybrid_gpt.infer.bench import _OursDecoder
    from hybrid_gpt.infer.engine import generate

    model = smoke_model("AM")
    tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    n = 6
    with torch.inference_mode():
        dec = _OursDecoder(model, 2, 24)
        dec.prefill(tokens)
        dec.rewind(24 - n)
        token, stepped = tokens[:, 24 - n:24 - n + 1], []
        for _ in range(n):
            token = dec.step(token)
            stepped.append(token)
        expected = list(generate(model, tokens[:, :24 - n + 1], n, temperature=0))
    assert all(torch.equal(a, b) for a, b in zip(stepped, expected))


def test_a_model_transformers_has_no_class_for_is_measured_without_a_peer():
    pytest.importorskip("transformers")
    logs = []
    model = smoke_model("AA", bias=False)  # GPT-2 without biases: the "custom" family
    cfg = BenchConfig(contexts=[16], new_tokens=4, batch_sizes=[1], repeats=1, warmup=0, naive=False)
    res = run_bench({"standard": model}, cfg, log=logs.append)
    assert "peers" not in res and any(line.startswith("peer: skipped for standard") for line in logs)


def test_kv_caches_that_would_not_fit_are_refused_before_measuring(monkeypatch):
    from hybrid_gpt import runtime

    monkeypatch.setattr(runtime, "available_memory_bytes", lambda device=None: 1000)
    with pytest.raises(HybridGPTError, match="KV caches of 1 models at context 16.*--contexts and --batch-sizes"):
        run_bench({"s": smoke_model("AA")}, BenchConfig(contexts=[16], new_tokens=4, peer=False), log=print)
