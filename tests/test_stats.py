import pytest

from hybrid_gpt.stats import judge_difference, mean_ci


def test_mean_ci_uses_student_t():
    s = mean_ci([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0
    assert s["ci95"] == pytest.approx([2.0 - 4.302653 / 3 ** 0.5, 2.0 + 4.302653 / 3 ** 0.5])
    assert mean_ci([5.0])["ci95"] is None


def test_judgement_sentences():
    assert "within noise" in judge_difference("bpb", [2.30, 2.31, 2.29], [2.31, 2.29, 2.30], "bpb", True)
    assert "measurably worse" in judge_difference("bpb", [2.30, 2.31, 2.29], [2.40, 2.41, 2.40], "bpb", True)
    assert "measurably better" in judge_difference("bpb", [2.30, 2.31, 2.29], [2.20, 2.21, 2.20], "bpb", True)
    assert "single seed" in judge_difference("bpb", [2.3], [2.31], "bpb", True)


def test_ratio_ci_on_constructed_timings():
    import math

    import pytest

    from hybrid_gpt.stats import format_ratio, ratio_ci

    # other is exactly twice as fast in every round, while the machine drifts 3x between rounds: no spread at all
    r = ratio_ci([1.0, 2.0, 3.0], [0.5, 1.0, 1.5])
    assert r["ratio"] == pytest.approx(2.0) and r["ci95"] == pytest.approx([2.0, 2.0])
    # log-ratios 0, log 2, log 4: mean log 2, t(2) * sd / sqrt 3 on the log scale
    r = ratio_ci([1.0, 2.0, 4.0], [1.0, 1.0, 1.0])
    half = 4.302653 * math.log(2) / math.sqrt(3)
    assert r["ratio"] == pytest.approx(2.0)
    assert r["ci95"] == pytest.approx([2 * math.exp(-half), 2 * math.exp(half)])
    # the interval of b/a is the reciprocal of a/b's
    back = ratio_ci([1.0, 1.0, 1.0], [1.0, 2.0, 4.0])
    assert back["ci95"] == pytest.approx([1 / r["ci95"][1], 1 / r["ci95"][0]])
    assert ratio_ci([2.0], [1.0])["ci95"] is None
    assert format_ratio(ratio_ci([1.0, 1.0], [0.5, 0.5])) == "2.00x [2.00, 2.00]"
    with pytest.raises(ValueError):
        ratio_ci([1.0, 2.0], [1.0])


def test_seeds_needed_for_a_tolerance_at_80_percent_power():
    import math
    import statistics

    from hybrid_gpt.stats import seeds_needed, t_quantile

    values = [0.01, 0.03, -0.02]
    sd = statistics.stdev(values)
    n = seeds_needed(values, 0.023)

    def reach(k):
        return (t_quantile(k - 1) + t_quantile(k - 1, 0.8)) * sd / math.sqrt(k)

    assert reach(n) <= 0.023 < reach(n - 1)
    assert seeds_needed(values, 0.023, power=0.5) < n  # the expected interval merely touching: half the power
    assert seeds_needed([0.5, 0.5], 0.01) == 2  # no spread: two seeds suffice
    assert seeds_needed([0.01], 0.01) is None


@pytest.mark.parametrize("effect, n", [(1.0, 10), (0.5, 34), (0.8, 15)])
def test_sample_size_matches_the_known_one_sample_t_case(effect, n):
    """pwr.t.test(d = effect, sig.level = 0.05, power = 0.8, type = "one.sample") gives n = 9.94, 33.4 and
    14.3: rounded up, 10, 34 and 15."""
    from hybrid_gpt.stats import sample_size

    assert sample_size(1.0, effect) == n


def test_sample_size_delivers_its_power_by_simulation():
    import random

    from hybrid_gpt.stats import mean_ci, sample_size

    n = sample_size(1.0, 0.8)
    rng = random.Random(0)
    decided = 0
    for _ in range(4000):
        ci = mean_ci([rng.gauss(0.8, 1.0) for _ in range(n)])["ci95"]
        decided += ci[0] > 0  # the criterion (0) lies 0.8 sd below the true mean
    assert 0.78 <= decided / 4000 <= 0.86


def test_judge_interval_is_three_valued():
    from hybrid_gpt.stats import judge_interval

    assert judge_interval([0.1, 0.2], 0.3, higher_is_better=False) is True
    assert judge_interval([0.31, 0.4], 0.3, higher_is_better=False) is False
    assert judge_interval([0.2, 0.4], 0.3, higher_is_better=False) is None
    assert judge_interval([1.3, 1.5], 1.25, higher_is_better=True) is True
    assert judge_interval([1.0, 1.2], 1.25, higher_is_better=True) is False
    assert judge_interval([1.2, 1.3], 1.25, higher_is_better=True) is None
    assert judge_interval(None, 1.25, higher_is_better=True) is None


@pytest.mark.parametrize("dof, quantile", [(1, 12.706205), (2, 4.302653), (5, 2.570582), (30, 2.042272),
                                           (31, 2.039513), (45, 2.014103), (60, 2.000298), (1000, 1.962339),
                                           (2.5, 3.574655)])
def test_t_quantile_is_exact_at_any_degrees_of_freedom(dof, quantile):
    """Published 97.5% quantiles (R's qt; at 2.5 the density integrated numerically): beyond 30 degrees of
    freedom too, and at fractional ones."""
    from hybrid_gpt.stats import t_cdf, t_quantile

    assert t_quantile(dof) == pytest.approx(quantile, abs=2e-6)
    assert t_cdf(t_quantile(dof), dof) == pytest.approx(0.975, abs=1e-9)


def test_seed_window_interval_covers_both_sources_of_variance():
    from hybrid_gpt.stats import mean_ci, seed_window_ci

    windows = [0.1, -0.05, 0.2, 0.0, 0.05, 0.15]
    one = seed_window_ci([windows])
    assert one["ci95"] == pytest.approx(mean_ci(windows)["ci95"]) and one["se_seeds"] == 0
    # a second seed shifted by a constant: the windows agree, the seeds do not, so the interval widens
    two = seed_window_ci([windows, [w + 0.3 for w in windows]])
    assert two["mean"] == pytest.approx(0.0750 + 0.15) and two["se_seeds"] > 0
    assert two["ci95"][1] - two["ci95"][0] > one["ci95"][1] - one["ci95"][0]
    with pytest.raises(ValueError):
        seed_window_ci([[0.1]])
