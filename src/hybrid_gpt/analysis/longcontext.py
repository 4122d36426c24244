"""Decode speed against context length: the hybrid/standard speedup a long-context benchmark measured, the cost
model's prediction beside it, and the contexts where each reaches a level (1.25x, 1.5x); their plot and tables
are present/longcontext.py's.

The speed claim lives at long contexts, where attention's KV-cache reads grow with the context while everything
else in a decode step stays fixed; these figures show where (and whether) the measured gain follows the roofline.
Inputs are `bench` results (``bench --shape ... --out``), whose ratio rows carry the measured paired ratio, its 95%
interval and ``predicted_decode_speedup``; their models' ``config`` lets the prediction be drawn between the
measured contexts too.
"""

from __future__ import annotations

import math

from hybrid_gpt.stats import judge_interval

STANDARD, HYBRID = "AAAA", "AAMM"
LEVELS = (1.25, 1.5)
STEPS_PER_OCTAVE = 8  # the prediction's grid: 2^(1/8) apart, so a crossing is placed within 9%


def pair_names(bench: dict, other: str = HYBRID, base: str = STANDARD) -> tuple[str, str] | None:
    """The (other, base) entries of a bench result, float32 and not compiled, picked by their layer patterns,
    when the result holds their ratio."""
    def pick(layers: str) -> str | None:
        return next((name for name, m in bench["models"].items() if m.get("layers") == layers
                     and m.get("dtype", "float32") == "float32" and not m.get("compiled")), None)

    o, b = pick(other), pick(base)
    return (o, b) if o and b and f"{o}/{b}" in bench.get("ratios", {}) else None


def speed_pair(bench: dict) -> tuple[str, str] | None:
    """The (other, base) entries whose speedup this section reports: AAMM against AAAA where the result holds
    that ratio, else the first ratio bench wrote between two float32, uncompiled entries, whatever their
    patterns (bench's base is the first pattern listed); None when it wrote none. A ratio key that names no
    such pair (no "/", another precision) is passed over."""
    names = pair_names(bench)
    if names:
        return names
    plain = [n for n, m in bench["models"].items() if m.get("dtype", "float32") == "float32" and not m.get("compiled")]
    pairs = {f"{o}/{b}": (o, b) for o in plain for b in plain if o != b}
    return next((pairs[key] for key in bench.get("ratios", {}) if key in pairs), None)


def pair_label(bench: dict, names: tuple[str, str]) -> str:
    """"AAMM / AAAA": the layer patterns of a pair (names where two entries share a pattern)."""
    other, base = (bench["models"][n]["layers"] for n in names)
    return f"{other} / {base}" if other != base else f"{names[0]} / {names[1]}"


def series(bench: dict, batch: int, names: tuple[str, str] | None = None) -> list[dict]:
    """[{context, ratio, ci95, predicted}] of the pair's (default :func:`speed_pair`) cached decode speedup at
    ``batch``, ascending context."""
    names = names or speed_pair(bench)
    if names is None:
        return []
    rows = [r for r in bench["ratios"][f"{names[0]}/{names[1]}"] if r["batch"] == batch]
    return [{"context": r["context"], "ratio": r["decode_speedup"], "ci95": r.get("decode_speedup_ci95"),
             "predicted": r.get("predicted_decode_speedup")} for r in sorted(rows, key=lambda r: r["context"])]


def measured_crossing(points: list[dict], level: float) -> dict:
    """Where the measured speedup reaches ``level``: ``estimate``, the context where the measured ratios first
    cross it (interpolated linearly in log context between the two measured contexts around it; the first
    measured context when it is already above); ``clears_from``, the shortest measured context from which the
    whole 95% interval lies above ``level`` at every longer measured context. None where it does not."""
    estimate = None
    for prev, cur in zip([None] + points[:-1], points):
        if cur["ratio"] >= level:
            if prev is None or prev["ratio"] >= level:
                estimate = cur["context"]
            else:
                f = (level - prev["ratio"]) / (cur["ratio"] - prev["ratio"])
                estimate = round(math.exp(math.log(prev["context"]) + f * (math.log(cur["context"])
                                                                           - math.log(prev["context"]))))
            break
    clears = None
    for p in reversed(points):
        if judge_interval(p["ci95"], level, higher_is_better=True) is not True:
            break
        clears = p["context"]
    return {"estimate": estimate, "clears_from": clears}


def _configs(bench: dict, names: tuple[str, str] | None):
    """The pair's model configs, validated; None where the result lacks them or one is not a valid config."""
    from hybrid_gpt.errors import HybridGPTError
    from hybrid_gpt.model.gpt import GPTConfig

    if names is None or not all(isinstance(bench["models"][n].get("config"), dict) for n in names):
        return None
    try:
        return tuple(GPTConfig.from_dict(bench["models"][n]["config"]) for n in names)
    except HybridGPTError:
        return None


def _prediction_inputs(bench: dict, top: int, names: tuple[str, str] | None = None):
    """(base config, other config, dtype, hardware) of the pair (default :func:`speed_pair`) for the cost model,
    the configs' context raised to ``top`` (costs need no weights); None when the result lacks the models'
    configs or its hardware."""
    from dataclasses import replace

    names = names or speed_pair(bench)
    cfgs, hw = _configs(bench, names), bench.get("hardware")
    if cfgs is None or not isinstance(hw, dict):
        return None
    hybrid, standard = (replace(c, block_size=max(c.block_size, top)) for c in cfgs)
    return standard, hybrid, bench["models"][names[1]].get("dtype", "float32"), hw


def prediction(bench: dict, batch: int, top: int, names: tuple[str, str] | None = None) -> list[tuple[int, float]]:
    """The cost model's decode speedup of the pair (default :func:`speed_pair`) on a fine grid of contexts up to
    ``top``, with the bench's measured hardware: [(context, speedup)], empty when the result lacks the configs."""
    inputs = _prediction_inputs(bench, top, names)
    if inputs is None:
        return []
    from hybrid_gpt.infer.costs import predicted_speedup

    standard, hybrid, dtype, hw = inputs
    grid = sorted({round(2 ** (k / STEPS_PER_OCTAVE)) for k in range(6 * STEPS_PER_OCTAVE,
                                                                     int(math.log2(top) * STEPS_PER_OCTAVE) + 1)})
    return [(c, predicted_speedup(standard, hybrid, context=c, batch=batch, dtype=dtype, hardware=hw))
            for c in grid]


def predicted_crossing(bench: dict, batch: int, level: float, top: int,
                       names: tuple[str, str] | None = None) -> int | None:
    """The shortest context (up to ``top``) at which the cost model predicts ``level`` for the pair (default
    :func:`speed_pair`): costs' first_context_reaching, exact to the token; None without configs or when it is
    not reached."""
    inputs = _prediction_inputs(bench, top, names)
    if inputs is None:
        return None
    from hybrid_gpt.infer.costs import first_context_reaching

    standard, hybrid, dtype, hw = inputs
    return first_context_reaching(standard, hybrid, level, limit=top, batch=batch, dtype=dtype, hardware=hw)


def summarize(bench: dict, top: int | None = None) -> dict:
    """The pair (:func:`speed_pair`, "AAMM / AAAA" or whatever pair the bench holds; None: none) and, per batch,
    its measured series, the prediction on its grid (up to ``top``, default the longest measured context x 4),
    and the crossings of each of LEVELS, measured and predicted."""
    note = bench.get("weights")
    names = speed_pair(bench)
    out = {"weights": "random" if isinstance(note, str) and note.startswith("random") else "trained",
           "weights_note": note, "pair": pair_label(bench, names) if names else None, "batches": {}}
    for batch in sorted({r["batch"] for rows in bench.get("ratios", {}).values() for r in rows}):
        points = series(bench, batch, names)
        if not points:
            continue
        limit = top or 4 * points[-1]["context"]
        grid = prediction(bench, batch, limit, names)
        out["batches"][str(batch)] = {
            "series": points, "prediction": [{"context": c, "predicted": r} for c, r in grid],
            "crossings": {f"{level:g}": measured_crossing(points, level) | {"predicted": predicted_crossing(
                bench, batch, level, limit, names)} for level in LEVELS}}
    return out
