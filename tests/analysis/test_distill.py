import dataclasses
import json
import logging

import pytest
import torch
from helpers import smoke_model

from hybrid_gpt.analysis.distill import (
    DistillConfig,
    distill_layers,
    finetune,
    judge_quality_kept,
    plan_layers,
    run_distill,
    transplant,
)
from hybrid_gpt.checkpoint import load_checkpoint
from hybrid_gpt.data.tokens import TokenData
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.present.distill import render_distill_markdown
from hybrid_gpt.train.evaluate import evaluate_lm


def test_plan_layers_distills_a_to_m_and_drops_n():
    assert plan_layers("AAAA", " aamm ") == ("AAMM", [2, 3])
    assert plan_layers("AAAA", "MANM") == ("MANM", [0, 3])
    assert plan_layers("AAMM", "AMNM") == ("AMNM", [1])  # teacher's own M blocks are kept (or dropped)


@pytest.mark.parametrize("teacher, target, match", [
    ("AAAA", "AAM", "has 3 letters but the teacher's pattern AAAA has 4"),
    ("AAAA", "AAXM", "has letters 'X'; use only A"),
    ("AAAA", "", "must be non-empty"),
    ("AAMM", "AAAM", "block 3 has a per-token MLP .M. in the teacher .AAMM. and cannot become attention"),
    ("AANA", "AAMA", "block 3 has no mixer .N. in the teacher"),
    ("AAAA", "AAAA", "nothing to distill"),
    ("AAAA", "AANN", "nothing to distill"),
])
def test_bad_patterns_are_refused_with_a_clear_error(teacher, target, match):
    with pytest.raises(HybridGPTError, match=match):
        plan_layers(teacher, target)


def test_transplant_copies_every_shared_tensor_bit_identically():
    teacher = smoke_model("AAAA")
    student = transplant(teacher, "AMNA", seed=3)
    theirs = teacher.state_dict()
    for name, p in student.state_dict().items():
        if name.startswith("transformer.h.1.mixer."):  # the new TokenMLP
            continue
        assert torch.equal(p, theirs[name]), name
    assert student.transformer.h[2].mixer is None and student.transformer.h[2].ln_1 is None
    # The new mixer is GPT's own seeded initialisation, not the teacher's tensors and not the caller's RNG.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    again = transplant(teacher, "AMNA", seed=3)
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(again.transformer.h[1].mixer.c_fc.weight, student.transformer.h[1].mixer.c_fc.weight)


def test_distillation_lowers_the_held_out_mse_of_every_replaced_layer(smoke_run):
    data = TokenData.open(smoke_run / "data")
    teacher = smoke_model("AAAA", vocab_size=data.tokenizer.vocab_size)
    student = transplant(teacher, "AMAM", seed=0)
    untouched = {k: v.clone() for k, v in student.state_dict().items()
                 if not k.startswith(("transformer.h.1.ln_1", "transformer.h.1.mixer",
                                      "transformer.h.3.ln_1", "transformer.h.3.mixer"))}
    rows = distill_layers(teacher, student, [1, 3], data, steps=40, lr=3e-3, batch_size=8, seed=0,
                          mse_tokens=1024, progress=False)
    assert [r["block"] for r in rows] == [2, 4]
    for r in rows:
        assert r["mse_after"] < 0.8 * r["mse_before"], r
        assert r["fve_after"] > r["fve_before"]
        assert len(r["train_mse"]) == 40 and r["val_curve"][-1]["mse"] == pytest.approx(r["mse_after"])
    for k, v in student.state_dict().items():  # only the students were trained
        if k in untouched:
            assert torch.equal(v, untouched[k]), k


def test_run_distill_writes_results_and_loadable_checkpoints(pretrained, tmp_path):
    ckpt = pretrained / "pretrain-standard"
    out = tmp_path / "distill"
    with pytest.raises(HybridGPTError, match="nothing to distill"):
        run_distill(ckpt, DistillConfig(layers="AA", out_dir=out), progress=False)
    with pytest.raises(HybridGPTError, match="nothing to distill"):  # the config's fields as keywords
        run_distill(ckpt, layers="AA", out_dir=out, progress=False)
    assert not out.exists()

    cfg = DistillConfig(layers="am", out_dir=out, steps=8, batch_size=4, mse_tokens=512, eval_tokens=1024,
                        decode_repeats=1)
    kw = dict(progress=False)
    result = run_distill(ckpt, dataclasses.replace(cfg, finetune_steps=3), **kw)
    for name in ("distill.json", "distill.md", "distill-mse.png", "distill-bpb.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "distill.json").read_text())
    assert saved == json.loads(json.dumps(result))
    md = (out / "distill.md").read_text()
    assert md.startswith("## ") and "distill-mse.png" in md and "distill-bpb.png" in md
    assert render_distill_markdown(saved, judge_quality_kept(saved)) == md

    arms = result["arms"]
    assert set(arms) == {"teacher", "distilled", "drop", "distilled_finetuned", "drop_finetuned", "scratch"}
    assert result["drop_layers"] == "AN" and arms["scratch"]["layers"] == "AM"
    assert arms["teacher"]["quality_kept"] == 1 and arms["drop"]["quality_kept"] == 0
    # The fair control: both fine-tunes cost the same, and the distilled arm also paid for its distillation.
    cost = {k: a["compute"]["tokens"] for k, a in arms.items()}
    assert cost["distilled_finetuned"] - cost["distilled"] == cost["drop_finetuned"] - cost["drop"] == 3 * 4 * 32
    assert cost["distilled"] - cost["teacher"] == 8 * 4 * 32 and cost["teacher"] > 0
    assert set(result["decode"]["tok_s"]) == {"teacher", "distilled", "drop"}
    assert result["out_dir"] == str(out) and result["layers"] == "AM"
    assert all(s["n"] == 1 and s["median"] > 0 for s in result["decode"]["tok_s"].values())
    # Speedups are the paired ratios to the teacher (its own is exactly 1), shown in the markdown as such.
    from hybrid_gpt.stats import format_ratio

    ratios = result["decode"]["ratios"]
    assert set(ratios) == {"teacher", "distilled", "drop"} and ratios["teacher"]["ratio"] == 1.0
    assert result["decode"]["speedup_vs_teacher"] == {k: r["ratio"] for k, r in ratios.items()}
    assert all(r["n"] == 1 and r["ci95"] is None for r in ratios.values())  # one repeat: no interval
    assert f"| {format_ratio(ratios['distilled'])} |" in md

    teacher, tok, _ = load_checkpoint(ckpt)
    model, _, training = load_checkpoint(out / "distilled")
    assert model.config.layers == "AM" and training["stage"] == "distill"
    theirs = teacher.state_dict()
    for name, p in model.state_dict().items():
        if not name.startswith(("transformer.h.1.ln_1", "transformer.h.1.mixer")):
            assert torch.equal(p, theirs[name]), name
    assert not torch.equal(model.transformer.h[1].ln_1.weight, teacher.transformer.h[1].ln_1.weight)
    data = TokenData.open(pretrained / "data")  # the saved model is the one that was evaluated
    assert evaluate_lm(model, data.val, tok.token_byte_lengths(), 1024)["bpb"] == pytest.approx(
        arms["distilled"]["bpb"], abs=1e-6)
    for name in ("distilled-finetuned", "drop-finetuned"):
        assert load_checkpoint(out / name)[0].config.layers == {"distilled-finetuned": "AM"}.get(name, "AN")

    with pytest.raises(HybridGPTError, match="--overwrite"):
        run_distill(ckpt, dataclasses.replace(cfg, finetune_steps=0), **kw)
    again = run_distill(ckpt, dataclasses.replace(cfg, finetune_steps=0, overwrite=True), **kw)
    assert "distilled_finetuned" not in again["arms"] and not (out / "distilled-finetuned").exists()
    assert (out / "distilled").is_dir()


def test_distillation_reads_a_validation_split_shorter_than_one_context(smoke_run):
    data = TokenData.open(smoke_run / "data")
    T = 32
    short = dataclasses.replace(data, val=data.val[:20])
    teacher = smoke_model("AAAA", vocab_size=data.tokenizer.vocab_size)
    assert teacher.config.block_size == T
    rows = distill_layers(teacher, transplant(teacher, "AAAM", seed=0), [3], short, steps=2, lr=1e-3,
                          batch_size=4, seed=0, mse_tokens=1024, progress=False)
    assert rows[0]["held_out_tokens"] == 19  # one window of every token that has a successor


def test_settings_default_to_the_teachers_preset_and_are_checked(caplog):
    cfg = DistillConfig(layers="AAMM", steps=7).resolved("smoke")
    assert cfg.steps == 7 and cfg.finetune_steps == 10 and cfg.batch_size == 8  # smoke's, except what was given
    caplog.set_level(logging.INFO, logger="hybrid_gpt")
    assert DistillConfig(layers="AAMM").resolved("giant").steps == 300 and "cpu" in caplog.messages[0]
    for bad in (dict(steps=0), dict(lr=float("nan")), dict(finetune_steps=-1), dict(mlp_hidden=0),
                dict(decode_repeats=0)):
        with pytest.raises(HybridGPTError, match=f"distill {next(iter(bad))} must") as info:
            DistillConfig(layers="AAMM", **bad).resolved("cpu")
        assert "--" not in str(info.value)


def test_finetune_is_the_shared_loop_continuing_the_teachers_stream(smoke_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = TokenData.open(smoke_run / "data")
    a = smoke_model("AM", vocab_size=data.tokenizer.vocab_size)
    b = smoke_model("AM", vocab_size=data.tokenizer.vocab_size)
    losses = finetune(a, data, steps=3, lr=1e-3, batch_size=4, seed=1, first_step=5, progress=False)
    assert len(losses) == 3 and losses == finetune(b, data, steps=3, lr=1e-3, batch_size=4, seed=1, first_step=5,
                                                   progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())) and not a.training
    c = smoke_model("AM", vocab_size=data.tokenizer.vocab_size)
    assert finetune(c, data, steps=3, lr=1e-3, batch_size=4, seed=1, first_step=6, progress=False) != losses
    assert list(tmp_path.iterdir()) == []  # in memory


def test_the_distill_command_passes_its_options_through(pretrained, tmp_path, capsys):
    from hybrid_gpt.cli import main

    out = tmp_path / "cli-distill"
    assert main(["distill", str(pretrained / "pretrain-standard"), "--layers", "am", "--steps", "2",
                 "--finetune-steps", "0", "--batch-size", "4", "--eval-tokens", "512", "--seed", "3",
                 "--out", str(out), "--no-progress"]) == 0
    saved = json.loads((out / "distill.json").read_text())
    s = saved["settings"]
    assert (saved["layers"], s["steps"], s["finetune_steps"], s["batch_size"], s["seed"]) == ("AM", 2, 0, 4, 3)
    assert s["lr"] == 1e-2 and saved["arms"]["teacher"]["eval_tokens"] == 512  # unset: the preset's; set: used
    assert f"results: {out / 'distill.md'}" in capsys.readouterr().out
