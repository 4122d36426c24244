import itertools

import pytest
import torch
from helpers import smoke_config, smoke_model

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
    (dict(layers=""), "non-empty"),
    (dict(layers="aamm"), "letters 'am'"),  # the config holds the normal form; parse_layers makes it
    (dict(n_embd=30, n_head=4), "n_embd 30 must be divisible by n_head 4"),
    (dict(vocab_size=0), "positive"),
    (dict(block_size="64"), "integer"),
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


def test_mixer_activations_are_each_blocks_input_and_mixer_output():
    model = smoke_model("AMNA")
    idx = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    acts = mixer_activations(model, idx, [3, 0, 1])
    assert sorted(acts) == [0, 1, 3]
    # The same computation spelled out: embeddings, then each block in turn.
    h = model.transformer
    x = h.wte(idx) + h.wpe(torch.arange(16))
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
