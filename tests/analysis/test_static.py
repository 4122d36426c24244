"""The staticness map on a tiny random Llama-family checkpoint: capture, the predictors' R^2 on known cases, the
MLP's early stop, resume, the written results and the command's one-line errors."""

import json

import numpy as np
import pytest
import torch
from helpers import LLAMA, run_bad, smoke_model

from hybrid_gpt.analysis.static import (
    R2,
    Linear,
    StaticConfig,
    capture,
    capture_plan,
    fit_mlp,
    load_fit,
    load_layer,
    run_static,
    score,
)
from hybrid_gpt.checkpoint import save_checkpoint
from hybrid_gpt.data.tokens import TokenData
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.model.gpt import mixer_activations
from hybrid_gpt.present.static import map_sentence, render_markdown
from hybrid_gpt.train.evaluate import windows

BLOCK = 64
TINY = dict(context=32, train_tokens=4096, stop_tokens=1024, eval_tokens=1024, widths=[8, 16], short_context=16,
            max_epochs=3, batch_tokens=256)


def tiny_llama(vocab_size: int, layers: str = "AAA", seed: int = 0):
    return smoke_model(layers, seed=seed, vocab_size=vocab_size, block_size=BLOCK, n_kv_head=1, **LLAMA)


@pytest.fixture(scope="module")
def ckpt(smoke_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("static")
    data = TokenData.open(smoke_run / "data")
    save_checkpoint(root / "base", tiny_llama(data.tokenizer.vocab_size), data.tokenizer,
                    {"stage": "import", "data_dir": str(smoke_run / "data")})
    return root / "base"


def test_r2_of_a_known_linear_map_is_near_one_and_of_the_training_mean_near_zero():
    gen = torch.Generator().manual_seed(0)
    x, x_test = torch.randn(4000, 12, generator=gen), torch.randn(2000, 12, generator=gen)
    w, b = torch.randn(12, 6, generator=gen), torch.randn(6, generator=gen)
    y, y_test = x @ w + b + 0.01 * torch.randn(4000, 6, generator=gen), x_test @ w + b
    linear = Linear(12, 6)
    for i in range(0, 4000, 1000):  # streamed in chunks: the same fit as all at once
        linear.add(x[i:i + 1000], y[i:i + 1000])
    linear.solve(1e-6)
    assert torch.allclose(linear.weight.float(), w, atol=1e-2) and score(linear, x_test, y_test) > 0.999
    mean = y.mean(0)
    assert abs(score(lambda u: mean.expand(len(u), -1), x_test, y_test)) < 0.01
    assert score(lambda u: torch.zeros(len(u), 6), x_test, y_test) < 0  # dropping: worse than the mean


def test_r2_accumulates_over_chunks_exactly():
    gen = torch.Generator().manual_seed(1)
    y, p = torch.randn(100, 4, generator=gen).double(), torch.randn(100, 4, generator=gen).double()
    whole, parts = R2(), R2()
    whole.add(y, p)
    for i in range(0, 100, 7):
        parts.add(y[i:i + 7], p[i:i + 7])
    expected = 1 - ((y - p) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert whole.value == pytest.approx(expected.item(), rel=1e-9) and parts.value == pytest.approx(whole.value)


def test_the_mlp_stops_early_when_the_stopping_slice_stops_improving():
    """Noise to fit: the stopping slice's MSE cannot improve for long, so the fit stops before its epoch cap and
    keeps its best evaluation's weights."""
    from hybrid_gpt.model.gpt import GPTConfig

    gen = torch.Generator().manual_seed(2)
    config = GPTConfig(vocab_size=11, block_size=8, n_embd=8, n_head=2, layers="A", ffn="swiglu", norm="rmsnorm",
                       positions="rope", bias=False)
    data = {"fit": (torch.randn(512, 8, generator=gen), torch.randn(512, 8, generator=gen)),
            "stop": (torch.randn(256, 8, generator=gen), torch.randn(256, 8, generator=gen))}
    cfg = StaticConfig(lr=3e-2, batch_tokens=32, max_epochs=200, patience=2)
    model, record = fit_mlp(config, 64, data, cfg, progress=False)
    assert record["stopped_early"] and record["epochs"] < 200
    assert record["best_step"] == min(record["curve"], key=lambda p: p["mse"])["step"]
    best = min(p["mse"] for p in record["curve"])
    from hybrid_gpt.analysis.static import mse

    assert mse(model, *data["stop"]) == pytest.approx(best, rel=1e-5)  # the best weights are put back


def test_capture_stores_the_mixer_input_and_output_of_the_model_s_own_forward(ckpt, tmp_path):
    from hybrid_gpt.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(ckpt)
    data = TokenData.open(json.loads((ckpt / "config.json").read_text())["training"]["data_dir"])
    capture(model, data.val, 3, 16, [0, 2], tmp_path / "cap", progress=False)
    u, a = load_layer(tmp_path / "cap", 2)
    assert u.dtype == torch.float16 and u.shape == (48, model.config.n_embd)
    chunk = next(windows(data.val, 16, 48, 3, spread=True))
    acts = mixer_activations(model, chunk[:, :-1], [2], normed=True)[2]
    block = model.transformer.h[2]
    assert torch.allclose(u.float(), acts[0].reshape(-1, u.shape[1]), atol=2e-3, rtol=2e-3)
    x = mixer_activations(model, chunk[:, :-1], [2])[2][0]  # the residual stream: ln_1 of it is the input
    assert torch.allclose(block.ln_1(x).reshape(-1, u.shape[1]), acts[0].reshape(-1, u.shape[1]), atol=1e-5)
    assert torch.allclose(a.float(), acts[1].reshape(-1, u.shape[1]), atol=2e-3, rtol=2e-3)
    assert json.loads((tmp_path / "cap" / "done.json").read_text())["blocks"] == [1, 3]


def test_spread_windows_cover_the_whole_split_without_overlap():
    tokens = np.arange(1000, dtype=np.uint16)
    starts = [int(w[0, 0]) for w in windows(tokens, 50, 150, 1, spread=True)]
    assert starts[0] == 0 and starts[-1] == 1000 - 1 - 50 and all(b - a >= 50 for a, b in zip(starts, starts[1:]))
    assert [int(w[0, 0]) for w in windows(tokens, 50, 150, 1)] == [0, 50, 100]  # tiling by default


def test_the_plan_keeps_the_stopping_slice_apart_and_refuses_too_little_text():
    plan = capture_plan(StaticConfig(train_tokens=8192, stop_tokens=2048, eval_tokens=1024), 1024, 10**6, 10**5)
    assert plan["train_windows"] == 10 and len(plan["stop_rows"]) == 2 and plan["eval_windows"] == 1
    with pytest.raises(HybridGPTError, match="lower --eval-tokens"):
        capture_plan(StaticConfig(eval_tokens=65536), 2048, 10**6, 50000)


def test_the_map_end_to_end_resumes_and_writes_its_results(ckpt, tmp_path):
    out = tmp_path / "map"
    result = run_static(ckpt, StaticConfig(out_dir=out, **TINY), progress=False)
    assert [r["layer"] for r in result["layers"]] == [1, 2, 3] and result["context"] == 32
    assert result["eval_tokens"] == 1024 and result["fit_tokens"] == 4096 and result["complete"]
    for row in result["layers"]:
        assert set(row["r2"]) == {"zero", "constant", "linear", "mlp8", "mlp16"}
        assert abs(row["r2"]["constant"]) < 0.1 and row["r2"]["linear"] > row["r2"]["constant"]
        assert "linear" in row["r2_short"]
    on_disk = json.loads((out / "static.json").read_text())
    assert on_disk["layers"][0]["r2"] == result["layers"][0]["r2"]
    assert (out / "static-r2.png").is_file() and (out / "static-curves.png").is_file()
    assert "per-token function" in (out / "static.md").read_text()
    assert "best per-token predictor" in map_sentence(result)
    fit = load_fit(load_checkpoint_config(ckpt), 8, out / "fits" / "mlp8-block2.safetensors")
    u, a = load_layer(out / "captures" / "32-eval", 1)
    assert score(fit, u, a) == pytest.approx(result["layers"][1]["r2"]["mlp8"], abs=1e-4)

    # the same options again: refused without --resume; with it, nothing is refitted
    with pytest.raises(HybridGPTError, match="--resume"):
        run_static(ckpt, StaticConfig(out_dir=out, **TINY), progress=False)
    state = (out / "state.json").read_text()
    again = run_static(ckpt, StaticConfig(out_dir=out, resume=True, **TINY), progress=False)
    assert again["layers"] == result["layers"] and (out / "state.json").read_text() == state
    with pytest.raises(HybridGPTError, match="other options"):
        run_static(ckpt, StaticConfig(out_dir=out, resume=True, **{**TINY, "ridge": 0.5}), progress=False)
    # the widths may change on resume: only the new one is fitted, and every finished one stays in the table
    more = run_static(ckpt, StaticConfig(out_dir=out, resume=True, **{**TINY, "widths": [8, 12]}),
                      progress=False)
    assert more["widths"] == [8, 12, 16] and all(set(r["r2"]) >= {"mlp8", "mlp12", "mlp16"} for r in more["layers"])
    assert all(r["r2"]["mlp16"] == old["r2"]["mlp16"] for r, old in zip(more["layers"], result["layers"]))


def test_a_map_moved_with_its_checkpoint_resumes_and_other_weights_are_refused(ckpt, smoke_run, tmp_path):
    """The state knows its inputs by digest, not path: a checkout elsewhere continues the committed map, while
    other weights or other data under the same paths are refused."""
    import shutil

    here, there = tmp_path / "here", tmp_path / "there"
    shutil.copytree(ckpt, here / "base")
    shutil.copytree(smoke_run / "data", here / "data")
    options = dict(out_dir=here / "map", data_dir=here / "data", **TINY)
    first = run_static(here / "base", StaticConfig(**options), progress=False)
    state = json.loads((here / "map" / "state.json").read_text())
    assert len(state["options"]["checkpoint_sha256"]) == 64 and len(state["options"]["data_sha256"]) == 64
    shutil.copytree(here, there)
    moved = run_static(there / "base", StaticConfig(**{**options, "out_dir": there / "map", "data_dir": there / "data",
                                                       "resume": True}), progress=False)
    assert moved["layers"] == first["layers"]
    # a state from before the digests were recorded adopts them
    del state["options"]["checkpoint_sha256"], state["options"]["data_sha256"]
    (there / "map" / "state.json").write_text(json.dumps(state))
    run_static(there / "base", StaticConfig(**{**options, "out_dir": there / "map", "data_dir": there / "data",
                                               "resume": True}), progress=False)
    assert "checkpoint_sha256" in json.loads((there / "map" / "state.json").read_text())["options"]
    data = TokenData.open(smoke_run / "data")
    save_checkpoint(there / "base", tiny_llama(data.tokenizer.vocab_size, seed=5), data.tokenizer,
                    {"stage": "import", "data_dir": str(smoke_run / "data")})
    with pytest.raises(HybridGPTError, match="other options.*checkpoint_sha256"):
        run_static(there / "base", StaticConfig(**{**options, "out_dir": there / "map", "data_dir": there / "data",
                                                   "resume": True}), progress=False)


def test_an_interrupted_map_resumes_from_its_finished_fits(ckpt, tmp_path, monkeypatch):
    from hybrid_gpt.analysis import static

    out, calls = tmp_path / "map", []
    real = static.fit_mlp

    def flaky(config, width, *args, **kw):
        calls.append(width)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(config, width, *args, **kw)

    monkeypatch.setattr(static, "fit_mlp", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_static(ckpt, StaticConfig(out_dir=out, **TINY), progress=False)
    partial = json.loads((out / "static.json").read_text())
    assert not partial["complete"] and "mlp8" in partial["layers"][2]["r2"]
    assert "mlp16" not in partial["layers"][0]["r2"]
    assert "Unfinished" in render_markdown(partial)
    calls.clear()
    run_static(ckpt, StaticConfig(out_dir=out, resume=True, **TINY), progress=False)
    assert calls == [16, 16, 16]  # only what was missing


def load_checkpoint_config(ckpt):
    from hybrid_gpt.checkpoint import read_config

    return read_config(ckpt)[0]


def test_a_checkpoint_without_attention_is_a_clear_error(smoke_run, tmp_path, capsys):
    data = TokenData.open(smoke_run / "data")
    save_checkpoint(tmp_path / "mm", tiny_llama(data.tokenizer.vocab_size, layers="MM"), data.tokenizer,
                    {"stage": "import", "data_dir": str(smoke_run / "data")})
    with pytest.raises(HybridGPTError, match="no attention layer"):
        run_static(tmp_path / "mm", StaticConfig(out_dir=tmp_path / "out", **TINY), progress=False)
    code, err = run_bad(["static", str(tmp_path / "mm"), "--out", str(tmp_path / "out"), "--context", "32"], capsys)
    assert code != 0 and "no attention layer" in err and "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--blocks", "9"], "not an attention layer"),
    (["--context", "128"], "exceeds the model's context"),
    (["--context", "32", "--short-context", "0", "--eval-tokens", "10000000"], "lower --eval-tokens"),
    (["--train-tokens", "10"], "train-tokens"),
])
def test_bad_options_are_one_line_errors_before_any_work(ckpt, tmp_path, capsys, argv, message):
    code, err = run_bad(["static", str(ckpt), "--out", str(tmp_path / "out"), *argv], capsys)
    assert code != 0 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_an_output_directory_that_is_not_a_map_is_refused(ckpt, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(HybridGPTError, match="notes.txt"):
        run_static(ckpt, StaticConfig(out_dir=out, overwrite=True, **TINY), progress=False)
    assert (out / "notes.txt").read_text() == "mine"


def test_a_fit_cut_short_by_a_signal_is_never_a_result(monkeypatch):
    """The shared loop turns Ctrl-C or SIGTERM into an interrupted result; fit_mlp must not record it as a fit."""
    from hybrid_gpt.analysis import static
    from hybrid_gpt.model.gpt import GPTConfig
    from hybrid_gpt.train.loop import TrainResult

    monkeypatch.setattr(static, "train", lambda *a, **k: TrainResult(step=3, interrupted=True, elapsed=0.1))
    config = GPTConfig(vocab_size=11, block_size=8, n_embd=8, n_head=2, layers="A", ffn="swiglu", norm="rmsnorm",
                       positions="rope", bias=False)
    data = {"fit": (torch.randn(64, 8), torch.randn(64, 8)), "stop": (torch.randn(32, 8), torch.randn(32, 8))}
    with pytest.raises(KeyboardInterrupt):
        fit_mlp(config, 4, data, StaticConfig(batch_tokens=16, max_epochs=1), progress=False)
