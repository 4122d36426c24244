"""int8 decode on the CPU (bench's quantize_int8): logits close to float32's, greedy decode through the KV cache,
and bench's int8 entries with their quality cost."""

import pytest
import torch
from helpers import smoke_model

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.infer.bench import BenchConfig, run_bench
from hybrid_gpt.infer.engine import generate
from hybrid_gpt.infer.entries import precision, quantize_int8, with_dtypes
from hybrid_gpt.model.gpt import GPT, GPTConfig
from hybrid_gpt.present.bench import format_table

# int8 weights with one scale per output row and int8 inputs per call: on these models the largest logit error
# is 0.8-1.7% of the largest |logit| and the greedy token the same at 97-100% of positions. The tolerance, about
# twice that: an error at most 3% of the largest |logit|, the same greedy token at 90% of positions or more.
RELATIVE_TOLERANCE = 0.03
AGREEMENT = 0.9


def _llama() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.llama(vocab_size=300, block_size=64, n_embd=64, n_head=4, n_kv_head=2, layers="AAMM",
                               ffn_hidden=96, rope_theta=5e4)).eval()


@pytest.mark.parametrize("make", [lambda: smoke_model("AAAA", vocab_size=300),
                                  lambda: smoke_model("AAMM", vocab_size=300), _llama],
                         ids=["gpt2-AAAA", "gpt2-AAMM", "llama-AAMM"])
def test_int8_logits_are_close_to_float32s(make):
    model = make()
    q = quantize_int8(model)
    idx = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref, out = model(idx), q(idx)
    err = (out - ref).abs().max().item()
    assert 0 < err <= RELATIVE_TOLERANCE * ref.abs().max().item(), "rounded, but only a little"
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean().item() >= AGREEMENT
    assert precision(q) == "int8" and precision(model) == "float32"
    assert type(model.lm_head).__name__ == "Linear" and type(q.lm_head).__name__ == "Int8Linear"
    # generation through the KV cache works on the int8 copy
    with torch.inference_mode():
        tokens = torch.cat(list(generate(q, idx[:, :8], 6, temperature=0)), dim=1)
    assert tokens.shape == (2, 6)


def test_int8_needs_a_float32_cpu_model():
    with pytest.raises(HybridGPTError, match="int8 needs a float32 model"):
        quantize_int8(smoke_model("AA").to(torch.bfloat16))
    assert "int8" in with_dtypes({"m": smoke_model("AA")}, ["int8"])["m@int8"].bench_precision


def test_bench_measures_int8_with_its_quality_cost(smoke_run):
    from hybrid_gpt.data.tokens import TokenData

    data = TokenData.open(smoke_run / "data")
    vocab = data.tokenizer.vocab_size
    models = {"standard": smoke_model("AA", vocab_size=vocab), "hybrid": smoke_model("AM", vocab_size=vocab)}
    cfg = BenchConfig(contexts=[16], new_tokens=4, batch_sizes=[1], repeats=1, warmup=0, naive=False,
                      dtypes=["float32", "int8"], quality_tokens=512)
    own = (data.val, data.tokenizer.token_byte_lengths())
    res = run_bench(models, cfg, val={name: own for name in models})
    assert set(res["models"]) == {"standard", "hybrid", "standard@int8", "hybrid@int8"}
    m = res["models"]["standard@int8"]
    assert m["dtype"] == "int8" and m["parameters"] == res["models"]["standard"]["parameters"]
    assert m["kv_bytes_per_token"] == res["models"]["standard"]["kv_bytes_per_token"], "the KV cache stays float32"
    assert m["rows"][0]["decode_tok_s"]["median"] > 0
    # priced with 1-byte linear weights: a higher limit than float32's
    assert m["rows"][0]["decode_limit_tok_s"] > res["models"]["standard"]["rows"][0]["decode_limit_tok_s"]
    assert {"hybrid@int8/standard@int8", "standard@int8/standard"} <= set(res["ratios"])
    if "peers" in res:  # no transformers peer in int8; CTranslate2's int8 is ours' peer where installed
        assert "peer@int8" not in res["peers"]
        if "ctranslate2@int8" in res["peers"]:
            assert "standard@int8/ctranslate2@int8" in res["ratios"]
    q = res["quality"]
    assert 0 < abs(q["standard@int8"]["cost_bpb"]) < 0.1 and q["standard@int8"]["bpb_float32"] == q["standard"]["bpb"]
    text = format_table(res)
    assert "quality standard@int8" in text and "standard@int8" in text


def test_int8_static_step_compiles_and_gives_the_eager_tokens():
    """The int8 products are a custom operator the compiler calls: the compiled static step decodes the eager
    int8 model's greedy tokens, on both patterns, and copies keep their own packed weights."""
    import copy

    from hybrid_gpt.infer.engine import compile_step, generate

    torch._dynamo.reset()
    for layers in ("AAAA", "AAMM"):
        model = quantize_int8(smoke_model(layers))
        twin = copy.deepcopy(model)
        del model  # the twin's packed weights outlive the original's
        idx = torch.randint(0, twin.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))
        eager = torch.cat(list(generate(twin, idx, 12, temperature=0)), dim=1)
        compiled = torch.cat(list(generate(twin, idx, 12, temperature=0, step=compile_step(twin))), dim=1)
        assert torch.equal(compiled, eager)
