"""The whole pipeline on the smoke preset: every stage, the report and its figures, and resumption."""

import json

import pytest

from hybrid_gpt.cli import main

FIGURES = ["pretrain_val_loss", "pretrain_val_bpb", "dpo_val_loss", "dpo_val_bpb", "sft_val_loss",
           "dpo_val_rewards/accuracies", "dpo_val_rewards/margins", "dpo_val_preference_loss",
           "parameters", "kv_bytes_per_token",
           "pretrain_train_seconds", "pretrain_train_tokens_per_sec"]


@pytest.fixture(scope="module")
def pipeline_run(smoke_run, tmp_path_factory):
    import shutil

    run_dir = tmp_path_factory.mktemp("pipeline")
    shutil.copytree(smoke_run / "data", run_dir / "data")  # the same data a fresh prepare would write
    argv = ["pipeline", "--preset", "smoke", "--run-dir", str(run_dir), "--seeds", "1,2", "--contexts", "16,32",
            "--new-tokens", "4", "--repeats", "1", "--batch-sizes", "1,2"]
    assert main(argv) == 0
    return run_dir, argv


def test_pipeline_writes_every_stage_and_the_report(pipeline_run, capsys):
    run_dir, _ = pipeline_run
    for seed in (1, 2):
        for stage in ("pretrain", "sft", "dpo"):
            for mt in ("standard", "hybrid"):
                config = json.loads((run_dir / f"seed-{seed}" / f"{stage}-{mt}" / "config.json").read_text())
                assert config["training"]["complete"] and config["training"]["train_config"]["seed"] == seed
    results = json.loads((run_dir / "results.json").read_text())
    for mt in ("standard", "hybrid"):
        for seed in ("1", "2"):
            figures = results["per_seed"][mt][seed]
            assert all(figures[k] is not None for k in FIGURES)
            assert figures["dpo_val_loss"] > 2 and figures["dpo_val_preference_loss"] < 1  # never mixed up
            margins = figures["dpo_val_pair_margins"]  # every validation pair's margin, for the paired test
            assert sum(m is not None for m in margins) == figures["dpo_val_pairs"] > 0
        q = results["summary"]["quality"][mt]
        assert q["pretrain_val_bpb"]["n"] == 2 and q["pretrain_val_bpb"]["ci95"] is not None
        assert results["samples"][mt]["greedy_pretrain_sample"].startswith("ROMEO:")
        assert len(results["samples"][mt]["chat"]) == 3
    assert results["bench"]["peer"]["max_abs_logit_diff"] <= 1e-4
    assert len(results["summary"]["verdicts"]) == 2
    paired = results["summary"]["dpo_paired"]
    for seed in ("1", "2"):
        p = paired["per_seed"][seed]
        assert p["pairs"] == results["per_seed"]["standard"][seed]["dpo_val_pairs"]
        assert p["standard_accuracy"] == pytest.approx(results["per_seed"]["standard"][seed]
                                                       ["dpo_val_rewards/accuracies"])
    assert paired["across_seeds"]["n"] == 2
    report = (run_dir / "report.md").read_text()
    for text in ("The original's table", "final validation loss", "prefill time", "decode speed, KV cache",
                 "decode speed, no cache", "bits per byte", "reward accuracy", "KV cache per token", "parameters",
                 "What the numbers say", "95% CI", "Reward accuracy paired on the same validation pairs",
                 "Across 2 seed(s): hybrid - standard reward accuracy", "## Samples", "Machine and commands",
                 "hybrid-gpt pipeline"):
        assert text in report, text
    assert results["machine"] == results["bench"]["environment"]  # one record of the machine, not two
    assert f"linear layers: {results['machine']['linear_kernels']}" in report
    for png in ("loss_curves.png", "decode_speed.png", "kv_cache.png"):
        data = (run_dir / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"({png})" in report


def test_pipeline_resumes_by_skipping_complete_stages(pipeline_run, capsys, monkeypatch):
    import torch

    from hybrid_gpt import pipeline

    loaded = []  # the device every checkpoint is loaded on: --device's, for evaluation as for bench

    def load_checkpoint(path, device="default"):
        loaded.append(device)
        return real(path, device if device != "default" else "cpu")

    real = pipeline.load_checkpoint
    monkeypatch.setattr(pipeline, "load_checkpoint", load_checkpoint)
    run_dir, argv = pipeline_run
    before = (run_dir / "seed-1" / "dpo-hybrid" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv + ["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 12 and "report:" in out
    assert (run_dir / "seed-1" / "dpo-hybrid" / "model.safetensors").stat().st_mtime_ns == before
    assert len(loaded) == 2 * 2 * 2 + 2 + 4 and set(loaded) == {torch.device("cpu")}


def test_pipeline_quiet_prints_its_answer_alone(pipeline_run, capsys):
    """--quiet as on every command: the stages' progress goes, the headline table, verdicts and paths stay."""
    run_dir, argv = pipeline_run
    capsys.readouterr()
    assert main(argv + ["--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "[pipeline]" not in out + err and "step " not in out
    assert out.startswith("\n") and "- " in out and f"report: {run_dir / 'report.md'}\n" in out
