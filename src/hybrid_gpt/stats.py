"""Means and 95% confidence intervals (Student's t) over seeds or repeats, paired speed ratios, the seeds a
tolerance needs at 80% power, and the sentence that judges noise. At the start of the flow: the benchmark (infer/)
and the analyses both use it."""

from __future__ import annotations

import math
import statistics


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for x in [0, 1]."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, dof: float) -> float:
    """P(T <= t) for Student's t with ``dof`` (> 0, not necessarily whole) degrees of freedom."""
    tail = 0.5 * _betainc(dof / 2.0, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(dof: float, level: float = 0.975) -> float:
    """The ``level`` quantile of Student's t with ``dof`` degrees of freedom, exact to about 1e-10 for any
    dof > 0 (whole or fractional, as Welch-Satterthwaite gives): the two-sided 95% intervals use 0.975."""
    if not dof > 0:
        raise ValueError(f"t_quantile needs dof > 0, got {dof}")
    if not 0.5 <= level < 1:
        raise ValueError(f"t_quantile needs a level in [0.5, 1), got {level}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, dof) < level:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_cdf(mid, dof) < level else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2.0


def mean_ci(values: list[float]) -> dict:
    """{"mean", "ci95": [lo, hi] or None, "n", "values"}; no interval from a single value."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "ci95": None, "n": n, "values": values}
    half = t_quantile(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n, "values": values}


def seed_window_ci(diffs: list[list[float]]) -> dict:
    """Mean and 95% interval of a paired difference measured on the same windows under several training seeds
    (``diffs[s][w]``: seed s, window w), covering both sources of variance: the squared standard error is
    var_w(mean over seeds) / W + var_s(mean over windows) / S, which counts the interaction twice (so it errs
    wide), with Welch-Satterthwaite degrees of freedom. One seed gives the windows' t-interval alone.

    Returns {"mean", "ci95", "dof", "se_windows", "se_seeds", "seeds", "windows"}."""
    S, W = len(diffs), len(diffs[0]) if diffs else 0
    if not S or W < 2 or any(len(row) != W for row in diffs):
        raise ValueError("seed_window_ci needs at least 2 windows, the same number for every seed")
    by_window = [statistics.fmean(row[w] for row in diffs) for w in range(W)]
    by_seed = [statistics.fmean(row) for row in diffs]
    v_w = statistics.variance(by_window) / W
    v_s = statistics.variance(by_seed) / S if S > 1 else 0.0
    mean = statistics.fmean(by_window)
    out = {"mean": mean, "ci95": None, "dof": None, "se_windows": math.sqrt(v_w), "se_seeds": math.sqrt(v_s),
           "seeds": S, "windows": W}
    if v_w + v_s <= 0:
        return out | {"ci95": [mean, mean]}
    dof = (v_w + v_s) ** 2 / (v_w ** 2 / (W - 1) + (v_s ** 2 / (S - 1) if S > 1 else 0.0))
    half = t_quantile(dof) * math.sqrt(v_w + v_s)
    return out | {"ci95": [mean - half, mean + half], "dof": dof}


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


POWER = 0.8  # every sample size the toolkit states is the one that decides at this power


def seeds_needed(values: list[float], effect: float, power: float = POWER, most: int = 1000) -> int | None:
    """The fewest seeds that decide, with probability ``power``, whether the mean lies on one side of a
    criterion ``effect`` away from it, if the spread between seeds stays that of ``values`` (their sample
    standard deviation): :func:`sample_size` of that spread. None from fewer than 2 values, or when even
    ``most`` seeds would not do."""
    if len(values) < 2:
        return None
    return sample_size(statistics.stdev(values), effect, power, most)


def sample_size(sd: float, effect: float, power: float = POWER, most: int = 1000) -> int | None:
    """The fewest samples n (>= 2) for which a two-sided 95% t-interval of the mean excludes a criterion at
    distance ``effect`` from the true mean with probability ``power``, for samples of standard deviation ``sd``:
    the smallest n with (t(0.975, n-1) + t(power, n-1)) * sd / sqrt(n) <= effect (the usual t approximation to
    the noncentral-t power; n = 10 for effect = sd at 80%, as pwr.t.test gives). At power 0.5 it is the n whose
    expected interval just touches the criterion, which decides only half the time. None when even ``most``
    would not do."""
    if effect <= 0:
        return None
    if not 0.5 <= power < 1:
        raise ValueError(f"sample_size needs a power in [0.5, 1), got {power}")
    for n in range(2, most + 1):
        if (t_quantile(n - 1) + t_quantile(n - 1, power)) * sd / math.sqrt(n) <= effect:
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
