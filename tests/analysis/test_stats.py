import pytest

from hybrid_gpt.analysis.stats import judge_difference, mean_ci


def test_mean_ci_uses_student_t():
    s = mean_ci([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0
    assert s["ci95"] == pytest.approx([2.0 - 4.303 / 3 ** 0.5, 2.0 + 4.303 / 3 ** 0.5])
    assert mean_ci([5.0])["ci95"] is None


def test_judgement_sentences():
    assert "within noise" in judge_difference("bpb", [2.30, 2.31, 2.29], [2.31, 2.29, 2.30], "bpb", True)
    assert "measurably worse" in judge_difference("bpb", [2.30, 2.31, 2.29], [2.40, 2.41, 2.40], "bpb", True)
    assert "measurably better" in judge_difference("bpb", [2.30, 2.31, 2.29], [2.20, 2.21, 2.20], "bpb", True)
    assert "single seed" in judge_difference("bpb", [2.3], [2.31], "bpb", True)
