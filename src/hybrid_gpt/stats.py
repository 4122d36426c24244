"""Means and 95% confidence intervals (Student's t) over seeds or repeats, paired speed ratios, the seeds a
tolerance needs, and the sentence that judges noise. At the start of the flow: the benchmark (infer/) and the
analyses both use it."""

from __future__ import annotations

import math
import statistics

# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom; 1.96 beyond.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_quantile(dof: int) -> float:
    return _T975[dof - 1] if 1 <= dof <= len(_T975) else 1.96


def mean_ci(values: list[float]) -> dict:
    """{"mean", "ci95": [lo, hi] or None, "n", "values"}; no interval from a single value."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "ci95": None, "n": n, "values": values}
    half = t_quantile(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n, "values": values}


def ratio_ci(base_times: list[float], other_times: list[float]) -> dict:
    """How many times as fast ``other`` is as ``base`` from paired repeats (repeat i of each timed in the same round):
    {"ratio", "ci95": [lo, hi] or None, "n", "log_ratios"}. The interval is a t-interval on the per-repeat
    log-ratio log(base_i / other_i), mapped back by exp: pairing cancels the machine's drift between rounds,
    and the log makes the interval of b/a the reciprocal of a/b's."""
    if len(base_times) != len(other_times) or not base_times:
        raise ValueError("ratio_ci needs the same number (>= 1) of paired times for both")
    if min(base_times) <= 0 or min(other_times) <= 0:
        raise ValueError("ratio_ci needs positive times")
    logs = [math.log(b / o) for b, o in zip(base_times, other_times)]
    s = mean_ci(logs)
    ci = [math.exp(s["ci95"][0]), math.exp(s["ci95"][1])] if s["ci95"] else None
    return {"ratio": math.exp(s["mean"]), "ci95": ci, "n": s["n"], "log_ratios": logs}


def judge_interval(ci: list | None, threshold: float, higher_is_better: bool) -> bool | None:
    """True / False / None: the whole 95% interval on the good side of ``threshold``, on the bad side, or across
    it (or no interval: one seed or one repeat cannot be judged). The one three-valued rule of the verdict, the
    ablation's power line and the long-context crossings."""
    if not ci:
        return None
    lo, hi = ci
    if higher_is_better:
        return True if lo >= threshold else False if hi < threshold else None
    return True if hi <= threshold else False if lo > threshold else None


NOT_MEASURABLE = "not measurable"


def ratio_over_difference(numerator: float, denominator: dict | None) -> float | None:
    """``numerator / denominator["mean"]``, where ``denominator`` is a :func:`mean_ci` of a difference (such as
    quality kept = (drop - model) / (drop - teacher)); None, "not measurable", when that difference has no 95%
    interval or its interval reaches 0: a ratio over a difference within noise can come out as any number
    (437%, -2058%) and would look as meaningful as a real one. The one rule of every ratio of differences."""
    ci = (denominator or {}).get("ci95")
    if not ci or ci[0] <= 0 <= ci[1] or not denominator.get("mean"):
        return None
    return numerator / denominator["mean"]


def format_share(x: float | None, digits: int = 1) -> str:
    """``43.2%`` for a ratio of :func:`ratio_over_difference`; NOT_MEASURABLE for None."""
    return NOT_MEASURABLE if x is None else f"{100 * x:.{digits}f}%"


def format_ratio(r: dict | None, digits: int = 2) -> str:
    """``1.23x [1.10, 1.37]`` for a :func:`ratio_ci` result (the ratio alone without an interval; "-" for none)."""
    if not r or r.get("ratio") is None:
        return "-"
    text = f"{r['ratio']:.{digits}f}x"
    if r.get("ci95"):
        text += f" [{r['ci95'][0]:.{digits}f}, {r['ci95'][1]:.{digits}f}]"
    return text


def seeds_needed(values: list[float], half_width: float, most: int = 1000) -> int | None:
    """The fewest seeds whose 95% interval of the mean would be at most ``half_width`` wide on each side, if the
    spread between seeds stays that of ``values`` (their sample standard deviation); None from fewer than 2
    values, or when even ``most`` seeds would not do."""
    if len(values) < 2:
        return None
    return sample_size(statistics.stdev(values), half_width, most)


def sample_size(sd: float, half_width: float, most: int = 1000) -> int | None:
    """The fewest samples (>= 2) whose 95% t-interval of the mean is at most ``half_width`` on each side, for
    samples of standard deviation ``sd``; None when even ``most`` would not do."""
    if half_width <= 0:
        return None
    for n in range(2, most + 1):
        if t_quantile(n - 1) * sd / math.sqrt(n) <= half_width:
            return n
    return None


def format_ci(s: dict | None, digits: int = 4, signed: bool = False) -> str:
    """``mean ± half-width`` of a :func:`mean_ci` result (the mean alone without an interval; "-" for none)."""
    if not s or s.get("mean") is None:
        return "-"
    text = f"{s['mean']:{'+' if signed else ''}.{digits}f}"
    if s.get("ci95"):
        text += f" ± {(s['ci95'][1] - s['ci95'][0]) / 2:.{digits}f}"
    return text


def judge_difference(name: str, base: list[float], other: list[float], unit: str, lower_is_better: bool) -> str:
    """A plain sentence on whether hybrid - standard (paired by seed) is within noise."""
    return judge_pair(name, "standard", base, "hybrid", other, unit, lower_is_better)


def judge_pair(name: str, base_label: str, base: list[float], other_label: str, other: list[float], unit: str,
               lower_is_better: bool) -> str:
    """A plain sentence on whether other - base (paired by seed) is within noise."""
    diffs = [o - b for b, o in zip(base, other)]
    d = mean_ci(diffs)
    head = f"{name}: {other_label} - {base_label} = {d['mean']:+.4f} {unit}"
    if d["ci95"] is None:
        return f"{head} from a single seed; with one seed the noise cannot be judged (run with --seeds 1,2,3)."
    lo, hi = d["ci95"]
    span = f" (95% CI [{lo:+.4f}, {hi:+.4f}] over {d['n']} seeds)"
    if lo <= 0 <= hi:
        return f"{head}{span}: the difference is within noise."
    better = (d["mean"] < 0) == lower_is_better
    return f"{head}{span}: {other_label} is measurably {'better' if better else 'worse'}."
