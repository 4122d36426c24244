import json
import shutil

import pytest

from hybrid_gpt.analysis.verdict import CRITERIA, per_context, sentences, table, write_verdict
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.present.verdict import render_verdict_markdown
from hybrid_gpt.stats import mean_ci


def _ablate(bpb: dict, tok_s: dict) -> dict:
    return {"path": "ablate/ablate.json", "data": {
        "decode": {"context": 128},
        "variants": [{"spec": k, "layers": k, "parameters": 1000, "kv_bytes_per_token": 1024 if k == "AAAA" else 512,
                      "val_bpb": mean_ci(v), "decode_tok_s": tok_s[k]} for k, v in bpb.items()]}}


def _speed(points: dict, weights: bool = True, repeats: int = 5, params: int = 1000) -> list:
    """A long-context bench result: {context: (ratio, [lo, hi])} of AAMM/AAAA at batch 1 (and a batch-8 row)."""
    rows = []
    for c, (ratio, ci) in points.items():
        rows += [{"context": c, "batch": 1, "decode_speedup": ratio, "decode_speedup_ci95": ci},
                 {"context": c, "batch": 8, "decode_speedup": 9.0, "decode_speedup_ci95": [8.0, 10.0]}]
    data = {"models": {"AAAA": {"layers": "AAAA", "parameters": params}, "AAMM": {"layers": "AAMM", "parameters": 900}},
            "ratios": {"AAMM/AAAA": rows}, "config": {"repeats": repeats}}
    if weights:
        data["weights"] = "random"
    return [{"path": "speed/cpu.json", "data": data}]


TIGHT = {"AAAA": [2.30, 2.31, 2.29], "AAMM": [2.301, 2.311, 2.291], "AANN": [2.40, 2.41, 2.40]}
TOK = {"AAAA": 1000.0, "AAMM": 1500.0, "AANN": 1600.0}


def test_the_verdict_follows_the_numbers():
    holds = {"ablate": _ablate(TIGHT, TOK)}
    text = "\n".join(sentences(holds))
    assert "little loss of quality holds" in text and "The per-token MLP earns its place" in text
    # a ratio of medians without an interval cannot carry the speed criterion
    assert "a large speed gain cannot be told (no interval" in text and "the hypothesis cannot be told" in text

    worse = {"ablate": _ablate({"AAAA": [2.30, 2.31, 2.29], "AAMM": [2.50, 2.51, 2.50],
                                "AANN": [2.40, 2.41, 2.40]}, {**TOK, "AAMM": 1050.0})}
    text = "\n".join(sentences(worse))
    assert "little loss of quality does not hold" in text and "the hypothesis does not hold" in text
    assert "worse than nothing" in text

    noisy = {"ablate": _ablate({"AAAA": [2.30, 2.50, 2.10], "AAMM": [2.35, 2.30, 2.40],
                                "AANN": [2.36, 2.31, 2.39]}, TOK)}
    text = "\n".join(sentences(noisy))
    assert "cannot be told at this noise" in text and "adds nothing measurable" in text

    assert "No verdict" in sentences({"probe": {"path": "p", "data": {"patterns": [], "chance": 0.1}}})[-1]


def test_the_verdict_never_pairs_contexts():
    """Quality (measured at the ablation's context, 128) pairs only with a speed of trained weights at 128; the
    long-context speeds of random weights are shown, each row saying quality "not measured"."""
    from hybrid_gpt.analysis.verdict import NOT_MEASURED, speed_points

    long = {256: (1.05, [1.0, 1.1]), 1024: (1.3, [1.2, 1.4]), 4096: (1.4, [1.3, 1.5]), 16384: (1.7, [1.6, 1.9])}
    found = {"ablate": _ablate(TIGHT, TOK), "speed": _speed(long)}
    points = speed_points(found)
    assert [p["context"] for p in points] == [128, 256, 1024, 4096, 16384]
    assert [p["weights"] for p in points] == ["trained"] + ["random"] * 4
    ctx = per_context(found)
    assert ctx["quality"] is True and ctx["quality_context"] == 128
    for r in ctx["rows"]:
        if r["quality_context"] is not None and r["speed_context"] is not None:
            assert r["quality_context"] == r["speed_context"] and r["weights"] == "trained"
        else:
            assert r["quality"] == NOT_MEASURED and r["state"] == NOT_MEASURED
    assert [r["quality_context"] for r in ctx["rows"]] == [128, None, None, None, None]
    # the long contexts' 1.4x-1.7x never lend the verdict a speed: at 128 the ratio of medians has no interval
    assert ctx["answer"]["state"] == "cannot be told" and ctx["answer"]["context"] == 128
    assert "speed alone was measured at 256, 1,024, 4,096, 16,384 tokens" in ctx["answer"]["text"]
    md = render_verdict_markdown({"sources": {}, "table": table(found), "sentences": sentences(found),
                                  "per_context": ctx}, CRITERIA)
    assert "| 16,384 | random | not measured | not measured | 1.70x [1.60, 1.90] | - | holds | not measured |" in md
    assert "quality not measured at this context" in "\n".join(sentences(found))


def _trained_at_128(ratio: float, ci: list) -> list:
    return _speed({128: (ratio, ci), 4096: (1.9, [1.8, 2.0])}, weights=False)


def test_the_verdict_at_the_paired_context_in_each_of_its_three_states():
    found = {"ablate": _ablate(TIGHT, TOK), "speed": _trained_at_128(1.4, [1.3, 1.5])}
    ctx = per_context(found)
    assert [r["state"] for r in ctx["rows"]] == [True, "not measured"]  # trained at 4,096, but no quality there
    assert ctx["answer"]["state"] == "holds" and ctx["answer"]["context"] == 128
    assert ctx["answer"]["text"].startswith("holds at context 128")
    md = render_verdict_markdown({"sources": {}, "table": table(found), "sentences": sentences(found),
                                  "per_context": ctx}, CRITERIA)
    assert md.splitlines()[2].startswith("**The hypothesis holds at context 128")
    assert "| 128 | trained | +0.0010 ± 0.0000 | holds | 1.40x [1.30, 1.50] | - | holds | holds |" in md

    # does not hold: the quality cost's whole interval exceeds the tolerance, whatever the speed
    worse = {"ablate": _ablate({"AAAA": [2.30, 2.31, 2.29], "AAMM": [2.50, 2.51, 2.50]}, TOK),
             "speed": _trained_at_128(1.4, [1.3, 1.5])}
    ans = per_context(worse)["answer"]
    assert ans["state"] == "does not hold" and "loses more than 1%" in ans["text"]
    # does not hold: quality fine, but the speed gain at the paired context stays below the criterion
    slow = {"ablate": _ablate(TIGHT, TOK), "speed": _trained_at_128(1.1, [1.05, 1.15])}
    assert per_context(slow)["answer"]["text"].startswith("does not hold at context 128, where quality and speed")

    # cannot be told: the quality interval straddles the tolerance; the budget names the seeds that would tell
    noisy = {"ablate": _ablate({"AAAA": [2.30, 2.32, 2.28], "AAMM": [2.33, 2.32, 2.31]}, TOK),
             "speed": _trained_at_128(1.4, [1.3, 1.5])}
    ctx = per_context(noisy)
    assert ctx["quality"] is None and ctx["answer"]["state"] == "cannot be told"
    n = ctx["budget"]["seeds"]
    assert isinstance(n, int) and n > 3 and f"{n} seeds (80% power)" in ctx["answer"]["text"]
    # ... or the speed interval straddles the criterion at the paired context: the repeats that would tell
    unsure = {"ablate": _ablate(TIGHT, TOK), "speed": _trained_at_128(1.3, [1.1, 1.5])}
    ctx = per_context(unsure)
    assert ctx["answer"]["state"] == "cannot be told" and ctx["budget"]["repeats"][128] > 5
    assert "paired repeats (80% power)" in ctx["answer"]["text"]


def test_a_benchmark_of_another_shape_is_not_the_ablation_s():
    from hybrid_gpt.analysis.verdict import speed_points

    long = {256: (1.05, [1.0, 1.1]), 4096: (1.4, [1.3, 1.5])}
    # its standard has other parameters, or another preset: only the ablation's own point is left
    assert [p["source"] for p in speed_points({"ablate": _ablate(TIGHT, TOK), "speed": _speed(long, params=5)})] \
        == ["ablate/ablate.json"]
    shaped = _speed(long, params=5)
    shaped[0]["data"]["shape"] = {"preset": "cpu"}
    ablation = _ablate(TIGHT, TOK)
    ablation["data"]["preset"] = "cpu"
    assert speed_points({"ablate": ablation, "speed": shaped})[1]["source"] == "speed/cpu.json"
    ablation["data"]["preset"] = "seed"
    assert len(speed_points({"ablate": ablation, "speed": shaped})) == 1


def test_the_verdict_reads_speed_files_and_refuses_damaged_ones(tmp_path):
    (tmp_path / "ablate").mkdir()
    (tmp_path / "ablate" / "ablate.json").write_text(json.dumps(_ablate(TIGHT, TOK)["data"]))
    (tmp_path / "speed").mkdir()
    (tmp_path / "speed" / "cpu.json").write_text(json.dumps(_speed({4096: (1.6, [1.5, 1.7])})[0]["data"]))
    result = write_verdict(tmp_path)
    rows = result["per_context"]["rows"]  # the random-weight 4,096 is read and shown, never paired
    assert [(r["context"], r["quality_context"]) for r in rows] == [(128, 128), (4096, None)]
    assert result["per_context"]["answer"]["state"] == "cannot be told" and "speed:cpu" in result["sources"]
    (tmp_path / "speed" / "cpu.json").write_text(json.dumps({"models": {}, "ratios": {"a/b": [{"context": 1}]}}))
    with pytest.raises(HybridGPTError, match=r"cpu.json is damaged: .*hybrid-gpt bench"):
        write_verdict(tmp_path)


def test_the_table_joins_ablation_and_probe_by_pattern():
    found = {"ablate": _ablate({"AAAA": [2.3, 2.31], "AAMM": [2.32, 2.33]}, {"AAAA": 100.0, "AAMM": 150.0}),
             "probe": {"path": "probe/probe.json", "data": {
                 "chance": 0.0625, "settings": {"task": "recall"},
                 "patterns": [{"pattern": "AAMM", "accuracy": mean_ci([0.9, 0.8])},
                              {"pattern": "MMMM", "accuracy": mean_ci([0.1, 0.1])}]}}}
    rows = {r["pattern"]: r for r in table(found)}
    assert rows["AAMM"]["probe_accuracy"]["recall"]["mean"] == pytest.approx(0.85)
    assert rows["AAAA"]["probe_accuracy"] == {}
    assert rows["AAMM"]["decode_vs_standard"] == {"ratio": 1.5, "ci95": None} and rows["MMMM"]["val_bpb"] is None
    # the ablation's paired decode ratio against its first model (the standard) carries its interval
    found["ablate"]["data"]["decode"]["ratios"] = {"AAMM": {"ratio": 1.4, "ci95": [1.3, 1.5], "n": 5}}
    assert {r["pattern"]: r for r in table(found)}["AAMM"]["decode_vs_standard"] == {"ratio": 1.4, "ci95": [1.3, 1.5]}
    assert per_context(found)["rows"][0]["ci95"] == [1.3, 1.5]
    md = render_verdict_markdown({"sources": {"ablate": "ablate/ablate.json"}, "table": table(found),
                                  "sentences": sentences(found)}, CRITERIA)
    assert md.startswith("## Does the hypothesis hold?") and "| MMMM |" in md and "1.40x [1.30, 1.50]" in md


def test_the_probe_sentences_read_every_task_and_its_judgements():
    def entry(pattern, values, judgement):
        return {"pattern": pattern, "accuracy": mean_ci(values), "judgement": judgement}

    recall = [entry("AAAA", [1.0, 1.0, 0.271], "unstable"), entry("AAMM", [1.0, 1.0, 1.0], "learns")]
    two_hop = [entry("AAAA", [1.0, 0.998, 0.871], "learns"), entry("AAMM", [0.3, 0.33, 0.31], "does not learn"),
               entry("AA", [1.0, 0.9, 0.95], "learns")]
    data = {"chance": 0.0625, "settings": {"task": "recall"}, "patterns": recall,
            "tasks": {"recall": {"chance": 0.0625, "patterns": recall},
                      "two-hop": {"chance": 0.0625, "patterns": two_hop}}}
    found = {"ablate": _ablate(TIGHT, TOK), "probe": {"path": "probe/probe.json", "data": data}}
    text = "\n".join(sentences(found))
    assert "AAAA 0.757 (unstable: 1.000, 1.000, 0.271)" in text
    assert "AAAA itself is unstable on it" in text
    assert "AAAA learns it and AAMM cannot: here the deep attention does something (AA learn it too)." in text
    rows = {r["pattern"]: r for r in table(found)}
    assert set(rows["AAAA"]["probe_accuracy"]) == {"recall", "two-hop"} and "AA" in rows
    md = render_verdict_markdown({"sources": {}, "table": table(found), "sentences": sentences(found)}, CRITERIA)
    assert "| probe: recall | probe: two-hop |" in md and "| 0.313 ± 0.038 |" in md


def test_write_verdict_needs_some_analysis(tmp_path):
    with pytest.raises(HybridGPTError, match="no analyses"):
        write_verdict(tmp_path)


def test_pipeline_hypothesis_tests_end_to_end_on_smoke(pretrained, tmp_path):
    from hybrid_gpt.pipeline import run_hypothesis_tests

    run_dir = tmp_path / "run"
    shutil.copytree(pretrained, run_dir)
    result = run_hypothesis_tests(run_dir, "smoke", device="cpu")
    assert set(result["sources"]) == {"ablate", "probe", "importance", "distill"}
    md = (run_dir / "hypothesis.md").read_text()
    for heading in ("## Does the hypothesis hold?", "## Ablations", "Verdict: the hypothesis"):
        assert heading in md
    # Every plot the combined page links exists where the link points.
    import re

    for link in re.findall(r"\]\(([^)]+\.png)\)", md):
        assert (run_dir / link).is_file(), link
    assert json.loads((run_dir / "hypothesis.json").read_text())["sentences"] == result["sentences"]


def _bench_of(pairs: dict[str, tuple[str, str]], models: dict[str, dict]) -> dict:
    """A bench result of ``models`` whose ratio rows (batch 1, contexts 256 and 4096) are under ``pairs``'
    keys, as bench writes them for any pattern it was given."""
    rows = [{"context": c, "batch": 1, "decode_speedup": r, "decode_speedup_ci95": [r - 0.1, r + 0.1]}
            for c, r in ((256, 1.1), (4096, 1.7))]
    return {"weights": "random", "models": models, "ratios": {key: rows for key in pairs}}


@pytest.mark.parametrize("models, keys, shown", [
    ({"AAAA": {"layers": "AAAA"}, "ANNN": {"layers": "ANNN"}}, ["ANNN/AAAA"], "ANNN / AAAA"),
    ({"AMAM": {"layers": "AMAM"}, "MMMM": {"layers": "MMMM"}}, ["MMMM/AMAM"], "MMMM / AMAM"),
    ({"AAAA": {"layers": "AAAA"}, "AAMM": {"layers": "AAMM"}}, ["AAMMvsAAAA"], None),  # a key without "/"
    ({"AAAA": {"layers": "AAAA"}, "AAMM": {"layers": "AAMM"}}, ["/", "AAMM/", "a/b/c"], None),
    ({"AAAA": {"layers": "AAAA"}, "AAMM@bfloat16": {"layers": "AAMM", "dtype": "bfloat16"}},
     ["AAMM@bfloat16/AAAA"], None),  # no float32 pair to show
    ({"x/y": {"layers": "AAAA"}, "z": {"layers": "ANAN"}}, ["z/x/y"], "ANAN / AAAA"),  # names holding "/"
    ({"AAAA": {"layers": "AAAA"}, "A2": {"layers": "AAAA"}}, ["A2/AAAA"], "A2 / AAAA"),  # one pattern twice
])
def test_the_verdict_takes_a_bench_of_any_pattern_pair_and_odd_keys(tmp_path, models, keys, shown):
    (tmp_path / "ablate").mkdir()
    (tmp_path / "ablate" / "ablate.json").write_text(json.dumps(_ablate(TIGHT, TOK)["data"]))
    (tmp_path / "speed").mkdir()
    (tmp_path / "speed" / "other.json").write_text(json.dumps(_bench_of(dict.fromkeys(keys), models)))
    result = write_verdict(tmp_path)
    md = (tmp_path / "hypothesis.md").read_text()
    assert result["long_context"]["other"]["pair"] == shown
    if shown:
        assert f"other, {shown}, batch 1" in md and (tmp_path / "speed-context.png").is_file()
    else:
        assert "no speedup between two float32 models to show" in md
    # the hypothesis itself is AAMM against AAAA only: another pair never feeds it
    assert all(p["source"] == "ablate/ablate.json" for p in result["per_context"]["rows"])
