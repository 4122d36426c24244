"""Means and 95% confidence intervals over seeds (Student's t), and the sentence that judges noise."""

from __future__ import annotations

import math
import statistics

# Two-sided 97.5% quantiles of Student's t for 1..10 degrees of freedom; 1.96 beyond.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]


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
