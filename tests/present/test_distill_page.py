"""Attention distillation's page from a small fixed distill.json, with a measurable and an unmeasurable quality
kept."""

import json

from hybrid_gpt.present.distill import QualityKept, quality_sentences, render_distill_markdown, write_outputs

PHASE = {"phase": "teacher (pretrain)", "steps": 10, "tokens_per_step": 1024}


def _arm(label, layers, bpb):
    return {"label": label, "layers": layers, "bpb": bpb, "loss": bpb * 0.7, "parameters": 12345, "eval_tokens": 4096,
            "compute": {"phases": [PHASE], "tokens": 10240, "approx_flops": 1.5e12}}


ROW = {"block": 3, "var_target": 0.5, "mse_zero": 0.6, "mse_before": 0.55, "mse_after": 0.2, "fve_zero": -0.2,
       "fve_before": -0.1, "fve_after": 0.6, "held_out_tokens": 2048, "train_mse": [0.5, 0.4, 0.3],
       "val_curve": [{"step": 0, "mse": 0.55}, {"step": 3, "mse": 0.2}]}
RESULT = {"checkpoint": "runs/x/pretrain-standard", "teacher_layers": "AAAA", "layers": "AAMA", "drop_layers": "AANA",
          "distilled_blocks": [3],
          "settings": {"mlp_hidden": 32, "steps": 3, "batch_size": 4, "block_size": 64, "lr": 1e-3, "device": "cpu",
                       "threads": 2},
          "distillation": {"layers": [ROW]}, "finetune": {"steps": 5},
          "arms": {"teacher": _arm("teacher", "AAAA", 2.0), "distilled": _arm("distilled", "AAMA", 2.1),
                   "drop": _arm("attention-drop", "AANA", 2.3),
                   "distilled_finetuned": _arm("distilled + fine-tune", "AAMA", 2.05),
                   "drop_finetuned": _arm("attention-drop + fine-tune", "AANA", 2.1)},
          "scratch": {"checkpoint": None, "note": "no runs/x/pretrain-hybrid"},
          "decode": {"new_tokens": 32, "context": 64, "repeats": 5,
                     "tok_s": {"teacher": {"median": 1000, "min": 900, "max": 1100},
                               "distilled": {"median": 1200, "min": 1100, "max": 1300}},
                     "ratios": {"teacher": {"ratio": 1.0, "ci95": None},
                                "distilled": {"ratio": 1.2, "ci95": [1.1, 1.3]}}},
          "checkpoints": {"distilled": "runs/x/distill-AAMA/distilled"},
          "plots": {"mse": "distill-mse.png", "bpb": "distill-bpb.png"}}
KEPT = QualityKept({"teacher": 1.0, "distilled": 2 / 3, "drop": 0.0, "distilled_finetuned": 0.5,
                    "drop_finetuned": 0.25}, "")


def test_the_page_has_each_section_and_table():
    lines = render_distill_markdown(RESULT, KEPT).splitlines()
    assert lines[0] == "## Attention distillation: AAAA -> AAMA"
    assert "| 3 | 0.5 | 0.6 | 0.55 | 0.2 | -10.0% | 60.0% |" in lines
    assert "| distilled | AAMA | 2.1000 | 1.4700 | 66.7% | 10,240 | 1.50e+12 | 12,345 |" in lines
    assert "- attention-drop: teacher (pretrain): 10 steps x 1,024 tokens" in lines
    assert "| distilled | AAMA | 1,200 (1,100-1,300) | 1.20x [1.10, 1.30] |" in lines
    assert lines[-1] == "Checkpoints: `runs/x/distill-AAMA/distilled`."


def test_the_sentences_say_what_is_kept_or_why_it_cannot_be_said():
    assert quality_sentences(RESULT, KEPT) == (
        "Before any fine-tune the distilled model keeps 66.7% of the teacher's quality (0.1000 bits per byte higher "
        "than the teacher; 0.2000 bits per byte lower than the attention-drop). After the same 5-step fine-tune it "
        "keeps 50.0% and attention-drop 25.0%: the distilled model ends 0.0500 bits per byte lower than the "
        "attention-drop + fine-tune, with the same fine-tune budget. No from-scratch model to compare: no "
        "runs/x/pretrain-hybrid.")
    noisy = quality_sentences(RESULT, QualityKept({}, "quality kept is not measurable: noise"))
    assert noisy.startswith("Before any fine-tune the distilled model is 0.1000 bits per byte higher than the teacher "
                            "(0.2000 bits per byte lower than the attention-drop); quality kept is not measurable: "
                            "noise. After the same 5-step fine-tune the distilled model ends")
    unknown = render_distill_markdown(RESULT, QualityKept({}, ""))
    assert "| teacher | AAAA | 2.0000 | 1.4000 | not measurable |" in unknown


def test_write_outputs(tmp_path):
    write_outputs(RESULT, tmp_path, KEPT)
    assert json.loads((tmp_path / "distill.json").read_text()) == RESULT
    assert (tmp_path / "distill.md").read_text() == render_distill_markdown(RESULT, KEPT)
    assert all((tmp_path / p).stat().st_size > 1000 for p in RESULT["plots"].values())
