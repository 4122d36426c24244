"""The committed results regenerate byte for byte: each page under docs/results/ is rendered again from the JSON
(or the study's state) committed beside it and compared with the committed page. A change of wording shows here
first: regenerate the page with it, or keep the words."""

import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"
pytestmark = pytest.mark.skipif(not RESULTS.is_dir(), reason="no docs/results in this checkout")


def load(path: str) -> dict:
    return json.loads((RESULTS / path).read_text())


def test_the_staticness_map():
    from hybrid_gpt.present.static import render_markdown

    assert render_markdown(load("smollm2/static/static.json")) == (RESULTS / "smollm2/static/static.md").read_text()


def test_the_replacement_study_from_its_state():
    from hybrid_gpt.analysis.replace import summarise
    from hybrid_gpt.analysis.replace_config import ReplaceConfig
    from hybrid_gpt.present.replace import render_markdown
    from hybrid_gpt.present.static import map_sentence

    committed, state = load("smollm2/replace/replace.json"), load("smollm2/replace/state.json")
    static = load("smollm2/static/static.json")
    cfg = ReplaceConfig(**{k: v for k, v in state["options"].items() if k in ReplaceConfig.__dataclass_fields__})
    sentence = map_sentence(static)
    result = summarise(state, cfg, committed["windows"], committed["complete"]) | {
        "map_sentence": sentence, "map_r2": {str(r["layer"]): r["r2"] for r in static["layers"]},
        "out_dir": committed["out_dir"]}
    assert result == {k: v for k, v in committed.items() if k != "plots"}
    assert render_markdown(result, sentence) == (RESULTS / "smollm2/replace/replace.md").read_text()


@pytest.mark.parametrize("where", ["smollm2/importance", "cpu/hypothesis/importance/pretrain-standard"])
def test_layer_importance(where):
    from hybrid_gpt.present.importance import render_importance_markdown

    md = render_importance_markdown(load(f"{where}/importance.json"))
    assert md == (RESULTS / where / "importance.md").read_text()


def test_the_probe():
    from hybrid_gpt.present.probe import render_probe_markdown

    md = render_probe_markdown(load("cpu/study/probe/probe.json"))
    assert md == (RESULTS / "cpu/study/probe/probe.md").read_text()


@pytest.mark.parametrize("where", ["retrofit-grid", "retrofit-quick", "retrofit-quick/idle-run"])
def test_the_retrofit_study_and_its_verdict(where):
    from hybrid_gpt.analysis.retrofit import verdict
    from hybrid_gpt.present.retrofit import render_retrofit_markdown

    result = load(f"smollm2/{where}/retrofit.json")
    assert render_retrofit_markdown(result) == (RESULTS / "smollm2" / where / "retrofit.md").read_text()
    again = json.loads(json.dumps(result))
    for arm in again["arms"].values():
        del arm["quality"]
    assert verdict(again) == result["verdict"] and again["arms"] == result["arms"]
