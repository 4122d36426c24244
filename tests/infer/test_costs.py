"""The cost model against the real model: its FLOPs against torch's FlopCounterMode on a prefill and a cached
decode step, its weight bytes against the parameters, its KV bytes against the KV cache; the predicted speedup's
limits; the `costs` command."""

import json
import math

import pytest
import torch
from helpers import LLAMA, run_bad, smoke_config, smoke_model
from torch.utils.flop_counter import FlopCounterMode

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.infer.costs import (
    WEIGHT_COMPONENTS,
    amdahl_bound,
    costs_table,
    first_context_reaching,
    pattern_configs,
    predicted_speedup,
    roofline_seconds,
    step_costs,
)
from hybrid_gpt.infer.engine import KVCache
from hybrid_gpt.model import kernels
from hybrid_gpt.model.gpt import GPTConfig
from hybrid_gpt.options import MAX_CONTEXT
from hybrid_gpt.present.bench import format_costs

HW = {"memory_bandwidth_bytes_per_s": 50e9, "matmul_flops_per_s": 100e9}
GQA = dict(LLAMA, n_kv_head=1, tie_embeddings=False)  # smoke width has 2 heads: one key/value head is GQA
SHAPES = [("AAAA", {}), ("AAMM", {}), ("AANN", {}), ("MMAA", {}), ("AAMN", GQA)]
ATTENTION_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "bmm")  # SDPA, or _attend_one's products
LINEAR_OPS = ("mm", "addmm")


@pytest.fixture
def plain_linear():
    """Linear layers on F.linear, whose products FlopCounterMode sees (oneDNN's custom op it does not count)."""
    kernels.set_enabled(False)
    yield
    kernels.set_enabled(None)


def _counted(fn) -> dict[str, int]:
    with FlopCounterMode(display=False) as counter:
        fn()
    return {str(op).removeprefix("aten."): n for op, n in counter.get_flop_counts()["Global"].items()}


def _ops(counts: dict[str, int], names) -> int:
    return sum(counts.get(n, 0) for n in names)


def _counts_cpu_sdpa() -> bool:
    from torch.utils.flop_counter import flop_registry

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    return op in flop_registry or op.default in flop_registry


@pytest.mark.parametrize("batch", [1, 3])  # batch 3 decodes through _attend_one (bmm), batch 1 through SDPA
@pytest.mark.parametrize("layers, kw", SHAPES)
@torch.inference_mode()
def test_flops_match_torch_flop_counter(layers, kw, batch, plain_linear):
    """Linear layers and attention products count exactly what FlopCounterMode counts when the model runs a
    prefill (bench's: a cache filled, the last position's logits) and one cached decode step. FlopCounterMode
    counts no elementwise op (norms, softmax, activations, RoPE, residual and bias adds), which the cost model
    neglects too; it counts a causal SDPA as the full context x context rectangle, where the cost model counts
    the context (context + 1) / 2 query-key pairs the kernels compute: that difference is checked exactly."""
    model = smoke_model(layers, **kw)
    cfg, context = model.config, 12
    tokens = torch.randint(0, cfg.vocab_size, (batch, context + 1), generator=torch.Generator().manual_seed(0))
    cache = KVCache(model, batch, max_len=context + 1)

    prefill = _counted(lambda: model(tokens[:, :context], kv_cache=cache, last_only=True))
    cache.advance(context)
    decode = _counted(lambda: model(tokens[:, context:], kv_cache=cache, last_only=True))

    mine = {phase: step_costs(cfg, context=context, batch=batch, phase=phase)["components"]
            for phase in ("prefill", "decode")}
    n_a = layers.count("A")
    for phase, counts in (("prefill", prefill), ("decode", decode)):
        assert set(counts) <= set(ATTENTION_OPS + LINEAR_OPS), counts
        assert _ops(counts, LINEAR_OPS) == sum(mine[phase][c]["flops"] for c in WEIGHT_COMPONENTS), phase
    if not _counts_cpu_sdpa():
        pytest.skip("linear layers checked; this torch's FlopCounterMode does not count CPU SDPA (torch 2.13 does "
                    "not), so the attention products cannot be checked against it")
    assert _ops(decode, ATTENTION_OPS) == mine["decode"]["attention_scores"]["flops"] > 0
    rectangle = 4 * batch * cfg.n_embd * n_a * context * context
    assert _ops(prefill, ATTENTION_OPS) == rectangle
    assert mine["prefill"]["attention_scores"]["flops"] == rectangle * (context + 1) // (2 * context)


def _parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weight_bytes_are_the_parameters_in_the_dtype(dtype):
    """Each weight is read once per step: with tied embeddings and rotary positions (nothing only gathered) the
    bytes read are the model's parameter bytes in the dtype; a learned position table costs the rows read, an
    untied embedding the rows gathered."""
    cast = getattr(torch, dtype)
    e = torch.empty((), dtype=cast).element_size()
    tied = smoke_model("AAMN", **LLAMA).to(cast)
    for phase in ("decode", "prefill"):
        c = step_costs(tied.config, context=10, batch=2, dtype=dtype, phase=phase)
        assert c["weight_bytes"] == c["parameter_bytes"] == _parameter_bytes(tied)
        assert sum(p["parameters"] for p in c["components"].values()) == tied.num_params() == c["parameters"]

    gpt2 = smoke_model("AAMM").to(cast)
    cfg, d = gpt2.config, gpt2.config.n_embd
    decode = step_costs(cfg, context=10, dtype=dtype)
    assert decode["weight_bytes"] == _parameter_bytes(gpt2) - (cfg.block_size - 1) * d * e  # one position's row
    full = step_costs(cfg, context=cfg.block_size, dtype=dtype, phase="prefill")
    assert full["weight_bytes"] == _parameter_bytes(gpt2)  # every position's row: the whole table

    untied = smoke_model("AA", **GQA).to(cast)
    c = step_costs(untied.config, context=10, batch=3, dtype=dtype)
    assert c["weight_bytes"] == _parameter_bytes(untied) - (untied.config.vocab_size - 3) * d * e


@pytest.mark.parametrize("layers, kw", SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_bytes_are_the_cache(layers, kw, dtype):
    """A decode step reads the keys and values of the `context` cached tokens (what a KVCache of that length
    holds) and writes one token's per row; a prefill writes the prompt's."""
    model = smoke_model(layers, **kw).to(getattr(torch, dtype))
    cfg, context, batch = model.config, 20, 3
    kv = step_costs(cfg, context=context, batch=batch, dtype=dtype)["components"]["kv_cache"]
    assert kv["bytes_read"] == cfg.kv_bytes_per_token(getattr(torch, dtype)) * context * batch
    assert kv["bytes_read"] == KVCache(model, batch, max_len=context).nbytes()
    assert kv["bytes_written"] * context == kv["bytes_read"]
    prefill = step_costs(cfg, context=context, batch=batch, dtype=dtype, phase="prefill")["components"]["kv_cache"]
    assert prefill["bytes_written"] == kv["bytes_read"]


def test_gqa_shrinks_the_cache_and_not_the_scores():
    full, gqa = smoke_config("AAAA", **LLAMA), smoke_config("AAAA", **dict(LLAMA, n_kv_head=1))
    a, b = (step_costs(c, context=16)["components"] for c in (full, gqa))
    assert b["kv_cache"]["bytes_read"] * 2 == a["kv_cache"]["bytes_read"]
    assert b["attention_scores"] == a["attention_scores"]
    assert b["attention_weights"]["flops"] < a["attention_weights"]["flops"]


def test_roofline_is_the_slower_of_memory_and_arithmetic():
    c = step_costs(smoke_config("AAMM"), context=16, batch=4)
    memory_bound = {"memory_bandwidth_bytes_per_s": 1.0, "matmul_flops_per_s": 1e30}
    compute_bound = {"memory_bandwidth_bytes_per_s": 1e30, "matmul_flops_per_s": 1.0}
    assert roofline_seconds(c, memory_bound) == c["bytes"] == c["bytes_read"] + c["bytes_written"]
    assert roofline_seconds(c, compute_bound) == c["flops"]


def _far(cfg: GPTConfig) -> GPTConfig:
    return GPTConfig(**{**cfg.to_dict(), "block_size": MAX_CONTEXT})


@pytest.mark.parametrize("phase", ["decode", "prefill"])
@pytest.mark.parametrize("kw", [{}, GQA])
def test_speedup_is_one_for_the_same_model_and_tends_to_the_amdahl_bound(phase, kw):
    base, other = _far(smoke_config("AAAA", **kw)), _far(smoke_config("AAMM", **kw))
    for batch in (1, 8):
        args = dict(batch=batch, hardware=HW, phase=phase)
        assert predicted_speedup(base, base, context=100, **args) == 1.0
        bound = amdahl_bound(base, other, **args)
        assert bound == pytest.approx(2.0)  # half the attention layers: half of what grows with the context
        ratios = [predicted_speedup(base, other, context=c, **args) for c in (64, 4096, MAX_CONTEXT)]
        assert ratios == sorted(ratios) and ratios[-1] < bound
        assert bound - ratios[-1] < 0.01 * bound and bound - ratios[-1] < (bound - ratios[0]) / 100


def test_amdahl_bound_without_attention():
    base = smoke_config("AAAA")
    assert amdahl_bound(base, smoke_config("AMMM"), hardware=HW) == pytest.approx(4.0)
    assert amdahl_bound(base, smoke_config("NNNN"), hardware=HW) == math.inf
    assert amdahl_bound(smoke_config("MMMM"), base, hardware=HW) == 0.0
    no_attention = amdahl_bound(smoke_config("MMMM"), smoke_config("NNNN"), hardware=HW)
    assert no_attention == pytest.approx(predicted_speedup(smoke_config("MMMM"), smoke_config("NNNN"), context=8,
                                                           hardware=HW))  # nothing grows with the context


def test_first_context_reaching_a_speedup():
    base, other = _far(smoke_config("AAAA")), _far(smoke_config("AAMM"))
    for target in (1.25, 1.5):
        c = first_context_reaching(base, other, target, limit=MAX_CONTEXT, hardware=HW)
        assert predicted_speedup(base, other, context=c, hardware=HW) >= target
        assert predicted_speedup(base, other, context=c - 1, hardware=HW) < target
    assert first_context_reaching(base, other, 2.0, limit=MAX_CONTEXT, hardware=HW) is None  # the bound itself
    assert first_context_reaching(base, other, 1.5, limit=64, hardware=HW) is None
    assert first_context_reaching(base, other, 0.5, limit=64, hardware=HW) == 1


def test_table_and_text():
    configs = pattern_configs(smoke_config("AAAA"), ["standard", "AAMM", " aann "])
    assert list(configs) == ["AAAA", "AAMM", "AANN"]
    table = costs_table(configs, [8, 32], [1, 2], "bfloat16", HW)
    assert json.loads(json.dumps(table)) == table
    assert len(table["rows"]) == 3 * 2 * 2 * 2 and set(table["speedups"]) == {"AAMM/AAAA", "AANN/AAAA"}
    assert [lim["amdahl_bound"] for lim in table["speedups"]["AAMM/AAAA"]["limits"]] == pytest.approx([2.0] * 4)
    text = format_costs(table)
    assert "predicted speedup AAMM/AAAA" in text and "bound 2.00x" in text and "prefill" in text


@pytest.mark.parametrize("call, message", [
    (lambda: pattern_configs(smoke_config(), ["AAXM"]), "has letters 'X'"),
    (lambda: pattern_configs(smoke_config(), ["AAMM", "aamm"]), "given twice"),
    (lambda: step_costs(smoke_config(), context=33), "over the model's context of 32"),
    (lambda: step_costs(smoke_config(), context=0), "context must be"),
    (lambda: step_costs(smoke_config(), context=8, batch=0), "batch must be"),
    (lambda: step_costs(smoke_config(), context=8, phase="train"), "unknown phase"),
    (lambda: step_costs(smoke_config(), context=8, dtype="float64"), "unknown dtype"),
    (lambda: roofline_seconds(step_costs(smoke_config(), context=8), {"memory_bandwidth_bytes_per_s": 1}),
     "matmul_flops_per_s must be a positive number"),
    (lambda: predicted_speedup(smoke_config(), smoke_config(), context=8,
                               hardware=dict(HW, matmul_flops_per_s=float("nan"))), "positive number"),
])
def test_bad_input_is_one_error(call, message):
    with pytest.raises(HybridGPTError, match=message):
        call()


def _config_only_checkpoint(tmp_path, cfg: GPTConfig):
    """A checkpoint directory whose weights file is empty: `costs` reads the config alone."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"format": "hybrid-gpt-checkpoint", "format_version": 1,
                                                  "model": cfg.to_dict(), "training": {}}))
    (ckpt / "model.safetensors").write_bytes(b"")
    return ckpt


GIVEN = ["--bandwidth", "50", "--flops", "100"]


def test_costs_command_table_and_json(tmp_path, capsys):
    from hybrid_gpt.cli import main

    assert main(["costs", "--layers", "AAAA,AAMM", "--preset", "smoke", "--contexts", "16,256", *GIVEN]) == 0
    text = capsys.readouterr().out
    assert "predicted speedup AAMM/AAAA" in text and "given with --bandwidth" in text and "256" in text

    ckpt = _config_only_checkpoint(tmp_path, smoke_config("AAAA", **dict(LLAMA, n_kv_head=1)))
    assert main(["costs", str(ckpt), "--contexts", "8,32", "--batch-sizes", "2", "--dtype", "bfloat16",
                 "--phase", "decode", "--json", *GIVEN]) == 0
    table = json.loads(capsys.readouterr().out)
    assert list(table["models"]) == ["AAAA", "AAMM"]  # standard and hybrid of the checkpoint's depth
    assert table["models"]["AAMM"]["config"]["n_kv_head"] == 1 and table["dtype"] == "bfloat16"
    assert {r["phase"] for r in table["rows"]} == {"decode"} and table["search_limit"] == 32


def test_costs_command_measures_this_machine_by_default(monkeypatch, capsys):
    import hybrid_gpt.infer.hardware as hardware
    from hybrid_gpt.cli import main

    seen = []
    monkeypatch.setattr(hardware, "measure_hardware", lambda device: seen.append(device) or dict(HW, method="probe"))
    assert main(["costs", "--layers", "AM", "--preset", "smoke", "--contexts", "8", "--device", "cpu"]) == 0
    assert seen == [torch.device("cpu")] and "measured on cpu: probe" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--layers", "AAXM"], "has letters 'X'"),
    (["--bandwidth", "50"], "give both --bandwidth and --flops"),
    (["--bandwidth", "0", "--flops", "1"], "--bandwidth: must be in [0.001, 1e+06]"),
    (["--dtype", "float64"], "invalid choice"),
    (["--contexts", "0"], "--contexts: has 0, which must be at least 1"),
    (["CKPT", "--contexts", "64"], "context 64 is over the model's context of 32 tokens"),
    (["missing-dir"], "does not exist"),
])
def test_costs_command_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    ckpt = _config_only_checkpoint(tmp_path, smoke_config("AAAA"))
    argv = [str(ckpt) if a == "CKPT" else a for a in argv]
    code, err = run_bad(["costs", "--preset", "smoke", *argv] + ([] if "--bandwidth" in argv else GIVEN), capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


def test_int8_prices_linear_weights_at_one_byte_and_the_rest_in_float32():
    """bench's int8 model (quantize_int8): every linear layer's weight in 1 byte with a float32 scale per output
    row, biases, norms, tables and the KV cache in float32; its roofline is the faster for it."""
    from hybrid_gpt.infer.entries import quantize_int8
    from hybrid_gpt.infer.hardware import decode_limit

    model = smoke_model("AAMM")
    f32, i8 = (step_costs(model.config, context=10, dtype=d)["components"] for d in ("float32", "int8"))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    want = sum(m.weight.numel() + 4 * m.out_features + (4 * m.bias.numel() if m.bias is not None else 0)
               for m in linears)
    assert sum(i8[c]["bytes_read"] for c in ("attention_weights", "token_mlp_weights", "ffn_weights",
                                               "lm_head")) == want
    assert all(i8[c] == f32[c] for c in ("kv_cache", "norms", "embeddings", "attention_scores"))
    assert decode_limit(quantize_int8(model), 10, 1, HW) > decode_limit(model, 10, 1, HW)
    assert "int8 linear weights" in format_costs(costs_table({"m": model.config}, [10], [1], "int8", HW))
