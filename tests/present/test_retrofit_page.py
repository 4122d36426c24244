"""The retrofit study's verdict sentences from small fixed groups, and its page's key lines from a committed
retrofit.json (a whole study's result: a hand-made one would be most of this file)."""

import json
from pathlib import Path

import pytest

from hybrid_gpt.present.retrofit import (
    answer_sentence,
    group_sentence,
    plural,
    render_retrofit_markdown,
    rule_sentence,
    speed_text,
    write_outputs,
    write_plots,
)

QUICK = Path(__file__).resolve().parents[2] / "docs" / "results" / "smollm2" / "retrofit-quick" / "retrofit.json"
SPEED = [{"context": 512, "ratio": 1.1, "ci95": [1.0, 1.2]}, {"context": 2048, "ratio": None}]


def _group(largest, undecided=None, speed=SPEED):
    return {"choice": "deepest", "kind": "distil+heal", "largest_k": largest, "largest_k_undecided": undecided,
            "speed": speed, "states": [{"k": 2, "quality": "holds"}, {"k": 4, "quality": "cannot be told"}]}


def test_the_group_sentences():
    assert speed_text(SPEED) == "1.10x [1.00, 1.20] at 512"
    assert group_sentence(_group(2, 4)) == ("deepest, distil+heal: quality holds up to k = 2 (k = 4 cannot be told); "
                                            "its decode speed against the full model: 1.10x [1.00, 1.20] at 512")
    assert group_sentence(_group(2, speed=[])).endswith("against the full model: not measured")
    assert group_sentence(_group(None)) == ("deepest, distil+heal: quality holds at no k measured (k = 2 holds, "
                                            "k = 4 cannot be told)")


def test_the_answer_and_the_rule():
    assert answer_sentence([], None, 30) == "no k above 0 was measured: there is nothing to judge"
    assert answer_sentence([_group(None, 4)], None, 30) == ("no arm keeps its quality cost within the tolerance at "
                                                            "any k measured (some cannot be told at this noise)")
    assert answer_sentence([_group(2), {**_group(1), "kind": "drop"}], 2, 30) == (
        "the largest k whose quality cost stays within the tolerance is 2 of 30 attention layers, by deepest "
        "distil+heal (decode speedup 1.10x [1.00, 1.20] at 512)")
    assert rule_sentence(16, 0.0156, 0.01, 1.25) == (
        "quality holds when the whole 95% interval (t over the 16 held-out windows, paired by window) of arm - full "
        "bits per byte lies at or below 1% of the full model's (0.0156); it does not hold when the whole interval "
        "lies above; between, it cannot be told. A large speed gain: the decode speedup's interval (paired repeats) "
        "above 1.25x.")
    assert plural(1, "trial") == "1 trial" and plural(2048, "window") == "2,048 windows"


@pytest.mark.skipif(not QUICK.is_file(), reason="no committed retrofit result in this checkout")
def test_the_page_of_a_committed_study(tmp_path):
    result = json.loads(QUICK.read_text())
    lines = render_retrofit_markdown(result).splitlines()
    assert lines[0] == "## Retrofit: base (30 attention layers)"
    assert lines[6] == ("**No arm keeps its quality cost within the tolerance at any k measured.** quality holds when "
                        "the whole 95% interval (t over the 4 held-out windows, paired by window) of arm - full bits "
                        "per byte lies at or below 1% of the full model's (0.0154); it does not hold when the whole "
                        "interval lies above; between, it cannot be told. A large speed gain: the decode speedup's "
                        "interval (paired repeats) above 1.25x.")
    full = "| full | 0 | - | 1.5399 | - | reference | 1.000 | 0.0000 | 100.0% | 100.0% | 1.00x | 1.00x | 0 | 0 |"
    assert full in lines
    assert "| full | 30 | float32 | 2,048 | 1 | 90.0 | 6849.5 | 1.00x | 1.00x | 15.5 | 1.00x | 1.00x |" in lines
    assert "| full | none | 0 | 0 | 0 | 0.00e+00 |" in lines and "| full | 100.0% | 100.0% |" in lines
    assert [line for line in lines if line.startswith("### ")] == [
        "### Verdict", "### Every arm", "### Passkey retrieval", "### Greedy answers", "### Speed", "### Compute",
        "### Layer choices", "### Time"]
    assert write_plots(result, tmp_path) == result["plots"]
    write_outputs(result, tmp_path)
    assert json.loads((tmp_path / "retrofit.json").read_text()) == result
    assert (tmp_path / "retrofit.md").read_text() == render_retrofit_markdown(result)
