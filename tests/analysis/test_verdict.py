import json
import shutil

import pytest
from helpers import quiet

from hybrid_gpt.analysis.stats import mean_ci
from hybrid_gpt.analysis.verdict import render_verdict_markdown, sentences, table, write_verdict
from hybrid_gpt.errors import HybridGPTError


def _ablate(bpb: dict, tok_s: dict) -> dict:
    return {"path": "ablate/ablate.json", "data": {
        "decode": {"context": 128},
        "variants": [{"spec": k, "layers": k, "parameters": 1000, "kv_bytes_per_token": 1024 if k == "AAAA" else 512,
                      "val_bpb": mean_ci(v), "decode_tok_s": tok_s[k]} for k, v in bpb.items()]}}


def test_the_verdict_follows_the_numbers():
    tok = {"AAAA": 1000.0, "AAMM": 1500.0, "AANN": 1600.0}
    holds = {"ablate": _ablate({"AAAA": [2.30, 2.31, 2.29], "AAMM": [2.301, 2.311, 2.291],
                                "AANN": [2.40, 2.41, 2.40]}, tok)}
    text = "\n".join(sentences(holds))
    assert "the hypothesis holds —" in text and "The per-token MLP earns its place" in text

    worse = {"ablate": _ablate({"AAAA": [2.30, 2.31, 2.29], "AAMM": [2.50, 2.51, 2.50],
                                "AANN": [2.40, 2.41, 2.40]}, {**tok, "AAMM": 1050.0})}
    text = "\n".join(sentences(worse))
    assert "little loss of quality does not hold" in text and "the hypothesis does not hold" in text
    assert "worse than nothing" in text

    noisy = {"ablate": _ablate({"AAAA": [2.30, 2.50, 2.10], "AAMM": [2.35, 2.30, 2.40],
                                "AANN": [2.36, 2.31, 2.39]}, tok)}
    text = "\n".join(sentences(noisy))
    assert "cannot be told at this noise" in text and "adds nothing measurable" in text

    assert "No verdict" in sentences({"probe": {"path": "p", "data": {"patterns": [], "chance": 0.1}}})[-1]


def test_the_table_joins_ablation_and_probe_by_pattern():
    found = {"ablate": _ablate({"AAAA": [2.3, 2.31], "AAMM": [2.32, 2.33]}, {"AAAA": 100.0, "AAMM": 150.0}),
             "probe": {"path": "probe/probe.json", "data": {
                 "chance": 0.0625, "settings": {"task": "recall"},
                 "patterns": [{"pattern": "AAMM", "accuracy": mean_ci([0.9, 0.8])},
                              {"pattern": "MMMM", "accuracy": mean_ci([0.1, 0.1])}]}}}
    rows = {r["pattern"]: r for r in table(found)}
    assert rows["AAMM"]["probe_accuracy"]["mean"] == pytest.approx(0.85) and rows["AAAA"]["probe_accuracy"] is None
    assert rows["AAMM"]["decode_vs_standard"] == 1.5 and rows["MMMM"]["val_bpb"] is None
    md = render_verdict_markdown({"sources": {"ablate": "ablate/ablate.json"}, "table": table(found),
                                  "sentences": sentences(found)})
    assert md.startswith("## Does the hypothesis hold?") and "| MMMM |" in md and "1.50x" in md


def test_write_verdict_needs_some_analysis(tmp_path):
    with pytest.raises(HybridGPTError, match="no analyses"):
        write_verdict(tmp_path)


def test_pipeline_hypothesis_tests_end_to_end_on_smoke(pretrained, tmp_path):
    from hybrid_gpt.pipeline import run_hypothesis_tests

    run_dir = tmp_path / "run"
    shutil.copytree(pretrained, run_dir)
    result = run_hypothesis_tests(run_dir, "smoke", device="cpu", log=quiet)
    assert set(result["sources"]) == {"ablate", "probe", "importance", "distill"}
    md = (run_dir / "hypothesis.md").read_text()
    for heading in ("## Does the hypothesis hold?", "## Ablations", "Verdict at this budget"):
        assert heading in md
    # Every plot the combined page links exists where the link points.
    import re

    for link in re.findall(r"\]\(([^)]+\.png)\)", md):
        assert (run_dir / link).is_file(), link
    assert json.loads((run_dir / "hypothesis.json").read_text())["sentences"] == result["sentences"]
