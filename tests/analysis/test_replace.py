"""The replacement study on a tiny random Llama-family checkpoint and its staticness map: the held-out windows,
arm selection that never reads the test windows, every arm and control, healing curves, seeds, resume, the
speed runs in separate processes, and the one-line errors."""

import json

import pytest
import torch
from helpers import LLAMA, run_bad, smoke_model

from hybrid_gpt.analysis import replace as rp
from hybrid_gpt.analysis.replace import ReplaceConfig, held_out_windows, matched_width, run_replace
from hybrid_gpt.analysis.static import StaticConfig, run_static
from hybrid_gpt.checkpoint import save_checkpoint
from hybrid_gpt.data.tokens import TokenData
from hybrid_gpt.errors import HybridGPTError

MAP = dict(context=32, train_tokens=4096, stop_tokens=1024, eval_tokens=1024, widths=[8], short_context=0,
           max_epochs=2, batch_tokens=256)
TINY = dict(ks=[1], width=8, heal_tokens=[32, 64], heal_context=16, eval_context=32, select_windows=2,
            test_windows=4, similarity_tokens=256, passkey_contexts=[200], passkey_trials=2, passkey_floor=0.0,
            speed_runs=0, speed_repeats=1, decode_tokens=4)


@pytest.fixture(scope="module")
def mapped(smoke_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("replace")
    data = TokenData.open(smoke_run / "data")
    model = smoke_model("AAA", seed=3, vocab_size=data.tokenizer.vocab_size, block_size=256, n_kv_head=1, **LLAMA)
    save_checkpoint(root / "base", model, data.tokenizer, {"stage": "import", "data_dir": str(smoke_run / "data")})
    run_static(root / "base", StaticConfig(out_dir=root / "static", **MAP), progress=False)
    return root / "base"


def test_held_out_windows_are_spread_and_disjoint():
    w = held_out_windows(100_000, 2048, 8, 16)
    assert len(w["select"]) == 8 and len(w["test"]) == 16
    starts = sorted(w["select"] + w["test"])
    assert starts[0] == 0 and starts[-1] == 100_000 - 1 - 2048
    assert all(b - a >= 2048 for a, b in zip(starts, starts[1:]))
    assert not set(w["select"]) & set(w["test"])
    assert min(w["select"]) > 0 and max(w["select"]) < starts[-1]  # dealt through the split, not its ends
    with pytest.raises(HybridGPTError, match="lower --select-windows"):
        held_out_windows(10_000, 2048, 8, 16)


def test_the_matched_width_has_as_many_parameters_as_the_attention_block():
    model = smoke_model("AAA", vocab_size=64, n_kv_head=1, **LLAMA)
    attention = model.transformer.h[0].mixer
    width = matched_width(model.config, attention)
    from dataclasses import replace

    from hybrid_gpt.model.gpt import TokenMLP

    def params(w):
        return sum(p.numel() for p in TokenMLP(replace(model.config, mlp_hidden=w)).parameters())

    target = sum(p.numel() for p in attention.parameters())
    assert abs(params(width) - target) <= (params(2) - params(1)) / 2


def test_the_study_end_to_end(mapped, tmp_path, monkeypatch):
    """Every arm and control, the healing curves, the seeds; and the choice of layers made before any test
    window is read."""
    out = tmp_path / "study"
    reads, choices_made = [], []
    real_score, real_put = rp.score_windows, rp.RunState.put

    def score(model, tokens, byte_lengths, starts, context):
        reads.append(("choice made" if choices_made else "before", tuple(starts)))
        return real_score(model, tokens, byte_lengths, starts, context)

    def put(self, key, value, elapsed):
        if key.startswith("choice-"):
            choices_made.append(key)
        return real_put(self, key, value, elapsed)

    monkeypatch.setattr(rp, "score_windows", score)
    monkeypatch.setattr(rp.RunState, "put", put)
    result = run_replace(mapped, ReplaceConfig(out_dir=out, **TINY), progress=False)
    windows = result["windows"]
    test = tuple(windows["test"])
    # the full model's own scores come first; after that, until the choice, only the selection slice is read
    first_arm = next(i for i, (_, s) in enumerate(reads) if i > 0 and s == tuple(windows["select"])
                     and reads[i - 1][1] == test)
    assert all(s != test for when, s in reads[first_arm:] if when == "before")
    assert choices_made == ["choice-k1"] and any(when == "choice made" and s == test for when, s in reads)

    arms = {a["name"]: a for a in result["arms"]}
    chosen = result["ks"][0]["choice"]
    other = next(c for c in ("deepest", "importance") if c != chosen)
    expected = {f"{chosen}-k1-{k}" for k in ("drop", "constant", "linear", "distil", "matched", "drop-heal")}
    expected |= {f"{chosen}-k1-distil-heal-seed{s}" for s in (1337, 1338)} | {f"{other}-k1-distil"}
    assert set(arms) == expected
    assert result["ks"][0]["select_bpb"][chosen] <= result["ks"][0]["select_bpb"][other]
    assert arms[f"{chosen}-k1-matched"]["width"] != 8 and arms[f"{chosen}-k1-distil"]["width"] == 8
    # the healing curve starts where the unhealed arm is, and drop + heal goes on to the matched-compute point
    drop, healed = arms[f"{chosen}-k1-drop"], arms[f"{chosen}-k1-drop-heal"]
    assert healed["curve"][0]["tokens"] == 0 and healed["curve"][0]["test_bpb"] == pytest.approx(drop["test_bpb"])
    seeded = arms[f"{chosen}-k1-distil-heal-seed1337"]
    assert [p["tokens"] for p in seeded["curve"]] == [0, 32, 64]
    assert [p["tokens"] for p in healed["curve"]][:3] == [0, 32, 64] and healed["curve"][-1]["tokens"] > 64
    assert seeded["test_bpb"] == pytest.approx(seeded["curve"][-1]["test_bpb"])
    assert healed["test_bpb"] == pytest.approx(healed["curve"][2]["test_bpb"])  # reported at the same budget
    # seed 1337 is the map's own fit; seed 1338 was fitted here, on the map's captures
    fits = sorted(p.name for p in (out / "fits").glob("*.safetensors"))
    assert any("seed1338" in f for f in fits) and not any("mlp8" in f and "seed1337" in f for f in fits)
    k = result["ks"][0]
    assert k["seeds"] == [1337, 1338] and k["distil_heal"]["seeds"] == 2 and k["quality"] in (
        "holds", "does not hold", "cannot be told")
    assert seeded["passkey"][0]["n"] == 2 and arms[f"{chosen}-k1-constant"]["passkey"] is None
    on_disk = json.loads((out / "replace.json").read_text())
    assert on_disk["arms"] == json.loads(json.dumps(result["arms"]))
    md = (out / "replace.md").read_text()
    assert "k = 1" in md and "Healing curves" in md and (out / "replace-curves-k1.png").is_file()


def test_an_interrupted_study_resumes_from_its_finished_arms(mapped, tmp_path, monkeypatch):
    out, calls, raised = tmp_path / "study", [], []
    real = rp.heal

    def flaky(model, teacher, data, cfg, steps, seed, *args, **kw):
        calls.append(seed)
        if len(calls) == 2 and not raised:
            raised.append(seed)
            raise KeyboardInterrupt
        return real(model, teacher, data, cfg, steps, seed, *args, **kw)

    monkeypatch.setattr(rp, "heal", flaky)
    cfg = dict(TINY, choices=["deepest"], passkey_kinds=["matched"])
    with pytest.raises(KeyboardInterrupt):
        run_replace(mapped, ReplaceConfig(out_dir=out, **cfg), progress=False)
    partial = json.loads((out / "replace.json").read_text())
    assert not partial["complete"] and any(a["kind"] == "distil+heal" for a in partial["arms"])
    calls.clear()
    done = run_replace(mapped, ReplaceConfig(out_dir=out, resume=True, **cfg), progress=False)
    assert calls == [1338, 1337]  # the second seed's healing, then drop + heal: nothing finished is redone
    assert done["complete"] and len([a for a in done["arms"] if a["kind"] == "distil+heal"]) == 2
    with pytest.raises(HybridGPTError, match="other options"):
        run_replace(mapped, ReplaceConfig(out_dir=out, resume=True, **{**cfg, "heal_lr": 1e-3}),
                    progress=False)


def test_speed_runs_in_separate_processes(mapped, tmp_path):
    cfg = dict(TINY, choices=["deepest"], passkey_kinds=["matched"], heal_tokens=[16], speed_runs=2, speed_repeats=2)
    result = run_replace(mapped, ReplaceConfig(out_dir=tmp_path / "s", **cfg), progress=False)
    speed = result["speed"]["shapes"]["k1-M8"]
    assert len(speed["runs"]) == 2 and speed["pooled"]["n"] == 2
    assert speed["spread"][0] <= speed["pooled"]["ratio"] <= speed["spread"][1]
    assert all(r["decode"]["ratio"] > 0 and r["context"] == 32 for r in speed["runs"])
    control = result["speed"]["shapes"]["full-copy"]  # the A/A control: the full pattern, rebuilt like the shapes
    assert control["predicted"] == pytest.approx(1.0) and len(control["runs"]) == 2
    assert result["ks"][0]["speed_state"] in ("holds", "does not hold", "cannot be told")
    assert "Speed at the same context" in (tmp_path / "s" / "replace.md").read_text()


def test_the_linear_control_is_the_map_s_ridge_fit(mapped, tmp_path):
    from hybrid_gpt.analysis.importance import swapped_mixers
    from hybrid_gpt.checkpoint import load_checkpoint

    source = rp.MapSource.open(mapped.parent / "static", mapped)
    mean, linear = rp.closed_form(*source.fit(2), source.recipe.ridge)
    model, _, _ = load_checkpoint(mapped)
    x = torch.randn(5, model.config.n_embd)
    mixer = rp.LinearMixer(linear.weight, linear.bias)
    assert torch.allclose(mixer(x), linear(x).float(), atol=1e-5)
    with swapped_mixers(model, {2: mixer}):
        assert model.transformer.h[2].mixer is mixer
    assert model.transformer.h[2].mixer is not mixer and mean.shape == (model.config.n_embd,)


@pytest.mark.parametrize("argv, message", [
    (["--map", "NOWHERE"], "no staticness map"),
    (["--ks", "4"], "the model has 3 attention layers"),
    (["--passkey-contexts", "252"], "leaves no room for the answer"),
    (["--eval-context", "512"], "exceeds the model's context"),
    (["--test-windows", "9000", "--eval-context", "200"], "lower --select-windows"),
    (["--passkey-contexts", "8"], "leaves 0 for the filler"),
])
def test_bad_options_are_one_line_errors_before_any_work(mapped, tmp_path, capsys, argv, message):
    argv = [str(tmp_path / a) if a == "NOWHERE" else a for a in argv]
    code, err = run_bad(["replace", str(mapped), "--out", str(tmp_path / "out"), "--eval-context", "32",
                         "--heal-context", "16", "--ks", "1", "--width", "8", "--passkey-contexts", "200",
                         "--select-windows", "2", "--test-windows", "4", *argv], capsys)
    assert code != 0 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_map_of_another_checkpoint_is_refused(mapped, smoke_run, tmp_path):
    data = TokenData.open(smoke_run / "data")
    other = tmp_path / "other"
    save_checkpoint(other, smoke_model("AAA", seed=4, vocab_size=data.tokenizer.vocab_size, block_size=256,
                                       n_kv_head=1, **LLAMA), data.tokenizer,
                    {"stage": "import", "data_dir": str(smoke_run / "data")})
    with pytest.raises(HybridGPTError, match="not .*other"):
        run_replace(other, ReplaceConfig(out_dir=tmp_path / "o", map_dir=mapped.parent / "static", **TINY),
                    progress=False)


def test_a_shape_added_on_resume_is_pooled_over_the_runs_that_have_it():
    run = {"decode": {"ratio": 1.1, "ci95": [1.0, 1.2]}, "predicted": 1.05}
    speed = {"shapes": {"full": "AA", "k1-M8": "AM", "full-copy": "AA"},
             "runs": [{"shapes": {"k1-M8": run}}, {"shapes": {"k1-M8": run, "full-copy": run}}]}
    shapes = rp.speed_summary(speed)["shapes"]
    assert shapes["k1-M8"]["pooled"]["n"] == 2 and shapes["full-copy"]["pooled"]["n"] == 1
