import pytest
import torch
from helpers import LLAMA, smoke_model

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.infer.engine import KVCache, StaticKVCache, compile_step, generate, sample_next

GQA = dict(LLAMA, n_head=4, n_kv_head=2, rotary_dims=4)  # grouped-query attention, RoPE on half of each head
# (pattern, config, batch): GPT-2's patterns, then the Llama family with grouped-query (and multi-query)
# attention, partial RoPE and an untied head; batch 3 decodes through _attend_one, batch 1 through SDPA.
CACHE_CASES = [(layers, {}, 3) for layers in ["AAAA", "AAMM", "MMAA", "AANN", "AMNA"]] + [
    (layers, kw, batch) for layers, kw in [("AAMM", GQA), ("AMNA", dict(LLAMA, n_head=4, n_kv_head=1)),
                                           ("ANAA", dict(LLAMA, tie_embeddings=False))] for batch in (1, 3)]


@pytest.mark.parametrize("layers, kw, batch", CACHE_CASES)
def test_kv_cache_logits_equal_full_recompute(layers, kw, batch):
    model = smoke_model(layers, **kw)
    T = model.config.block_size
    idx = torch.randint(0, model.config.vocab_size, (batch, T), generator=torch.Generator().manual_seed(0))
    full = model(idx)
    cache = KVCache(model, batch_size=batch)
    # A prefill of 10 tokens, a chunk of 5 appended, one token at a time, then a last chunk.
    pieces = [idx[:, :10], idx[:, 10:15]] + [idx[:, i:i + 1] for i in range(15, 25)] + [idx[:, 25:]]
    outs = []
    for piece in pieces:
        outs.append(model(piece, kv_cache=cache))
        cache.advance(piece.size(1))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)


def test_cache_holds_attention_layers_only():
    d = smoke_model("AAAA").config.n_embd
    assert KVCache(smoke_model("AAAA"), 1).nbytes() == 2 * 4 * 32 * d * 4
    assert KVCache(smoke_model("AAMM"), 1).nbytes() == 2 * 2 * 32 * d * 4
    assert KVCache(smoke_model("MMMM"), 1).nbytes() == 0


@pytest.mark.parametrize("layers", ["AAAA", "AAMM"])
def test_cached_greedy_generation_equals_uncached_well_past_the_context(layers):
    model = smoke_model(layers)
    with torch.no_grad():  # larger weights than the init's, so that the tokens depend on the context
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    idx = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    n = 4 * model.config.block_size  # the window restarts several times
    cached = torch.cat(list(generate(model, idx, n, temperature=0, use_cache=True)), dim=1)
    naive = torch.cat(list(generate(model, idx, n, temperature=0, use_cache=False)), dim=1)
    assert torch.equal(cached, naive)


def test_generation_gives_the_model_back_in_its_mode():
    model = smoke_model("AM").train()
    list(generate(model, torch.zeros(1, 3, dtype=torch.long), 3, temperature=0))
    assert model.training
    stream = generate(model, torch.zeros(1, 3, dtype=torch.long), 10, temperature=0)
    next(stream)
    assert not model.training  # dropout off while generating
    stream.close()  # a consumer that stops early
    assert model.training
    model.eval()
    list(generate(model, torch.zeros(1, 3, dtype=torch.long), 3, temperature=0))
    assert not model.training


def test_generation_past_the_context_keeps_going():
    model = smoke_model("AAMM")
    out = list(generate(model, torch.zeros(1, 30, dtype=torch.long), 50, temperature=1.0, seed=0))
    assert len(out) == 50


def test_sampling_is_seeded_and_respects_top_k_top_p():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample_next(logits, temperature=0).item() == 1
    assert sample_next(logits, temperature=1.0, top_k=1).item() == 1
    assert sample_next(logits, temperature=1.0, top_p=0.01).item() == 1
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    draws = [sample_next(logits.repeat(64, 1), 1.0, top_k=2, generator=g()) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    assert set(draws[0].flatten().tolist()) <= {1, 3}


def test_stop_token_ends_generation():
    model = smoke_model("AM")
    idx = torch.zeros(1, 3, dtype=torch.long)
    first = next(generate(model, idx, 1, temperature=0))
    out = list(generate(model, idx, 20, temperature=0, stop_tokens={int(first)}))
    assert len(out) == 1
    # In a batch, a finished row repeats its stop token while the others go on.
    two = torch.cat([idx, torch.ones(1, 3, dtype=torch.long)])
    second = next(generate(model, two[1:], 1, temperature=0))
    if int(second) != int(first):
        rows = torch.cat(list(generate(model, two, 4, temperature=0, stop_tokens={int(first)})), dim=1)
        assert rows.shape == (2, 4) and (rows[0] == int(first)).all()


@pytest.mark.parametrize("layers, kw", [("AAAA", {}), ("AAMM", {}), ("AAMM", GQA)])
def test_bfloat16_decode_matches_its_full_forward(layers, kw):
    """On the CPU at batch > 1 one query's attention is spelled out (model._attend_one), not SDPA."""
    model = smoke_model(layers, **kw).to(torch.bfloat16)
    T = model.config.block_size
    idx = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = model(idx).float()
        cache = KVCache(model, batch_size=2)
        outs = [model(idx[:, :8], kv_cache=cache)]
        cache.advance(8)
        for i in range(8, T):
            outs.append(model(idx[:, i:i + 1], kv_cache=cache))
            cache.advance(1)
    got = torch.cat(outs, dim=1).float()
    # bf16 keeps 8 bits of mantissa: the two paths round differently, so agree to bf16's precision.
    torch.testing.assert_close(got, full, rtol=0.05, atol=0.05)
    assert (got.argmax(-1) == full.argmax(-1)).float().mean() > 0.9


def test_single_query_attention_equals_sdpa():
    from hybrid_gpt.model.gpt import _attend_one

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, n, 16, generator=g) for n in (1, 20, 20))
    torch.testing.assert_close(_attend_one(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v),
                               rtol=1e-5, atol=1e-6)
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    expected = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb).float()
    torch.testing.assert_close(_attend_one(qb, kb, vb).float(), expected, rtol=0.02, atol=0.02)


def test_cache_holds_key_value_heads_only():
    model = smoke_model("AAMA", **LLAMA, n_head=4, n_kv_head=1)
    cache = KVCache(model, 2)
    assert [tuple(t.shape) for t in cache.kv] == [(2, 2, 1, 32, 8)] * 3
    assert cache.nbytes() == 2 * 2 * 3 * 1 * 32 * 8 * 4 == model.config.kv_bytes_per_token() * 2 * 32


def test_llama_decode_at_long_context_equals_recompute():
    """An 8192-token context (SmolLM2's): cached decoding at positions past 4096 and up to the last
    one equals recomputing the whole sequence, and the far end of the RoPE table holds its angles."""
    model = smoke_model("AA", vocab_size=64, block_size=8192, n_embd=16, n_head=2, **LLAMA, n_kv_head=1)
    with torch.no_grad():  # sharp attention, so that a position off by any amount shows in the logits
        for block in model.transformer.h:
            block.mixer.c_attn.weight.mul_(30)
    idx = torch.randint(0, 64, (1, 8192), generator=torch.Generator().manual_seed(0))
    ends = [4090, *range(4091, 4101), 8180, *range(8181, 8193)]  # a prefill, steps, a chunk, steps to the end
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model, 1)
        outs = []
        for start, end in zip([0] + ends, ends):
            outs.append(model(idx[:, start:end], kv_cache=cache, last_only=True))
            cache.advance(end - start)
    torch.testing.assert_close(torch.cat(outs, dim=1), full[:, [e - 1 for e in ends]], rtol=1e-4, atol=1e-4)
    angles = 8191 * 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    torch.testing.assert_close(model.rotary.cos[8191].double(), angles.cos().repeat(2), rtol=0, atol=2e-3)


def test_llama_cached_greedy_generation_equals_uncached_past_the_context():
    """Past the context the window restarts, and rotary positions restart from 0 with it, cached or not."""
    model = smoke_model("AAMM", **GQA)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    idx = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    n = 3 * model.config.block_size
    cached = torch.cat(list(generate(model, idx, n, temperature=0, use_cache=True)), dim=1)
    naive = torch.cat(list(generate(model, idx, n, temperature=0, use_cache=False)), dim=1)
    assert torch.equal(cached, naive)


def test_single_query_attention_with_grouped_heads_equals_sdpa():
    from hybrid_gpt.model.gpt import _attend_one

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 6, 1, 8, generator=g), torch.randn(3, 2, 20, 8, generator=g), \
        torch.randn(3, 2, 20, 8, generator=g)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(_attend_one(q, k, v), expected, rtol=1e-5, atol=1e-6)


def _sharpened(model):
    """``model`` with larger weights than the init's, so that its greedy tokens depend on the context."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    return model


@pytest.mark.parametrize("layers, kw, batch", CACHE_CASES)
def test_static_steps_equal_the_eager_path(layers, kw, batch):
    """A StaticKVCache step (positions and mask as tensors, keys written by index, attention over the whole
    buffer) gives the eager path's logits at every position, after a prefill on the same cache."""
    model = smoke_model(layers, **kw)
    T = model.config.block_size
    idx = torch.randint(0, model.config.vocab_size, (batch, T), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = model(idx)
        cache = StaticKVCache(model, batch)
        outs = [model(idx[:, :9], kv_cache=cache)]
        cache.advance(9)
        outs += [cache.step(model, idx[:, i:i + 1]) for i in range(9, T)]
    assert cache.pos == T and cache.mask is None
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)


def test_static_generation_equals_eager_past_the_context():
    model = _sharpened(smoke_model("AAMM", **GQA))
    idx = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    n = 3 * model.config.block_size  # the window restarts: the static cache is re-primed on its plain path
    static = torch.cat(list(generate(model, idx, n, temperature=0, step=model)), dim=1)
    eager = torch.cat(list(generate(model, idx, n, temperature=0)), dim=1)
    assert torch.equal(static, eager)


def test_static_step_refuses_a_full_cache_and_more_than_one_token():
    model = smoke_model("AA")
    cache = StaticKVCache(model, 1, max_len=4)
    with torch.inference_mode():
        with pytest.raises(ValueError, match=r"one token per row \(\(1, 1\)\), got shape \(1, 2\)"):
            cache.step(model, torch.zeros(1, 2, dtype=torch.long))
        cache.advance(4)
        with pytest.raises(HybridGPTError, match="holds 4 tokens and is full"):
            cache.step(model, torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="needs the cache"):
        list(generate(model, torch.zeros(1, 2, dtype=torch.long), 2, step=model, use_cache=False))


@pytest.mark.parametrize("layers, kw, batch", [("AAAA", {}, 1), ("AAMM", GQA, 2)])
def test_compiled_static_step_gives_the_eager_greedy_tokens(layers, kw, batch):
    """The compiled step (inductor, frozen weights, C++ wrapper on the CPU) on both patterns and both
    families, through SDPA (batch 1) and the spelled-out single query (batch 2); the eager model is left as
    it was."""
    torch._dynamo.reset()
    model = _sharpened(smoke_model(layers, **kw))
    idx = torch.randint(0, model.config.vocab_size, (batch, 7), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        before = model(idx)
    eager = torch.cat(list(generate(model, idx, 20, temperature=0)), dim=1)
    compiled = torch.cat(list(generate(model, idx, 20, temperature=0, step=compile_step(model))), dim=1)
    assert torch.equal(compiled, eager)
    with torch.inference_mode():
        assert torch.equal(model(idx), before)
