"""Issue 27, class 3: no figure looks meaningful when it is not. A ratio over a difference within noise is
"not measurable" (stats.ratio_over_difference, used by distill and verdict); a held-out budget too small to
mean anything is refused, stating the minimum (train.evaluate.check_budget); a machine's figures have
physical bounds (the options of `costs`)."""

import json
import math
import re
import shutil

import pytest
import torch
from helpers import run_bad
from hypothesis import given
from hypothesis import strategies as st

from hybrid_gpt.analysis.verdict import sentences
from hybrid_gpt.checkpoint import load_checkpoint, save_checkpoint
from hybrid_gpt.cli import main
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.infer.config import BANDWIDTH_GBS, FLOPS_GFLOPS
from hybrid_gpt.stats import NOT_MEASURABLE, format_share, mean_ci, ratio_over_difference
from hybrid_gpt.train.evaluate import MIN_WINDOWS, check_budget

finite = st.floats(-1e6, 1e6, allow_nan=False)


@given(values=st.lists(finite, min_size=1, max_size=30), numerator=finite)
def test_a_ratio_over_a_difference_is_given_only_when_the_difference_is_beyond_noise(values, numerator):
    d = mean_ci(values)
    r = ratio_over_difference(numerator, d)
    if d["ci95"] is None or d["ci95"][0] <= 0 <= d["ci95"][1]:
        assert r is None and format_share(r) == NOT_MEASURABLE
    else:
        assert r == numerator / d["mean"] and format_share(r).endswith("%")


def test_the_issues_figures_are_not_measurable():
    """Gaps whose interval reaches zero, as behind the 437.8%, 561.5% and 2058.3% of the issue."""
    for diffs in ([0.001, -0.0008, 0.0004], [0.0, 0.0, 0.0], [1e-5, 2e-5, -1e-5, 3e-5]):
        assert ratio_over_difference(0.02, mean_ci(diffs)) is None
    assert ratio_over_difference(0.02, mean_ci([0.01])) is None  # one window: no interval
    assert ratio_over_difference(0.5, mean_ci([1.0, 1.1, 0.9])) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def inert_teacher(pretrained, tmp_path_factory):
    """The pretrained standard model with its second attention layer's output zeroed: dropping that layer
    changes nothing, so attention-drop's difference from the teacher is exactly zero on every window."""
    root = tmp_path_factory.mktemp("inert")
    shutil.copytree(pretrained / "data", root / "data")
    model, tok, training = load_checkpoint(pretrained / "pretrain-standard")
    with torch.no_grad():
        proj = model.transformer.h[1].mixer.c_proj
        proj.weight.zero_()
        if proj.bias is not None:
            proj.bias.zero_()
    save_checkpoint(root / "teacher", model, tok, dict(training, data_dir=str(root / "data")))
    return root / "teacher"


def test_distill_and_verdict_say_not_measurable_over_a_gap_within_noise(inert_teacher, tmp_path, capsys):
    out = tmp_path / "distill-AM"
    assert main(["distill", str(inert_teacher), "--layers", "AM", "--steps", "2", "--finetune-steps", "1",
                 "--batch-size", "4", "--eval-tokens", "512", "--mse-tokens", "256", "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "distill.json").read_text())
    assert saved["quality_gap"]["mean"] == 0 and saved["quality_gap"]["ci95"] == [0.0, 0.0]
    assert all(a["quality_kept"] is None for a in saved["arms"].values())
    md = (out / "distill.md").read_text()
    quality = md.split("### Quality and compute")[1].split("Compute by phase")[0]
    rows = [line for line in quality.splitlines() if line.startswith("| ") and "| pattern |" not in line
            and "---" not in line]
    assert len(rows) == len(saved["arms"]) and all(f"| {NOT_MEASURABLE} |" in row for row in rows)
    (sentence,) = [line for line in printed.splitlines() if line.startswith("Before any fine-tune")]
    assert f"quality kept is {NOT_MEASURABLE}" in sentence and "keeps" not in sentence and sentence in md
    lines = sentences({"distill": {"path": "distill-AM/distill.json", "data": saved}})
    (line,) = [s for s in lines if "Distilling" in s]
    assert NOT_MEASURABLE in line and "%" not in line


def test_verdict_does_not_repeat_a_quality_kept_written_without_its_noise():
    old = {"arms": {"distilled": {"quality_kept": 20.583}, "distilled_finetuned": {"quality_kept": 4.378}}}
    (line,) = [s for s in sentences({"distill": {"path": "d/distill.json", "data": old}}) if "Distilling" in s]
    assert NOT_MEASURABLE in line and "2058" not in line and "re-run" in line


def test_verdict_repeats_a_measurable_quality_kept():
    data = {"arms": {"distilled": {"quality_kept": 0.43}}, "quality_gap": {"mean": 0.2, "ci95": [0.1, 0.3], "n": 8}}
    (line,) = [s for s in sentences({"distill": {"path": "d/distill.json", "data": data}}) if "Distilling" in s]
    assert "recovers 43%" in line


@given(tokens=st.integers(1, 10**6), split=st.integers(2, 10**6), context=st.integers(1, 4096))
def test_a_budget_is_refused_exactly_when_it_fills_fewer_than_the_minimum_windows(tokens, split, context):
    short = min(tokens, split - 1) < MIN_WINDOWS * context
    try:
        check_budget("max_tokens", tokens, split, context)
    except HybridGPTError as e:
        assert short and f"{MIN_WINDOWS * context:,} tokens" in str(e)
    else:
        assert not short


@pytest.mark.parametrize("flag", ["--max-tokens"])
@pytest.mark.parametrize("value", ["1", "2", "31", "63"])
def test_importance_refuses_a_budget_of_less_than_two_windows_stating_the_minimum(pretrained, tmp_path, flag,
                                                                                  value, capsys):
    """`importance --max-tokens 1` recommended a pattern from one token (every mean-replacement loss 0)."""
    code, err = run_bad(["importance", pretrained / "pretrain-standard", flag, value, "--out", tmp_path / "i"],
                        capsys)
    assert code == 2 and f"{flag} {value} " in err and "at least 2 whole windows of 32 tokens (64 tokens)" in err, err
    assert not (tmp_path / "i").exists()


@pytest.mark.parametrize("flags", [["--eval-tokens", "1"], ["--mse-tokens", "40"]])
def test_distill_refuses_a_budget_too_small_before_any_work(pretrained, tmp_path, flags, capsys):
    code, err = run_bad(["distill", pretrained / "pretrain-standard", "--layers", "AM", *flags, "--out",
                         tmp_path / "d", "--no-progress"], capsys)
    assert code == 2 and "(64 tokens)" in err and not (tmp_path / "d").exists(), err


@pytest.mark.parametrize("flag, bounds", [("--bandwidth", BANDWIDTH_GBS), ("--flops", FLOPS_GFLOPS)])
@pytest.mark.parametrize("value", ["1e-300", "0", "-5", "1e300", "2e9"])
def test_costs_refuses_a_machine_outside_physical_bounds(flag, bounds, value, capsys):
    """`costs --bandwidth 1e-300` printed 400-digit step times."""
    other = "--flops" if flag == "--bandwidth" else "--bandwidth"
    code, err = run_bad(["costs", "--preset", "smoke", flag, value, other, "100"], capsys)
    assert code == 2 and f"{flag}: must be in [{bounds[0]:g}, {bounds[1]:g}]" in err, err


@given(bandwidth=st.floats(*BANDWIDTH_GBS), flops=st.floats(*FLOPS_GFLOPS))
def test_within_the_bounds_every_step_time_is_a_short_number(bandwidth, flops):
    from hybrid_gpt.infer.costs import costs_table, pattern_configs
    from hybrid_gpt.model.gpt import GPTConfig
    from hybrid_gpt.present.bench import format_costs

    base = GPTConfig(vocab_size=49152, block_size=16384, n_embd=576, n_head=9, layers="A" * 30)
    hw = {"memory_bandwidth_bytes_per_s": bandwidth * 1e9, "matmul_flops_per_s": flops * 1e9}
    table = costs_table(pattern_configs(base, ["standard", "hybrid"]), [256, 16384], [1, 8], "float32", hw)
    assert all(math.isfinite(r["seconds"]) and r["seconds"] < 1e9 for r in table["rows"])
    numbers = [w for w in format_costs(table).replace(";", " ").split() if re.fullmatch(r"[\d,.]+[%x:]?,?", w)]
    assert numbers and max(map(len, numbers)) < 20
