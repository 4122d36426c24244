"""The staticness map's page from a small fixed static.json: its sentence, its tables and its files."""

import json

from hybrid_gpt.present.static import best_per_token, label, map_sentence, render_markdown, write_outputs

FIT = {"params": 1234, "best_epoch": 2.5, "epochs": 4.0, "stopped_early": True, "seconds": 12.0,
       "curve": [{"epoch": 0.5, "r2_stop": 0.2}, {"epoch": 1.0, "r2_stop": 0.4}]}
MAP = {"checkpoint": "runs/x/base", "pattern": "AAAA", "eval_tokens": 4096, "context": 256, "fit_tokens": 8192,
       "stop_tokens": 1024, "widths": [16], "short_context": None, "complete": True, "elapsed_s": 600.0,
       "layers": [{"layer": n, "r2": {"zero": -0.5, "constant": 0.0, "linear": r, "mlp16": r + 0.1},
                   "fits": {"mlp16": FIT}} for n, r in ((1, 0.1), (2, 0.3), (3, 0.5), (4, 0.6))]}


def test_the_sentence_names_the_deep_layers_and_the_best_predictor():
    assert best_per_token(MAP["layers"][3]) == 0.7
    assert map_sentence(MAP) == (
        "In layers 3-4, the best per-token predictor fitted (ridge and MLPs up to width 16) explains at most 70% "
        "of an attention layer's output (layer 4; 65% on average), on 4,096 held-out tokens at context 256: what "
        "a per-token replacement of these layers can be expected to keep.")
    assert map_sentence({"layers": []}) == "The staticness map has no finished layer yet."


def test_the_page_has_the_r2_table_and_the_fits():
    lines = render_markdown(MAP).splitlines()
    assert lines[0] == "# Staticness map: how much of each attention layer's output is a per-token function"
    assert "| layer | zero (drop) | constant (training mean) | linear (ridge) | MLP, width 16 |" in lines
    assert "| 2 | -0.500 | 0.000 | 0.300 | 0.400 |" in lines
    assert "| 4 | MLP, width 16 | 1,234 | 2.5 | 4.0 | yes | 12 |" in lines
    assert lines[-1] == "Wall time of the fits and captures: 10 min."
    assert label("mlp64") == "MLP, width 64" and "Unfinished" in render_markdown({**MAP, "complete": False})


def test_write_outputs_writes_the_json_the_page_and_the_plots(tmp_path):
    plots = ["static-r2.png", "static-curves.png"]
    assert write_outputs(MAP, tmp_path) == plots
    assert json.loads((tmp_path / "static.json").read_text()) == {**MAP, "plots": plots}
    assert (tmp_path / "static.md").read_text() == render_markdown(MAP)
    assert all((tmp_path / p).stat().st_size > 1000 for p in plots)
