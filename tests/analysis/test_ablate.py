import json

import pytest

from hybrid_gpt.analysis.ablate import (
    gap_curves,
    learning_curves,
    matched_hidden,
    parse_variants,
    power_lines,
    run_ablate,
    sentences,
)
from hybrid_gpt.analysis.verdict import QUALITY_TOLERANCE
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.model.gpt import GPTConfig
from hybrid_gpt.present.ablate import gap_table, power_table
from hybrid_gpt.presets import get_preset
from hybrid_gpt.stats import mean_ci

CPU = get_preset("cpu")


def _params(layers, h=0):
    return GPTConfig(vocab_size=4096, block_size=CPU["block_size"], n_embd=CPU["n_embd"], n_head=CPU["n_head"],
                     layers=layers, mlp_hidden=h).num_params()


def test_matched_hidden_gives_the_standard_models_parameter_count():
    h = matched_hidden(CPU, 4096, "AAMM")
    target = _params("AAAA")
    # The closest width: one more or one less would be further from the standard's count.
    assert abs(_params("AAMM", h) - target) <= min(abs(_params("AAMM", h + 1) - target),
                                                  abs(_params("AAMM", h - 1) - target))
    assert abs(_params("AAMM", h) - target) / target < 0.001
    assert h > CPU["n_embd"] // 4  # much wider than the tiny default


def test_variants_parse_and_refuse_nonsense():
    vs = parse_variants(["AAAA", "aamm", "AAMM:64", "AAMM:matched", "AA"], CPU, 4096)
    assert [v.slug for v in vs] == ["AAAA", "AAMM", "AAMM-h64", f"AAMM-h{matched_hidden(CPU, 4096, 'AAMM')}", "AA"]
    for bad, msg in (["AAXM"], "layer pattern"), (["AANN:64"], "no M block"), (["AAMM", "AAMM"], "repeats"), \
                    (["AAAA:matched"], "no M block"), (["AAMM:-3"], "layer pattern"):
        with pytest.raises(HybridGPTError, match=msg):
            parse_variants(bad, CPU, 4096)


def test_ablate_trains_every_variant_and_seed_then_reports(smoke_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run / "data", run_dir / "data")
    result = run_ablate(run_dir=run_dir, preset="smoke", patterns=["AA", "AM", "AN"], seeds=[1, 2], steps=4,
                        device="cpu", bench_repeats=1)
    out = run_dir / "ablate"
    assert json.loads((out / "ablate.json").read_text()) == json.loads(json.dumps(result))
    assert [e["spec"] for e in result["variants"]] == ["AA", "AM", "AN"]
    for e in result["variants"]:
        assert e["val_bpb"]["n"] == 2 and e["val_bpb"]["ci95"] is not None and e["decode_tok_s"] > 0
        assert e["steps"] == 4 and len(e["checkpoints"]) == 2
    kv = {e["spec"]: e["kv_bytes_per_token"] for e in result["variants"]}
    assert kv["AA"] == 2 * kv["AM"] and kv["AN"] == kv["AM"]
    md = (out / "ablate.md").read_text()
    assert md.startswith("## ") and "ablate-pareto.png" in md and "Ranked by mean bits per byte" in md
    assert (out / "ablate-pareto.png").read_bytes()[:4] == b"\x89PNG"
    # 4 steps: an evaluation after every step (the interval is n // CURVE_POINTS, at least 1), both seeds; the
    # last is the final evaluation, on more tokens, kept apart from the curve.
    for e in result["variants"]:
        curve = result["curves"][e["slug"]]
        assert curve["steps"] == [1, 2, 3] and curve["n"] == [2] * 3 and all(curve["ci95"])
        assert curve["final"]["step"] == 4 and curve["final"]["mean"] == e["val_bpb"]["mean"]
    assert "ablate-curves.png" in md and (out / "ablate-curves.png").read_bytes()[:4] == b"\x89PNG"
    # A second call finds every run complete and trains nothing.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/model.safetensors")}
    again = run_ablate(run_dir=run_dir, preset="smoke", patterns=["AA", "AM", "AN"], seeds=[1, 2], steps=4,
                       device="cpu", bench_repeats=1)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/model.safetensors")} == stamps
    assert [e["val_bpb"] for e in again["variants"]] == [e["val_bpb"] for e in result["variants"]]


def test_time_budget_gives_cheaper_variants_more_steps(smoke_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run / "data", run_dir / "data")
    result = run_ablate(run_dir=run_dir, preset="smoke", patterns=["AAAA", "A"], seeds=[1], steps=3,
                        budget="time", device="cpu", bench_repeats=1)
    cal = result["calibration"]
    assert cal["steps"]["AAAA"] == 3 and cal["reference"] == "AAAA"
    rates = cal["tokens_per_sec"]
    assert cal["steps"]["A"] == max(1, round(3 * rates["A"] / rates["AAAA"]))
    assert (run_dir / "ablate" / "calibration-3.json").is_file()


def test_sentences_answer_the_default_questions():
    def variant(spec, values):
        from hybrid_gpt.stats import mean_ci

        return {"spec": spec, "layers": spec.split(":")[0], "val_bpb": mean_ci(values), "decode_tok_s": 100.0,
                "mlp_hidden": 32, "parameters": 1000}

    result = {"variants": [variant("AAAA", [2.30, 2.31, 2.29]), variant("AAMM", [2.31, 2.32, 2.30]),
                           variant("AANN", [2.31, 2.32, 2.305]), variant("AA", [2.60, 2.61, 2.62])],
              "decode": {"context": 128}}
    text = "\n".join(sentences(result))
    assert "What the per-token MLP adds over dropping the attention" in text
    assert "AAMM - AANN" in text and "within noise" in text
    assert "AA - AAMM = +0.3000" in text and "AA is measurably worse" in text
    assert "MMAA" not in text  # absent variants are not judged


def _fake_run(path, evals: dict[int, float], final: tuple[int, float] | None = None):
    """A run directory holding only metrics.jsonl: training records, periodic evaluations at the given steps and
    a final one on more tokens."""
    path.mkdir(parents=True)
    last = max([*evals, final[0] if final else 0])
    lines = [{"step": s, "loss": 3.0, "elapsed": float(s)} for s in range(1, last + 1)]
    lines += [{"step": s, "val_loss": 2.0, "val_bpb": b, "val_tokens": 100} for s, b in evals.items()]
    if final:
        lines.append({"step": final[0], "val_loss": 2.0, "val_bpb": final[1], "val_tokens": 400})
    path.joinpath("metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in sorted(lines, key=lambda m:
                                                                                            m["step"])))
    return path


def test_learning_curves_mean_and_interval_per_step(tmp_path):
    runs = {"AAAA": {1: _fake_run(tmp_path / "a1", {10: 3.0, 20: 2.5, 30: 2.0}, final=(40, 2.1)),
                     2: _fake_run(tmp_path / "a2", {10: 3.2, 20: 2.7, 30: 2.2}, final=(40, 2.3))},
            # an older run with fewer evaluations still gives the points it has
            "AA": {1: _fake_run(tmp_path / "b1", {15: 3.1, 30: 2.6}), 2: _fake_run(tmp_path / "b2", {30: 2.8})}}
    curves = learning_curves(runs)
    a = curves["AAAA"]
    assert a["steps"] == [10, 20, 30] and a["n"] == [2, 2, 2]
    assert a["mean"] == pytest.approx([3.1, 2.6, 2.1])
    for ci, values in zip(a["ci95"], ([3.0, 3.2], [2.5, 2.7], [2.0, 2.2])):
        assert ci == pytest.approx(mean_ci(values)["ci95"])  # t with 1 degree of freedom: 12.706 * 0.1
        assert ci[1] - ci[0] == pytest.approx(2 * 12.706205 * 0.1)
    assert a["final"] == {"step": 40, "mean": pytest.approx(2.2), "ci95": pytest.approx(mean_ci([2.1, 2.3])["ci95"]),
                          "n": 2}  # on more tokens: a point apart, not the curve's
    b = curves["AA"]
    assert b["steps"] == [15, 30] and b["n"] == [1, 2] and b["ci95"][0] is None
    assert b["mean"] == pytest.approx([3.1, 2.7]) and b["final"] is None


def test_gap_curves_pair_seeds_at_each_step_and_mark_a_clear_gap(tmp_path):
    """AA - AAAA per step, paired by seed: at step 10 within noise, at step 30 clear of the tolerance; a step only
    one pattern reached is left out, and the final evaluation (other tokens) is not a point."""
    runs = {"AAAA": {1: _fake_run(tmp_path / "a1", {10: 3.0, 30: 2.00, 40: 1.9}, final=(40, 1.9)),
                     2: _fake_run(tmp_path / "a2", {10: 3.2, 30: 2.20}, final=(30, 2.2))},
            "AA": {1: _fake_run(tmp_path / "b1", {10: 3.01, 30: 2.10}), 2: _fake_run(tmp_path / "b2", {10: 3.18,
                                                                                                  30: 2.31})}}
    variants = [{"spec": "AAAA", "slug": "AAAA", "layers": "AAAA"}, {"spec": "AA", "slug": "AA", "layers": "AA"}]
    (gap,) = gap_curves(runs, variants, tokens_per_step=100)
    assert (gap["other"], gap["base"]) == ("AA", "AAAA") and "depth" in gap["question"]
    assert [p["step"] for p in gap["points"]] == [10, 30] and [p["tokens"] for p in gap["points"]] == [1000, 3000]
    early, late = gap["points"]
    assert early["difference"]["mean"] == pytest.approx(-0.005) and not early["clear"]
    assert late["difference"]["mean"] == pytest.approx(0.105) and late["tolerance"] == pytest.approx(0.021)
    assert late["difference"]["ci95"] == pytest.approx(mean_ci([0.10, 0.11])["ci95"]) and late["clear"]
    table = "\n".join(gap_table([gap]))
    assert "1,000 tokens" in table and "**clear**" in table and table.count("**clear**") == 1


def test_power_lines_from_constructed_numbers():
    def variant(spec, values):
        return {"spec": spec, "layers": spec, "val_bpb": mean_ci(values)}

    base = [2.00, 2.02, 1.98]
    diffs = [0.005, 0.015, 0.010]  # AAMM - AAAA per seed: sd 0.005, half-width 4.303 * 0.005 / sqrt(3) = 0.0124
    result = {"variants": [variant("AAAA", base), variant("AAMM", [b + d for b, d in zip(base, diffs)]),
                           variant("AA", [2.3, 2.3001, 2.2999])]}
    power = {(p["other"], p["base"]): p for p in power_lines(result)}
    assert set(power) == {("AAMM", "AAAA"), ("AA", "AAMM"), ("AA", "AAAA")}  # questions with both patterns present
    p = power[("AAMM", "AAAA")]
    assert p["difference"]["mean"] == pytest.approx(0.01)
    assert p["half_width"] == pytest.approx(4.302653 * 0.005 / 3 ** 0.5)
    assert p["tolerance"] == pytest.approx(QUALITY_TOLERANCE * 2.0)  # 0.02
    assert not p["decided"]  # [-0.0024, +0.0224] straddles 0.02, the verdict's "cannot be told"
    # at 80% power, the fewest n with (t(0.975, n-1) + t(0.8, n-1)) * 0.005 / sqrt(n) <= 0.02 - 0.01: n = 5 gives
    # 0.0083, n = 4 gives 0.0104
    assert p["seeds_needed"] == 5
    table = "\n".join(power_table(list(power.values()), 3))
    assert "| AAMM - AAAA | +0.0100 ± 0.0124 | 0.0124 | 0.0200 | no | 5 |" in table
    one = power_lines({"variants": [variant("AAAA", [2.0]), variant("AAMM", [2.1])]})[0]
    assert one["half_width"] is None and one["seeds_needed"] is None and not one["decided"]
    assert "unknown (one seed has no spread)" in "\n".join(power_table([one], 1))
