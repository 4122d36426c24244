import itertools
import math

import pytest
import torch
from helpers import LLAMA, smoke_config, smoke_model

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.model.gpt import GPT, GPTConfig, check_layers, mixer_activations, parse_layers

# Every pattern of three blocks, plus the four-block patterns the experiments use.
PATTERNS = ["".join(p) for p in itertools.product("AMN", repeat=3)] + ["AAAA", "AAMM", "AANN", "MMAA"]


@pytest.mark.parametrize("layers", PATTERNS)
def test_causal_for_every_pattern(layers):
    model = smoke_model(layers)
    T = model.config.block_size
    idx = torch.randint(0, model.config.vocab_size, (2, T))
    base = model(idx)
    assert base.shape == (2, T, model.config.vocab_size)
    for t in (0, T // 2, T - 1):
        changed = idx.clone()
        changed[:, t:] = (changed[:, t:] + 1) % model.config.vocab_size
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize("layers", ["MMMM", "NNNN", "MNMN"])
def test_models_without_attention_never_mix_positions(layers):
    """With no A block, the logits at a position depend on that position's token alone."""
    model = smoke_model(layers)
    idx = torch.randint(0, model.config.vocab_size, (1, 12))
    base = model(idx)
    changed = idx.clone()
    changed[0, 3] = (changed[0, 3] + 5) % model.config.vocab_size
    out = model(changed)
    keep = [i for i in range(12) if i != 3]
    torch.testing.assert_close(out[0, keep], base[0, keep], rtol=0, atol=0)
    assert not torch.allclose(out[0, 3], base[0, 3])


def test_m_mixer_is_per_token():
    model = smoke_model("AM")
    mixer = model.transformer.h[1].mixer
    x = torch.randn(2, 10, model.config.n_embd)
    per_position = torch.cat([mixer(x[:, i:i + 1]) for i in range(10)], dim=1)
    torch.testing.assert_close(mixer(x), per_position)
    # The mixer is LayerNorm -> Linear(d, h) -> GELU -> Linear(h, d), h = d / 4 by default.
    assert mixer.c_fc.weight.shape == (model.config.n_embd // 4, model.config.n_embd)


@pytest.mark.parametrize("layers", ["AAAA", "AAMM", "AANN", "MMMM", "AMNA"])
def test_parameter_count_formula(layers):
    config = smoke_config(layers)
    assert GPT(config).num_params() == config.num_params()
    config = smoke_config(layers, mlp_hidden=24)
    assert GPT(config).num_params() == config.num_params()


def test_n_blocks_have_no_mixer_parameters():
    assert smoke_model("AN").num_params() < smoke_model("AM").num_params() < smoke_model("AA").num_params()
    assert not any(".1.mixer" in n or ".1.ln_1" in n for n, _ in smoke_model("AN").named_parameters())


def test_kv_bytes_per_token_counts_attention_layers_only():
    d = smoke_config().n_embd
    assert smoke_config("AAAA").kv_bytes_per_token() == 2 * 4 * d * 4
    assert smoke_config("AAMM").kv_bytes_per_token() == 2 * 2 * d * 4
    assert smoke_config("MMNN").kv_bytes_per_token() == 0
    assert smoke_config("AAMM").kv_bytes_per_token(torch.bfloat16) == 2 * 2 * d * 2


def test_tied_embeddings_and_loss():
    model = smoke_model("AM")
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(0, 97, (2, 8))
    targets = idx.clone()
    targets[:, :4] = -1  # ignored positions
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 97), idx[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers="AAXM"), "letters 'X'"),
    (dict(layers=""), "must not be empty"),
    (dict(layers="aamm"), "letters 'am'"),  # the config holds the normal form; parse_layers makes it
    (dict(n_embd=30, n_head=4), "n_embd 30 must be divisible by n_head 4"),
    (dict(vocab_size=0), "vocab_size must be at least 1"),
    (dict(block_size="64"), "block_size must be a whole number"),
    (dict(dropout=1.5), "dropout"),
])
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(HybridGPTError, match=message):
        smoke_config(**kwargs).validate()


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(HybridGPTError, match="unknown keys"):
        GPTConfig.from_dict({"layers": "AA", "n_layers": 2})


def test_too_long_input_is_an_error():
    model = smoke_model("AM")
    with pytest.raises(HybridGPTError, match="exceeds"):
        model(torch.zeros(1, model.config.block_size + 1, dtype=torch.long))


def test_last_only_logits_equal_the_last_row_of_the_full_logits():
    import torch

    model = smoke_model("AMNA")
    idx = torch.randint(0, model.config.vocab_size, (3, 17))
    with torch.no_grad():
        full, last = model(idx), model(idx, last_only=True)
    assert last.shape == (3, 1, model.config.vocab_size)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers", ["AAMM", "NNNN"])
def test_dropout_acts_only_in_training_mode(layers):
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    model = smoke_model(layers, dropout=0.5)
    with torch.no_grad():
        assert torch.equal(model(idx), model(idx)), "eval mode must be deterministic"
        model.train()
        assert not torch.equal(model(idx), model(idx)), "dropout 0.5 in training mode must change the output"
        plain = smoke_model(layers, dropout=0.0).train()
        assert torch.equal(plain(idx), plain(idx)), "dropout 0 does nothing, even in training mode"


def test_checkpoints_from_before_the_mixer_rename_load():
    """Old checkpoints name a block's mixer GPT-2's way (``attn``); they load into ``mixer``."""
    model = smoke_model("AMNA")
    legacy = {k.replace(".mixer.", ".attn."): v for k, v in model.state_dict().items()}
    assert any(".attn." in k for k in legacy)
    fresh = smoke_model("AMNA", seed=1)
    fresh.load_state_dict(legacy)  # strict
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_library_errors_name_fields_not_command_line_flags():
    with pytest.raises(HybridGPTError) as info:
        smoke_config(n_embd=30, n_head=4).validate()
    assert "--" not in str(info.value)


def test_the_pattern_parser_normalises_and_names_every_bad_letter():
    assert parse_layers(" aaMm ") == "AAMM" and check_layers("MAN") == "MAN"
    for text, message in ((" ", "must be non-empty"), ("", "must be non-empty"), (None, "must be non-empty"),
                          ("AAXQ", "has letters 'QX'"), ("A-M", "has letters '-'")):
        with pytest.raises(HybridGPTError, match=message) as info:
            parse_layers(text)
        assert "use only A (attention), M (per-token MLP) and N (no mixer)" in str(info.value)
    with pytest.raises(HybridGPTError, match="letters 'a'"):
        check_layers("aA")  # the validator takes only the normal form


@pytest.mark.parametrize("kw", [{}, LLAMA], ids=["gpt2", "llama"])
def test_mixer_activations_are_each_blocks_input_and_mixer_output(kw):
    model = smoke_model("AMNA", **kw)
    idx = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    acts = mixer_activations(model, idx, [3, 0, 1])
    assert sorted(acts) == [0, 1, 3]
    # The same computation spelled out: embeddings, then each block in turn (an attention block applies
    # rotary positions itself, so its mixer is a function of its input alone in both families).
    h = model.transformer
    x = h.wte(idx) + (h.wpe(torch.arange(16)) if "wpe" in h else 0)
    for i, block in enumerate(h.h):
        if i in acts:
            torch.testing.assert_close(acts[i][0], x, rtol=0, atol=0)
            torch.testing.assert_close(acts[i][1], block.mixer(block.ln_1(x)), rtol=0, atol=0)
        x = block(x)
    assert not model.transformer.h[0]._forward_pre_hooks and not model.transformer.h[3].mixer._forward_hooks
    with pytest.raises(HybridGPTError, match="block 3 .* has no token mixer"):
        mixer_activations(model, idx, [2])


def test_mixer_activations_stop_after_the_last_block_asked_for():
    model = smoke_model("AAAA")
    calls = []
    hook = model.transformer.h[3].register_forward_pre_hook(lambda m, a: calls.append(3))
    head = model.lm_head.register_forward_pre_hook(lambda m, a: calls.append("head"))
    mixer_activations(model, torch.zeros(1, 4, dtype=torch.long), [1])
    assert calls == []  # neither block 4 nor the vocabulary projection ran
    model(torch.zeros(1, 4, dtype=torch.long))
    assert calls == [3, "head"]
    hook.remove()
    head.remove()


# ---- The Llama family: the same class, configured ----

# (config kwargs, what the test calls it): plain multi-head, grouped-query with partial RoPE, multi-query,
# Llama with biases and untied embeddings, and a GPT-2 with grouped-query attention ("custom").
SHAPES = [
    (dict(), "gpt2"),
    (dict(LLAMA, n_head=4, n_kv_head=2, rotary_dims=4), "llama-gqa-partial-rope"),
    (dict(LLAMA, n_head=4, n_kv_head=1, rope_theta=500.0), "llama-mqa"),
    (dict(LLAMA, bias=True, tie_embeddings=False), "llama-bias-untied"),
    (dict(n_head=4, n_kv_head=2), "gpt2-gqa"),
]


def _rope_reference(t: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    """RoPE from its definition (float64): dims i and i + R/2 of each head turn by pos * theta^(-2i/R)."""
    if config.positions != "rope":
        return t
    R = config.rope_dims
    pos = torch.arange(t.size(-2), dtype=torch.float64)
    out = t.clone()
    for i in range(R // 2):
        angle = pos * config.rope_theta ** (-2 * i / R)
        a, b = t[..., i], t[..., i + R // 2]
        out[..., i] = a * angle.cos() - b * angle.sin()
        out[..., i + R // 2] = b * angle.cos() + a * angle.sin()
    return out


def _attention_reference(attn, x: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    """Causal attention spelled out head by head in float64 from the fused c_attn's rows (n_head query heads,
    then kv_heads key heads, then kv_heads value heads; query head h reads key/value head h // group)."""
    H, KV, D = config.n_head, config.kv_heads, config.head_dim
    x = x.double()

    def rows(i, linear):  # head i of the fused projection
        w = linear.weight.double()[i * D:(i + 1) * D]
        y = x @ w.T
        return y if linear.bias is None else y + linear.bias.double()[i * D:(i + 1) * D]

    T = x.size(1)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    heads = []
    for h in range(H):
        g = h // (H // KV)
        q, k, v = _rope_reference(rows(h, attn.c_attn), config), _rope_reference(rows(H + g, attn.c_attn), config), \
            rows(H + KV + g, attn.c_attn)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(future, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v)
    y = torch.cat(heads, dim=-1) @ attn.c_proj.weight.double().T
    return y if attn.c_proj.bias is None else y + attn.c_proj.bias.double()


@pytest.mark.parametrize("kw, name", SHAPES, ids=[s[1] for s in SHAPES])
def test_fused_attention_equals_a_per_head_reference(kw, name):
    """The fused q, k, v layout, grouped-query attention and RoPE (HF's rotate_half convention) against
    the computation spelled out head by head; for GPT-2 this pins today's layout."""
    model = smoke_model("AA", **kw)
    config = model.config
    x = torch.randn(2, 11, config.n_embd, generator=torch.Generator().manual_seed(0))
    for block in model.transformer.h:
        got = block.mixer(x)
        torch.testing.assert_close(got.double(), _attention_reference(block.mixer, x, config), rtol=1e-5, atol=1e-5)


def test_rope_is_relative_and_offsets_index_the_same_table():
    """A query at position m and a key at n score by m - n alone, and the tables sliced at a cache's offset
    are the full sequence's: what makes cached decoding equal recomputation."""
    from hybrid_gpt.model.gpt import apply_rope

    model = smoke_model("A", **LLAMA)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 16, generator=g), torch.randn(2, 16, generator=g)

    def score(m, n):
        cos, sin = model.rotary(slice(0, model.config.block_size))
        return (apply_rope(q, cos[m:m + 1], sin[m:m + 1]) * apply_rope(k, cos[n:n + 1], sin[n:n + 1])).sum()

    torch.testing.assert_close(score(5, 2), score(20, 17), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 3))
    x = torch.randn(1, 2, 20, 16, generator=g)
    full = apply_rope(x, *model.rotary(slice(0, 20)))
    torch.testing.assert_close(apply_rope(x[:, :, 13:], *model.rotary(slice(13, 20))), full[:, :, 13:], rtol=0, atol=0)
    torch.testing.assert_close(full.double(), _rope_reference(x.double(), model.config), rtol=1e-5, atol=1e-5)


def test_rmsnorm_matches_hf_llama_arithmetic():
    from hybrid_gpt.model.gpt import RMSNorm

    norm = RMSNorm(8, 1e-5)
    with torch.no_grad():
        norm.weight.normal_(generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1)) * 5
    expected = norm.weight * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(norm(x), expected)
    xb = x.to(torch.bfloat16)
    normed = (xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert torch.equal(norm.to(torch.bfloat16)(xb), norm.weight * normed)  # float32 inside, cast before the gain


def test_swiglu_c_fc_holds_the_gate_rows_then_the_up_rows():
    model = smoke_model("AM", **LLAMA, ffn_hidden=24)
    mlp, mixer = model.transformer.h[0].mlp, model.transformer.h[1].mixer
    assert mlp.c_fc.weight.shape == (48, 32) and mlp.c_proj.weight.shape == (32, 24) and mlp.c_fc.bias is None
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    gate, up = mlp.c_fc.weight[:24], mlp.c_fc.weight[24:]
    torch.testing.assert_close(mlp(x), torch.nn.functional.silu(x @ gate.T) * (x @ up.T) @ mlp.c_proj.weight.T)
    # An M block follows the family (RMSNorm -> SwiGLU of hidden width n_embd // 4) but keeps its biases.
    h = model.config.m_hidden
    assert type(model.transformer.h[1].ln_1).__name__ == "RMSNorm"
    assert mixer.c_fc.weight.shape == (2 * h, 32) and mixer.c_fc.bias is not None and mixer.c_proj.bias is not None
    b = mixer.c_fc.bias
    expected = torch.nn.functional.silu(x @ mixer.c_fc.weight[:h].T + b[:h]) * (x @ mixer.c_fc.weight[h:].T + b[h:])
    torch.testing.assert_close(mixer(x), expected @ mixer.c_proj.weight.T + mixer.c_proj.bias)


def test_llama_state_dict_names_and_shapes():
    model = smoke_model("AMN", **LLAMA, n_head=4, n_kv_head=1, tie_embeddings=False)
    state = model.state_dict()
    assert "transformer.wpe.weight" not in state and not any("cos" in k or "sin" in k for k in state)
    assert state["transformer.h.0.mixer.c_attn.weight"].shape == ((4 + 2) * 8, 32)
    assert state["transformer.h.0.mixer.c_proj.weight"].shape == (32, 32)
    assert state["transformer.h.0.mlp.c_fc.weight"].shape == (2 * 128, 32)
    assert set(k for k in state if k.startswith("transformer.h.0.ln_")) == {"transformer.h.0.ln_1.weight",
                                                                          "transformer.h.0.ln_2.weight"}
    assert "transformer.h.2.ln_1.weight" not in state and "transformer.ln_f.weight" in state
    assert model.lm_head.weight is not model.transformer.wte.weight


@pytest.mark.parametrize("layers", ["AAMM", "AANN", "MAN", "ANMA"])
def test_llama_family_is_causal(layers):
    model = smoke_model(layers, **LLAMA, n_head=4, n_kv_head=2)
    idx = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    base = model(idx)
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % model.config.vocab_size
    out = model(changed)
    torch.testing.assert_close(out[:, :9], base[:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(out[:, 9], base[:, 9])


def test_llama_without_attention_never_mixes_positions():
    """Rotary positions act only inside attention: M and N blocks see each token alone."""
    model = smoke_model("MNM", **LLAMA)
    idx = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(idx[:, 4:])[0], model(idx)[0, 4:], rtol=0, atol=0)


def test_bfloat16_keeps_the_rope_tables_in_float32():
    model = smoke_model("AAMM", **LLAMA, n_head=4, n_kv_head=2)
    idx = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(idx)
        half = model.to(torch.bfloat16)
        assert half.rotary.cos.dtype == torch.float32 and half.transformer.wte.weight.dtype == torch.bfloat16
        assert all(b.mixer.rotary is half.rotary for b in half.transformer.h[:2])  # one table, shared
        out = half(idx)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), full, rtol=0.05, atol=0.05)
    model.float()
    torch.testing.assert_close(model.rotary.cos, smoke_model("A", **LLAMA, n_head=4).rotary.cos, rtol=0, atol=0)


CONFIGS = [
    dict(),
    dict(mlp_hidden=24),
    dict(LLAMA),
    dict(LLAMA, n_head=4, n_kv_head=2, ffn_hidden=40, mlp_hidden=5),
    dict(LLAMA, n_head=4, n_kv_head=1, tie_embeddings=False, bias=True),
    dict(ffn="swiglu", n_kv_head=1, bias=False),
    dict(norm="rmsnorm", positions="rope", tie_embeddings=False),
]


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("layers", ["AAMM", "MNA", "NNNN"])
def test_parameter_count_formula_of_both_families(kw, layers):
    config = smoke_config(layers, **kw)
    assert GPT(config).num_params() == config.num_params()


def test_kv_bytes_per_token_counts_key_value_heads():
    config = smoke_config("AAMA", **LLAMA, n_head=4, n_kv_head=1)
    assert config.kv_bytes_per_token() == 2 * 3 * 1 * 8 * 4
    assert config.kv_bytes_per_token(torch.bfloat16) == 2 * 3 * 1 * 8 * 2


def test_family_helpers_and_the_llama_constructor():
    config = GPTConfig.llama(n_embd=64, n_head=4, n_kv_head=2, ffn_hidden=96)
    assert (config.norm, config.positions, config.ffn, config.bias, config.tie_embeddings) == \
        ("rmsnorm", "rope", "swiglu", False, True)
    assert (config.head_dim, config.kv_heads, config.ffn_width, config.rope_dims, config.family) == \
        (16, 2, 96, 16, "llama")
    assert GPTConfig().family == "gpt2" and (GPTConfig().kv_heads, GPTConfig().ffn_width) == (6, 4 * 384)
    assert GPTConfig(bias=False).family == "custom" and GPTConfig(positions="rope").family == "custom"
    assert GPTConfig.llama(bias=True).bias is True  # keyword arguments win over the family's defaults


def test_config_dicts_round_trip_and_old_ones_load_as_gpt2():
    config = GPTConfig.llama(n_embd=64, n_head=4, n_kv_head=2, rotary_dims=8, tie_embeddings=False)
    assert GPTConfig.from_dict(config.to_dict()) == config
    old = {"vocab_size": 97, "block_size": 32, "n_embd": 32, "n_head": 2, "layers": "AAMM", "mlp_hidden": 0,
           "dropout": 0.0}  # a config.json written before the family fields
    assert GPTConfig.from_dict(old) == GPTConfig(**old) and GPTConfig.from_dict(old).family == "gpt2"


@pytest.mark.parametrize("kwargs, message", [
    (dict(norm="batchnorm"), "norm must be one of layernorm, rmsnorm"),
    (dict(positions="alibi"), "positions must be one of learned, rope"),
    (dict(ffn="relu"), "ffn must be one of gelu, swiglu"),
    (dict(ffn=None), "ffn must be one of"),
    (dict(n_head=4, n_kv_head=3), "n_head 4 must be divisible by n_kv_head 3"),
    (dict(n_kv_head=-1), "n_kv_head must not be negative"),
    (dict(n_kv_head=1.0), "n_kv_head must be a whole number"),
    (dict(LLAMA, rotary_dims=5), "rotary_dims 5 must be even and at most the head dim 16"),
    (dict(LLAMA, rotary_dims=18), "rotary_dims 18 must be even"),
    (dict(LLAMA, n_embd=30, n_head=2), "rotary_dims 15 must be even"),  # the whole (odd) head
    (dict(rope_theta=0), "rope_theta must be a positive number"),
    (dict(rope_theta=float("inf")), "rope_theta must be a finite number"),
    (dict(rope_theta="1e4"), "rope_theta must be a number"),
    (dict(norm_eps=-1e-5), "norm_eps must be a positive number"),
    (dict(norm_eps=True), "norm_eps must be a number"),
    (dict(bias=1), "bias must be true or false"),
    (dict(tie_embeddings="false"), "tie_embeddings must be true or false"),
    (dict(ffn_hidden=-2), "ffn_hidden must not be negative"),
])
def test_bad_family_fields_are_refused(kwargs, message):
    with pytest.raises(HybridGPTError, match=message) as info:
        smoke_config(**kwargs).validate()
    assert "\n" not in str(info.value)


def test_a_context_over_the_limit_is_refused_before_anything_is_allocated():
    from hybrid_gpt.options import MAX_CONTEXT

    with pytest.raises(HybridGPTError, match="block_size must be at most"):
        GPTConfig.llama(block_size=MAX_CONTEXT + 1).validate()
