"""kernels.py: the oneDNN linear layer must compute what F.linear computes, forward and backward."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import rerun_tests, smoke_config

from hybrid_gpt.model import kernels
from hybrid_gpt.model.gpt import GPT

pytestmark = pytest.mark.skipif(not kernels.onednn_enabled(), reason="this PyTorch has no working oneDNN")


@pytest.fixture
def always_onednn(monkeypatch):
    """Route even the smoke sizes' tiny products through oneDNN (normally they stay on F.linear)."""
    monkeypatch.setattr(kernels, "MIN_FLOPS", 0)
    monkeypatch.setattr(kernels, "MIN_WEIGHT_BYTES", 0)


@contextlib.contextmanager
def onednn_off():
    """Linear layers on F.linear for the duration, as HYBRID_GPT_ONEDNN=0 makes them for a process."""
    kernels.set_enabled(False)
    try:
        yield
    finally:
        kernels.set_enabled(None)


def _calls(monkeypatch) -> list:
    calls = []
    real = kernels._product
    monkeypatch.setattr(kernels, "_product", lambda *a: calls.append(a[1].shape) or real(*a))
    return calls


@pytest.mark.parametrize("shape", [(7, 24), (2, 5, 24), (1, 1, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_f_linear(always_onednn, monkeypatch, shape, bias):
    torch.manual_seed(0)
    layer = kernels.Linear(24, 40, bias=bias)
    x = torch.randn(*shape)
    calls = _calls(monkeypatch)
    with torch.no_grad():
        got = layer(x)
    assert calls, "the oneDNN path was not taken"
    assert got.shape == (*shape[:-1], 40)
    torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_non_contiguous_input(always_onednn):
    torch.manual_seed(0)
    layer = kernels.Linear(24, 40)
    x = torch.randn(3, 6, 24)[:, ::2]  # strided rows
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frozen", ["none", "weight", "input"])
@pytest.mark.parametrize("n_in,n_out", [(24, 40), (40, 24)])  # both ways of forming the weight gradient
def test_gradients_equal_f_linear(always_onednn, monkeypatch, frozen, n_in, n_out):
    torch.manual_seed(0)
    w = torch.randn(n_out, n_in, requires_grad=frozen != "weight")
    b = torch.randn(n_out, requires_grad=frozen != "weight")
    x = torch.randn(2, 9, n_in, requires_grad=frozen != "input")
    g = torch.randn(2, 9, n_out)
    ours = [t for t in (x, w, b) if t.requires_grad]
    calls = _calls(monkeypatch)
    got = torch.autograd.grad(kernels.linear(x, w, b), ours, g)
    assert len(calls) >= 2, "forward and backward should both run on oneDNN"
    expected = torch.autograd.grad(F.linear(x, w, b), ours, g)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_packed_weight_follows_updates_and_copies(always_onednn):
    torch.manual_seed(0)
    layer = kernels.Linear(24, 40)
    x = torch.randn(4, 24)
    with torch.no_grad():
        first = layer(x)
        packed = layer.packed.packed
        assert packed is not None
        layer(x)
        assert layer.packed.packed is packed, "an unchanged weight is packed once"
        layer.weight.mul_(2.0)  # in place, as an optimizer step or load_state_dict does
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(layer(x), first)
        clone = copy.deepcopy(layer)
        assert clone.packed.packed is None
        clone.weight.zero_()
        torch.testing.assert_close(clone(x), clone.bias.expand(4, 40))
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_bfloat16(always_onednn):
    torch.manual_seed(0)
    layer = kernels.Linear(24, 40).to(torch.bfloat16)
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    with torch.inference_mode():
        got = layer(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), F.linear(x, layer.weight, layer.bias).float(), rtol=2e-2, atol=2e-2)


def test_falls_back_to_f_linear(always_onednn, monkeypatch):
    torch.manual_seed(0)
    layer = kernels.Linear(24, 40)
    calls = _calls(monkeypatch)
    x64 = torch.randn(3, 24, dtype=torch.float64)
    assert torch.equal(kernels.linear(x64, layer.weight.double(), layer.bias.double()),
                       F.linear(x64, layer.weight.double(), layer.bias.double()))
    assert torch.equal(layer(torch.randn(0, 24)), torch.empty(0, 40))
    with onednn_off():
        assert not kernels.onednn_enabled()
        x = torch.randn(3, 24)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        assert calls == []
    assert kernels.onednn_enabled()


@pytest.mark.parametrize("value,expected", [("0", False), (" 0 ", False), ("1", True), ("", True)])
def test_environment_switch_is_read_once(monkeypatch, value, expected):
    monkeypatch.setenv(kernels.ENV_SWITCH, value)
    kernels.set_enabled(None)  # as at the start of a process: the next product reads the environment
    try:
        assert kernels.onednn_enabled() is expected
        monkeypatch.setenv(kernels.ENV_SWITCH, "1" if value == "0" else "0")
        assert kernels.onednn_enabled() is expected, "read once per process, not on every product"
    finally:
        monkeypatch.delenv(kernels.ENV_SWITCH)
        kernels.set_enabled(None)


def test_small_products_stay_on_f_linear(monkeypatch):
    layer = kernels.Linear(24, 40)  # 4 KB of weight, a few kFLOP: below both thresholds
    calls = _calls(monkeypatch)
    with torch.no_grad():
        layer(torch.randn(2, 24))
    assert calls == []


def test_model_trains_and_decodes_the_same_on_both_paths(always_onednn, monkeypatch):
    """A whole GPT: logits, loss and every gradient agree with the F.linear model's; state dict unchanged."""
    torch.manual_seed(0)
    model = GPT(smoke_config("AAMM"))
    reference = copy.deepcopy(model)
    assert list(model.state_dict()) == list(reference.state_dict())
    idx = torch.randint(0, 97, (3, 16))
    targets = torch.randint(0, 97, (3, 16))
    calls = _calls(monkeypatch)
    _, loss = model(idx, targets)
    loss.backward()
    assert calls, "the model's products should run on oneDNN"
    calls.clear()
    with onednn_off():
        _, ref_loss = reference(idx, targets)
        ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.inference_mode():
        got = model.eval()(idx)
    with onednn_off(), torch.inference_mode():
        expected = reference.eval()(idx)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == 17, "one forward of the oneDNN model (16 block products and the head), none of the reference"


def test_inference_tensor_weight_stays_on_f_linear(always_onednn, monkeypatch):
    """A weight made inside inference mode has no version counter: no packed copy that could go stale."""
    with torch.inference_mode():
        layer = kernels.Linear(24, 40)
        x = torch.randn(3, 24)
        calls = _calls(monkeypatch)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert calls == []


def test_self_test_leaves_the_global_random_state_alone(monkeypatch):
    monkeypatch.setattr(kernels, "_available", None)  # force the self-test to run again
    monkeypatch.setattr(kernels, "_enabled", None)
    state = torch.get_rng_state()
    assert kernels.onednn_enabled()
    assert torch.equal(torch.get_rng_state(), state)


def test_self_test_checks_bfloat16_apart_from_float32(always_onednn, monkeypatch):
    """A oneDNN product that is wrong (or missing) in bfloat16 sends bfloat16 layers to F.linear only."""
    real = kernels._product

    def wrong_in_bfloat16(x, weight, bias):
        y = real(x, weight, bias)
        return y * 2 if x.dtype == torch.bfloat16 else y

    monkeypatch.setattr(kernels, "_product", wrong_in_bfloat16)
    monkeypatch.setattr(kernels, "_available", None)  # force the self-test to run again
    monkeypatch.setattr(kernels, "_enabled", None)
    assert kernels.onednn_enabled() and kernels._works() == {torch.float32}
    assert "bfloat16 on F.linear" in kernels.backend_name()
    calls = _calls(monkeypatch)
    torch.manual_seed(0)
    layer = kernels.Linear(24, 40)
    x = torch.randn(5, 24)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        assert len(calls) == 1
        layer16, x16 = copy.deepcopy(layer).to(torch.bfloat16), x.to(torch.bfloat16)
        assert torch.equal(layer16(x16), F.linear(x16, layer16.weight, layer16.bias))
        assert len(calls) == 1


def test_core_model_and_engine_tests_pass_with_onednn_off():
    """The F.linear fallback must not rot: the model's and the engine's tests again, in a process
    with HYBRID_GPT_ONEDNN=0, which must really have been off there."""
    rerun_tests(["tests/model/test_gpt.py", "tests/infer/test_engine.py"], {kernels.ENV_SWITCH: "0"},
                "not kernels.onednn_enabled() and kernels.backend_name() == 'PyTorch default (F.linear)'", timeout=300)
