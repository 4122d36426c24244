"""The replacement study's page from a small fixed replace.json: the sentence per k, the arms' table, the healing
curves, the speed table and the map's check of the distilled MLPs."""

import json

from hybrid_gpt.present.replace import k_sentence, render_markdown, write_outputs

D = {"mean": 0.02, "ci95": [0.01, 0.03]}
CURVE = [{"tokens": 0, "delta_bpb": {"mean": 0.05, "ci95": [0.04, 0.06]}},
         {"tokens": 5120, "delta_bpb": {"mean": 0.02, "ci95": [0.01, 0.03]}}]
ARMS = [{"name": "deepest-k2-distil", "k": 2, "choice": "deepest", "kind": "distil", "layers": [3, 4], "seed": None,
         "mixer_params": 1000, "test_bpb": 1.52, "delta_bpb": {"mean": 0.02, "ci95": None}, "quality": "does not hold",
         "passkey": None},
        {"name": "deepest-k2-distil-heal-s1", "k": 2, "choice": "deepest", "kind": "distil+heal", "layers": [3, 4],
         "seed": 1, "mixer_params": 1000, "test_bpb": 1.51, "delta_bpb": D, "quality": "cannot be told",
         "passkey": [{"context": 64, "correct": 3, "n": 4}], "curve": CURVE}]
SPEED = {"runs": 2, "shapes": {"k2-M": {"runs": [{"decode": {"ratio": 1.1, "ci95": [1.0, 1.2]}},
                                                  {"decode": {"ratio": 1.2, "ci95": None}}],
                                         "spread": [1.1, 1.2], "pooled": {"ratio": 1.15, "ci95": [1.05, 1.25], "n": 2},
                                         "predicted": 1.08}}}
RESULT = {"options": {"checkpoint": "runs/x/base", "map": "runs/x/static", "seeds": [1], "width": 16,
                      "decode_tokens": 24},
          "complete": True, "elapsed_s": 120.0, "eval_context": 128, "select_tokens": 256, "test_tokens": 512,
          "tolerance_bpb": 0.015, "full": {"test_bpb": 1.5, "select_bpb": 1.6, "passkey": None},
          "arms": ARMS, "speed": SPEED, "map_r2": {"3": {"mlp16": 0.5, "linear": 0.4, "constant": 0.0},
                                                  "4": {"mlp16": 0.3, "linear": 0.4, "constant": 0.0}},
          "ks": [{"k": 2, "choice": "deepest", "select_bpb": {"deepest": 1.61}, "seeds": [1], "distil_heal": D,
                  "quality": "cannot be told", "speed": {**SPEED["shapes"]["k2-M"]}}]}


def test_the_sentence_per_k():
    assert k_sentence(RESULT["ks"][0], RESULT) == (
        "k = 2 (deepest layers): distilled + healed costs +0.0200 [+0.0100, +0.0300] bits per byte against the full "
        "model on 512 test tokens (1 seed; tolerance 0.0150): quality cannot be told; decode at 128 tokens 1.15x "
        "[1.05, 1.25] over 2 separate runs (runs 1.10x-1.20x; cost model 1.08x).")
    assert k_sentence({"k": 4, "choice": None}, RESULT) == "k = 4 (not chosen yet layers): not measured yet."


def test_the_page_has_every_table():
    lines = render_markdown(RESULT, "the map's sentence").splitlines()
    assert lines[0] == "# Replacing attention at a real budget" and "- the map's sentence" in lines
    assert "Choice of layers (selection slice, distilled arm): deepest 1.6100 -> **deepest**." in lines
    assert ("| deepest-k2-distil-heal-s1 | distilled MLP + heal | 3, 4 | 1,000 | 1.5100 | +0.0200 [+0.0100, +0.0300] "
            "| cannot be told | 3/4 at 64 |") in lines
    assert "| deepest-k2-distil | distilled MLP | 3, 4 | 1,000 | 1.5200 | +0.0200 | does not hold | - |" in lines
    assert "| deepest-k2-distil-heal-s1 | +0.0500 ± 0.0100 | +0.0200 ± 0.0100 |" in lines
    assert "| k2-M | 1.10x [1.00, 1.20]; 1.20x | 1.10x-1.20x | 1.15x [1.05, 1.25] | 1.08x |" in lines
    beats = next(line for line in lines if line.startswith("The distilled MLPs"))
    assert beats.endswith("**Layer 4: the distilled MLP does not beat the linear or the constant predictor.**")
    assert lines[-1] == "Wall time so far: 2 min."


def test_an_unfinished_study_says_so():
    md = render_markdown({**RESULT, "complete": False, "full": None})
    assert md.splitlines()[2].startswith("**Unfinished:**") and "Nothing has finished yet." in md


def test_write_outputs_writes_the_json_the_page_and_a_plot_per_k_with_curves(tmp_path):
    assert write_outputs(RESULT, tmp_path, "s") == ["replace-curves-k2.png"]
    assert json.loads((tmp_path / "replace.json").read_text())["plots"] == ["replace-curves-k2.png"]
    assert (tmp_path / "replace.md").read_text() == render_markdown(RESULT, "s")
