""""Does the hypothesis hold?": one table per context length and plain sentences generated from the measured analyses.

It reads what `ablate`, `probe`, `importance` and `distill` wrote under a run directory, and the decode benchmarks
under its ``speed/`` folder (``bench --shape ... --out <run-dir>/speed/NAME.json``: the long contexts the speed
claim is about); any of them may be missing, the verdict says what it lacks, and it never states a conclusion the
numbers do not give. Every judgement is three-valued (holds / does not hold / cannot be told at this noise), from
fixed criteria printed with the verdict:

    little loss of quality  the upper end of the 95% CI (over seeds) of hybrid - standard bits per byte is
                            at most QUALITY_TOLERANCE of the standard's (it fails when the lower end exceeds
                            it; between the two, more seeds are needed)
    a large speed gain      the 95% CI (paired repeats) of hybrid/standard cached decode speed at batch 1 lies
                            above SPEED_GAIN at that context (fails when it lies below; between, more repeats)
    the MLP does something  the hybrid is measurably better than attention-drop (AANN); a qualifier of the answer

The answer compares like with like: quality and speed are paired only where both were measured on the same
trained models at the same context (the ablation's quality at its training context, beside a decode speed of
trained weights at that context). A row where one of them is missing says "not measured" and never borrows the
other context's figure; a speed of random weights is a property of the shape and is shown, never paired. Then one
plain line: "holds at context X", "does not hold", or "cannot be told" with the seeds (at 80% power) and repeats
that would tell.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from hybrid_gpt.analysis.longcontext import pair_names, summarize
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import JSON_LIMIT, read_json, read_text, write_json, write_text
from hybrid_gpt.present.longcontext import plot_speed_context, render_markdown
from hybrid_gpt.present.verdict import NOT_MEASURED, STATES, render_verdict_markdown
from hybrid_gpt.stats import (
    NOT_MEASURABLE,
    format_ratio,
    format_share,
    judge_interval,
    mean_ci,
    ratio_over_difference,
    sample_size,
    seeds_needed,
    t_quantile,
)

QUALITY_TOLERANCE = 0.01  # 1% of the standard model's bits per byte
SPEED_GAIN = 1.25
STANDARD, HYBRID, DROP = "AAAA", "AAMM", "AANN"
SPEED_DIR = "speed"  # <run-dir>/speed/*.json: bench results read per context
# The criteria as the page states them (present/verdict.py renders it).
CRITERIA = {"quality_tolerance": QUALITY_TOLERANCE, "speed_gain": SPEED_GAIN, "standard": STANDARD,
            "hybrid": HYBRID, "drop": DROP}


def _read(path: Path) -> dict | None:
    return read_json(path, "analysis result") if os.path.lexists(path) else None


MAX_MAGNITUDE = 1e30  # no measured quantity comes near; the statistics' sums overflow (math.fsum) far beyond it


def _number(v, positive: bool = False, whole: bool = False) -> bool:
    return (isinstance(v, int if whole else (int, float)) and not isinstance(v, bool)
            and -MAX_MAGNITUDE < v < MAX_MAGNITUDE and (v > 0 or not positive))


def _interval_of(v) -> bool:
    """A :func:`mean_ci` result: a finite mean, finite values, and no interval or two finite ends."""
    return (isinstance(v, dict) and _number(v.get("mean")) and isinstance(v.get("values"), list) and v["values"] != []
            and all(map(_number, v["values"])) and (v.get("ci95") is None or (
                isinstance(v["ci95"], list) and len(v["ci95"]) == 2 and all(map(_number, v["ci95"])))))


def _ci_or_none(v) -> bool:
    return v is None or (isinstance(v, list) and len(v) == 2 and all(_number(x, True) for x in v))


def _probe_patterns(d: dict) -> bool:
    return all(isinstance(p, dict) and isinstance(p.get("pattern"), str) and _interval_of(p.get("accuracy"))
               and isinstance(p.get("judgement", ""), str) for p in _records(d, "patterns"))


def _records(data: dict, key: str) -> list:
    return data.get(key) if isinstance(data.get(key), list) else [None]


# What the verdict reads of each analysis, and the check that it has that shape: a result file edited, cut or
# written by another version would otherwise end in a traceback or a verdict on numbers that are not there.
_SHAPES = {
    # kv_bytes_per_token is 0 for a pattern without attention; the standard's, which divides, always has some.
    "ablate": ("decode.context, and variants with spec, parameters, val_bpb, decode_tok_s, kv_bytes_per_token",
               lambda d: isinstance(d.get("decode"), dict) and isinstance(d["decode"].get("context"), int)
               and all(isinstance(e, dict) and isinstance(e.get("spec"), str) and isinstance(e.get("parameters"), int)
                       and not isinstance(e["parameters"], bool) and _interval_of(e.get("val_bpb"))
                       and _number(e.get("decode_tok_s"), True) and _number(e.get("kv_bytes_per_token"), whole=True)
                       and e["kv_bytes_per_token"] >= 0
                       for e in _records(d, "variants"))
               and len({len(e["val_bpb"]["values"]) for e in d["variants"]}) <= 1),
    "probe": ("chance, settings.task, and patterns with pattern and accuracy (in each of tasks too, when present)",
              lambda d: _number(d.get("chance")) and isinstance(d.get("settings"), dict)
              and isinstance(d["settings"].get("task"), str) and _probe_patterns(d)
              and (d.get("tasks") is None or isinstance(d["tasks"], dict) and all(
                  isinstance(t, dict) and _number(t.get("chance")) and _probe_patterns(t)
                  for t in d["tasks"].values()))),
    "speed": ("models with layers, and ratios whose rows have context, batch and a positive decode_speedup",
              lambda d: isinstance(d.get("models"), dict) and isinstance(d.get("ratios"), dict)
              and all(isinstance(m, dict) and isinstance(m.get("layers"), str) for m in d["models"].values())
              and all(isinstance(rows, list) and all(
                  isinstance(r, dict) and _number(r.get("context"), True, True) and _number(r.get("batch"), True, True)
                  and _number(r.get("decode_speedup"), True) and _ci_or_none(r.get("decode_speedup_ci95"))
                  for r in rows) for rows in d["ratios"].values())),
    "importance": ("recommendation with pattern, same_as_deep and deep_pattern",
                   lambda d: isinstance(r := d.get("recommendation"), dict) and isinstance(r.get("pattern"), str)
                   and isinstance(r.get("same_as_deep"), bool) and isinstance(r.get("deep_pattern"), str)),
    "distill": ("arms, each an object whose quality_kept is a number or null (and quality_gap, if there, with a "
                "mean, ci95 and n)",
                lambda d: isinstance(d.get("arms"), dict) and all(
                    isinstance(a, dict) and (a.get("quality_kept") is None or _number(a["quality_kept"]))
                    for a in d["arms"].values())
                and ("quality_gap" not in d or isinstance(g := d["quality_gap"], dict) and _number(g.get("mean"))
                     and (g.get("ci95") is None or isinstance(g["ci95"], list) and len(g["ci95"]) == 2
                          and all(map(_number, g["ci95"]))) and _number(g.get("n"), True, True))),
}


def quality_kept(result: dict, arm: str) -> float | None:
    """The quality kept by ``arm`` of a distill result, None when not measurable: also for a result written
    before distill recorded the noise of its denominator ("quality_gap"), whose figure cannot be trusted."""
    return result["arms"].get(arm, {}).get("quality_kept") if "quality_gap" in result else None


def gap_sentence(result: dict) -> str:
    """Why quality kept is not measurable, or "" when it is."""
    gap = result.get("quality_gap")
    if gap is None:
        return ("quality kept is not measurable: this distill.json was written before distill recorded the noise "
                "of attention-drop's difference from the teacher; re-run `hybrid-gpt distill`")
    if ratio_over_difference(1.0, gap) is not None:
        return ""
    ci = f" [{gap['ci95'][0]:+.4f}, {gap['ci95'][1]:+.4f}]" if gap["ci95"] else " (no interval: one window)"
    return (f"quality kept is {NOT_MEASURABLE}: attention-drop - teacher = {gap['mean']:+.4f} bits per byte{ci} "
            f"over {gap['n']:,} held-out windows is within noise, so a share of it can be any number; raise "
            "--eval-tokens, or replace more layers")


def _check_shape(name: str, path: Path, data) -> None:
    fields, fits = _SHAPES[name]
    if not (isinstance(data, dict) and fits(data)):
        rerun = "bench ... --out" if name == "speed" else name
        raise HybridGPTError(f"{path} is damaged: `verdict` needs {fields} (finite numbers); "
                             f"re-run `hybrid-gpt {rerun}` to rewrite it")


def collect(run_dir: str | Path) -> dict:
    """The analyses found under ``run_dir`` (full ablation preferred over --quick), with their paths; a result
    of another shape than its analysis writes is a one-line error."""
    run_dir = Path(run_dir)
    found = {}
    for name, candidates in {
        "ablate": [run_dir / "ablate" / "ablate.json", run_dir / "ablate-quick" / "ablate.json"],
        "probe": [run_dir / "probe" / "probe.json"],
        "importance": [run_dir / "importance" / "pretrain-standard" / "importance.json"],
        "distill": sorted(run_dir.glob("distill-*/distill.json")),
    }.items():
        for path in candidates:
            data = _read(path)
            if data is not None:
                _check_shape(name, path, data)
                found[name] = {"path": str(path.relative_to(run_dir)), "data": data}
                break
    speed = []
    for path in sorted((run_dir / SPEED_DIR).glob("*.json")) if (run_dir / SPEED_DIR).is_dir() else []:
        data = _read(path)
        _check_shape("speed", path, data)
        speed.append({"path": str(path.relative_to(run_dir)), "data": data})
    if speed:
        found["speed"] = speed
    if not found:
        raise HybridGPTError(f"no analyses under {run_dir}: run `hybrid-gpt ablate`, `probe`, `importance` or "
                             "`distill` first (or `hybrid-gpt pipeline --full`)")
    return found


def _variants(found: dict) -> dict[str, dict]:
    return {e["spec"]: e for e in found["ablate"]["data"]["variants"]} if "ablate" in found else {}


def _probe(found: dict) -> dict[str, dict[str, dict]]:
    """{task: {pattern: its probe entry}} (one task, the top level's, in a probe.json written before tasks)."""
    if "probe" not in found:
        return {}
    data = found["probe"]["data"]
    tasks = data.get("tasks") or {data.get("settings", {}).get("task", "probe"): data}
    return {task: {r["pattern"]: r | {"chance": t["chance"]} for r in t["patterns"]} for task, t in tasks.items()}


def _diff(a: dict, b: dict) -> dict:
    """a - b per seed (paired), mean and 95% CI."""
    return mean_ci([x - y for x, y in zip(a["val_bpb"]["values"], b["val_bpb"]["values"])])


def _interval(d: dict) -> str:
    return f" (95% CI [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}])" if d["ci95"] else " (one seed: no interval)"


def _within_noise(d: dict) -> bool:
    return bool(d["ci95"]) and d["ci95"][0] <= 0 <= d["ci95"][1]


def _same_shape(found: dict, bench: dict, standard: str, params: int | None) -> bool:
    """Whether a benchmark measured models of the ablation's shape: the same preset for random-weight models of a
    shape (their position table follows the benchmark's context), else the standard's parameter count."""
    if "ablate" not in found:
        return True
    shape, preset = bench.get("shape"), found["ablate"]["data"].get("preset")
    if isinstance(shape, dict) and isinstance(shape.get("preset"), str) and isinstance(preset, str):
        return shape["preset"] == preset
    return bench["models"][standard].get("parameters") == params


def speed_points(found: dict) -> list[dict]:
    """Measured hybrid/standard cached decode speedups at batch 1, one per context, ascending: from the benchmarks
    under speed/ of models of the ablation's shape (any shape without an ablation) and the ablation's own decode
    measurement of its trained models at their training context (which wins at its context over a benchmark of
    random weights). Each: context, ratio, ci95 (or None), repeats, predicted (the cost model's roofline ratio,
    when the benchmark gives it), weights ("trained" or "random"), source."""
    variants = _variants(found)
    params = variants[STANDARD]["parameters"] if STANDARD in variants else None
    points: dict[int, dict] = {}
    for entry in found.get("speed", []):
        bench = entry["data"]
        names = pair_names(bench)
        if names is None or not _same_shape(found, bench, names[1], params):
            continue
        repeats = bench.get("config", {}).get("repeats") if isinstance(bench.get("config"), dict) else None
        for row in bench["ratios"][f"{names[0]}/{names[1]}"]:
            if row["batch"] == 1:
                points[row["context"]] = {
                    "context": row["context"], "ratio": row["decode_speedup"], "ci95": row.get("decode_speedup_ci95"),
                    "repeats": repeats if _number(repeats, True, True) else None,
                    "predicted": row.get("predicted_decode_speedup") if _number(
                        row.get("predicted_decode_speedup"), True) else None,
                    "weights": "random" if str(bench.get("weights", "")).startswith("random") else "trained",
                    "source": entry["path"]}
    own = _ablation_speed(found, variants)
    if own and points.get(own["context"], {}).get("weights") != "trained":
        points[own["context"]] = own
    return [points[c] for c in sorted(points)]


def _ablation_speed(found: dict, variants: dict) -> dict | None:
    """The ablation's own paired decode speedup of its trained AAMM over AAAA at their training context."""
    if STANDARD not in variants or HYBRID not in variants:
        return None
    decode = found["ablate"]["data"]["decode"]
    measured = decode.get("ratios", {}).get(variants[HYBRID].get("slug", HYBRID)) if isinstance(
        decode.get("ratios"), dict) else None
    if isinstance(measured, dict) and _number(measured.get("ratio"), True) and _ci_or_none(measured.get("ci95")):
        ratio, ci, n = measured["ratio"], measured.get("ci95"), measured.get("n")
    else:  # an ablation written before decode speeds had intervals: the ratio of medians alone
        ratio, ci, n = variants[HYBRID]["decode_tok_s"] / variants[STANDARD]["decode_tok_s"], None, None
    return {"context": decode["context"], "ratio": ratio, "ci95": ci, "repeats": n, "predicted": None,
            "weights": "trained", "source": found["ablate"]["path"]}


def _repeats_needed(point: dict) -> int | None:
    """Paired repeats whose interval would clear SPEED_GAIN, if the per-repeat log-ratios keep their spread
    (recovered from the interval: half-width = t * sd / sqrt(n))."""
    n, ci = point.get("repeats"), point.get("ci95")
    if not ci or not n or n < 2:
        return None
    sd = (math.log(ci[1]) - math.log(ci[0])) / 2 * math.sqrt(n) / t_quantile(n - 1)
    gap = abs(math.log(point["ratio"]) - math.log(SPEED_GAIN))
    return sample_size(sd, gap)


def per_context(found: dict) -> dict | None:
    """The verdict at each measured context, and the plain answer; None without the AAAA/AAMM ablation.

    Each row carries ``quality_context`` and ``speed_context``: where both are set they are equal and the speed is
    of trained weights; elsewhere the missing one is None and the row's verdict is "not measured"."""
    variants = _variants(found)
    if STANDARD not in variants or HYBRID not in variants:
        return None
    s, h = variants[STANDARD], variants[HYBRID]
    d = _diff(h, s)
    tol = QUALITY_TOLERANCE * s["val_bpb"]["mean"]
    quality = judge_interval(d["ci95"], tol, higher_is_better=False)
    q_ctx = found["ablate"]["data"]["decode"]["context"]  # the ablation evaluates and decodes at its block size
    rows = []
    for p in speed_points(found):
        speed = judge_interval(p["ci95"], SPEED_GAIN, higher_is_better=True)
        paired = p["context"] == q_ctx and p["weights"] == "trained"
        row = p | {"speed_context": p["context"], "quality_context": q_ctx if paired else None, "speed": speed,
                   "quality": quality if paired else NOT_MEASURED}
        row["state"] = (False if False in (quality, speed) else True if quality and speed else None) if paired \
            else NOT_MEASURED
        rows.append(row)
    budget = {}
    if quality is None:
        budget["seeds"] = seeds_needed(d["values"], abs(d["mean"] - tol)) if d["n"] >= 2 else None
    undecided = [r for r in rows if r["speed"] is None and r["quality_context"] is not None]
    if undecided:
        budget["repeats"] = {r["context"]: _repeats_needed(r) for r in undecided}
    answer = _answer(quality, rows, budget, d, tol)
    return {"quality_cost_bpb": d, "tolerance_bpb": tol, "quality": quality, "quality_context": q_ctx,
            "rows": rows, "budget": budget, "answer": answer}


def _answer(quality: bool | None, rows: list[dict], budget: dict, d: dict, tol: float) -> dict:
    """{"state": "holds" | "does not hold" | "cannot be told", "context", "text"}, from the paired rows alone."""
    if quality is False:
        return {"state": "does not hold", "context": None,
                "text": f"does not hold: the hybrid loses more than {100 * QUALITY_TOLERANCE:.0f}% in bits per byte "
                        f"({d['mean']:+.4f} against a tolerance of {tol:.4f}), whatever the speed"}
    # the ablation measures both at its context, so one row always pairs them
    r = next(r for r in rows if r["quality_context"] is not None)
    unpaired = [f"{x['speed_context']:,}" for x in rows if x["quality_context"] is None]
    elsewhere = (f" (speed alone was measured at {', '.join(unpaired)} tokens, where quality was not: those rows "
                 "pair nothing)") if unpaired else ""
    at = f"at context {r['context']:,}"
    if quality and r["speed"]:
        return {"state": "holds", "context": r["context"], "text": f"holds {at}{elsewhere}"}
    if r["speed"] is False:
        return {"state": "does not hold", "context": r["context"],
                "text": f"does not hold {at}, where quality and speed were measured on the same models: the decode "
                        f"speed gain there is {r['ratio']:.2f}x, below {SPEED_GAIN:.2f}x{elsewhere}"}
    needs = []
    if quality is None:
        n = budget.get("seeds")
        needs.append(f"{n} seeds (80% power) to tell the quality cost from the tolerance" if n else
                     "more seeds (or a longer budget) to tell the quality cost from the tolerance")
    if r["speed"] is None:
        n = budget.get("repeats", {}).get(r["context"])
        needs.append(f"{n if n else 'more'} paired repeats (80% power) to tell the speed gain from the criterion")
    return {"state": "cannot be told", "context": r["context"],
            "text": f"cannot be told {at}; the budget that would tell: " + "; ".join(needs) + elsewhere}


def _decode_ratio(found: dict, e: dict, base: dict | None) -> dict | None:
    """{"ratio", "ci95"} of a variant's cached decode speed against the standard's: the ablation's paired ratio
    when it measured one against the standard, else the ratio of medians (no interval)."""
    if base is None:
        return None
    decode = found["ablate"]["data"]["decode"]
    ratios = decode.get("ratios") if isinstance(decode.get("ratios"), dict) else {}
    first = found["ablate"]["data"]["variants"][0]
    r = ratios.get(e.get("slug", e["spec"]))
    if first is base and isinstance(r, dict) and _number(r.get("ratio"), True) and _ci_or_none(r.get("ci95")):
        return {"ratio": r["ratio"], "ci95": r.get("ci95")}
    return {"ratio": e["decode_tok_s"] / base["decode_tok_s"], "ci95": None}


def table(found: dict) -> list[dict]:
    variants, probe = _variants(found), _probe(found)
    base = variants.get(STANDARD)
    rows = []
    def accuracies(pattern: str) -> dict:
        return {task: by[pattern]["accuracy"] for task, by in probe.items() if pattern in by}

    for spec, e in variants.items():
        rows.append({"pattern": spec, "parameters": e["parameters"], "val_bpb": e["val_bpb"],
                     "bpb_vs_standard": _diff(e, base) if base else None,
                     "probe_accuracy": accuracies(spec), "decode_tok_s": e["decode_tok_s"],
                     "decode_vs_standard": _decode_ratio(found, e, base),
                     "kv_bytes_per_token": e["kv_bytes_per_token"]})
    for pattern in dict.fromkeys(p for by in probe.values() for p in by):  # probe-only patterns get a row too
        if pattern not in variants:
            rows.append({"pattern": pattern, "parameters": None, "val_bpb": None, "bpb_vs_standard": None,
                         "probe_accuracy": accuracies(pattern), "decode_tok_s": None, "decode_vs_standard": None,
                         "kv_bytes_per_token": None})
    return rows


def sentences(found: dict) -> list[str]:
    """The verdict in sentences: quality and KV cache, what the MLP adds, the truncated model, the probe, the
    other analyses, speed per context, and the answer, each from the numbers found."""
    variants, ctx = _variants(found), per_context(found)
    out = _quality_sentences(variants, ctx) if ctx is not None else []
    mlp_line, mlp_matters = _mlp_sentence(variants)
    out += mlp_line
    if "AA" in variants and HYBRID in variants:
        d = _diff(variants["AA"], variants[HYBRID])
        verdict = ("within noise of" if _within_noise(d) else "better than" if d["mean"] < 0 else "worse than")
        out.append(f"The truncated two-block model AA is {verdict} {HYBRID} ({d['mean']:+.4f} bpb{_interval(d)}).")
    out += [_probe_sentence(task, by) for task, by in _probe(found).items() if STANDARD in by]
    out += _analysis_sentences(found)
    if ctx is None:
        out.append("No verdict: it needs the ablation of AAAA and AAMM (`hybrid-gpt ablate`).")
        return out
    return out + _speed_sentences(ctx, mlp_matters)


def _quality_sentences(variants: dict, ctx: dict) -> list[str]:
    s, h = variants[STANDARD], variants[HYBRID]
    d, tol, quality_ok = ctx["quality_cost_bpb"], ctx["tolerance_bpb"], ctx["quality"]
    quality_state = {True: "holds", False: "does not hold", None: "cannot be told at this noise"}[quality_ok]
    return [f"Quality: {HYBRID} - {STANDARD} = {d['mean']:+.4f} bits per byte{_interval(d)}, "
            f"{100 * d['mean'] / s['val_bpb']['mean']:+.2f}% of the standard's; the tolerance is "
            f"{tol:+.4f} ({100 * QUALITY_TOLERANCE:.0f}%), so little loss of quality {quality_state}"
            + (" (the interval straddles the tolerance: more seeds would tell)" if quality_ok is None else "")
            + ("" if d["ci95"] else " (one seed: no interval, so it cannot be judged)") + ".",
            f"The KV cache of {HYBRID} is {h['kv_bytes_per_token'] / s['kv_bytes_per_token']:.2f}x the "
            "standard's size."]


def _mlp_sentence(variants: dict) -> tuple[list[str], bool | None]:
    """What the per-token MLP adds over dropping the attention: ([sentence] or [], whether it measurably helps)."""
    if HYBRID not in variants or DROP not in variants:
        return [], None
    d = _diff(variants[HYBRID], variants[DROP])
    mlp_matters = bool(d["ci95"]) and d["ci95"][1] < 0
    if mlp_matters:
        line = f"The per-token MLP earns its place: {HYBRID} - {DROP} = {d['mean']:+.4f} bpb{_interval(d)}."
    elif d["ci95"] and d["ci95"][0] > 0:
        line = (f"The per-token MLP is worse than nothing: {HYBRID} - {DROP} = {d['mean']:+.4f} bpb"
                f"{_interval(d)}; what the hybrid keeps comes from the blocks' feed-forward MLPs, not from a "
                "static replacement of attention.")
    else:
        line = (f"The per-token MLP adds nothing measurable: {HYBRID} - {DROP} = {d['mean']:+.4f} bpb"
                f"{_interval(d)}; dropping the deep attention outright does as well at this budget.")
    return [line], mlp_matters


def _probe_sentence(task: str, by: dict) -> str:
    chance = next(iter(by.values()))["chance"]
    cells = [f"{p} {e['accuracy']['mean']:.3f}" + (f" ({e['judgement']}: " + ", ".join(
        f"{v:.3f}" for v in e["accuracy"]["values"]) + ")" if e.get("judgement") else "") for p, e in by.items()]
    line = f"Token-mixing probe, {task} (chance {chance:.3f}): " + "; ".join(cells) + "."
    judged = {p: e.get("judgement") for p, e in by.items()}
    shallow = [p for p in by if p != STANDARD and judged[p]]
    if judged[STANDARD] == "learns" and shallow:
        lost = [p for p in shallow if judged[p] == "does not learn"]
        kept = [p for p in shallow if judged[p] == "learns"]
        if lost:
            line += f" {STANDARD} learns it and {', '.join(lost)} cannot: here the deep attention does something"
            line += f" ({', '.join(kept)} learn it too)." if kept else "."
        elif len(kept) == len(shallow):
            line += f" Every pattern learns it: {task} does not need the deep attention at this size."
    elif judged[STANDARD] and judged[STANDARD] != "learns":
        line += f" {STANDARD} itself {judged[STANDARD] if judged[STANDARD] == 'does not learn' else 'is unstable'}"
        line += " on it, so it cannot show what the other patterns lose."
    return line


def _analysis_sentences(found: dict) -> list[str]:
    """The layer-importance recommendation and what distillation recovers, where they were run."""
    out = []
    if "importance" in found:
        rec = found["importance"]["data"]["recommendation"]
        out.append(f"Layer importance of the trained standard model recommends {rec['pattern']}"
                   + (", the original's choice of the deepest layers." if rec["same_as_deep"] else
                      f", not the deepest layers ({rec['deep_pattern']})."))
    if "distill" in found:
        data = found["distill"]["data"]
        kept, tuned = quality_kept(data, "distilled"), quality_kept(data, "distilled_finetuned")
        why = gap_sentence(data)
        if why:  # a share of a difference within noise is no figure to repeat
            out.append(f"Distilling the deep attention into per-token MLPs: {why}.")
        elif kept is not None:
            after = (f", {format_share(tuned, 0)} after the fine-tune." if "distilled_finetuned" in data["arms"]
                     else ".")
            out.append(f"Distilling the deep attention into per-token MLPs recovers {format_share(kept, 0)} of the "
                       "quality that attention-drop loses" + after)
    return out


def _speed_sentences(ctx: dict, mlp_matters: bool | None) -> list[str]:
    out = []
    for r in ctx["rows"]:
        out.append(f"Speed at context {r['context']:,} ({r['weights']} weights, batch 1): cached decode "
                   f"{format_ratio({'ratio': r['ratio'], 'ci95': r['ci95']})} the standard's"
                   + (f" (the cost model predicts {r['predicted']:.2f}x)" if r["predicted"] else "")
                   + f": a large speed gain {STATES[r['speed']]}"
                   + ("" if r["ci95"] else " (no interval: one repeat, or a result written before intervals)")
                   + ("" if r["quality_context"] else "; quality not measured at this context") + ".")
    qualifier = ""
    if mlp_matters is False:
        qualifier = (f" (but {HYBRID} is not measurably better than {DROP}: dropping the deep attention does as "
                     "well, so the per-token MLP is not what keeps the quality)")
    out.append(f"Verdict: the hypothesis {ctx['answer']['text']}{qualifier}.")
    return out


def write_verdict(run_dir: str | Path) -> dict:
    """hypothesis.json and hypothesis.md in ``run_dir``: the verdict, then each analysis's own section
    (its plots linked from their subdirectories)."""
    run_dir = Path(run_dir)
    outputs = run_dir / "hypothesis.json", run_dir / "hypothesis.md"
    for path in outputs:  # before either is written: one refused after the other was written leaves a mix
        if os.path.lexists(path) and not path.is_file():
            raise HybridGPTError(f"{path} exists and is not a regular file; it is left untouched (move it away)")
    found = collect(run_dir)
    sources = {k: v["path"] for k, v in found.items() if k != "speed"}
    sources |= {f"speed:{Path(e['path']).stem}": e["path"] for e in found.get("speed", [])}
    result = {"sources": sources, "table": table(found), "sentences": sentences(found),
              "per_context": per_context(found)}
    sections = [render_verdict_markdown(result, CRITERIA)]
    if found.get("speed"):  # the long-context benchmarks: measured and predicted speedup against context
        summaries = {Path(e["path"]).stem: summarize(e["data"]) for e in found["speed"]}
        plot = plot_speed_context(summaries, run_dir / "speed-context.png")
        result["long_context"] = summaries
        sections.append(render_markdown(summaries, plot))
    for name in ("ablate", "probe", "importance", "distill"):
        if name in found:
            folder = Path(found[name]["path"]).parent
            md_file = run_dir / folder / f"{name}.md"
            if not os.path.lexists(md_file):  # the numbers above come from the JSON; the section is optional
                continue
            md = read_text(md_file, "analysis report", JSON_LIMIT)
            # The section's plots sit beside its markdown: link them from the run directory.
            sections.append(re.sub(r"\]\(([^)/]+\.png)\)", lambda m: f"]({folder.as_posix()}/{m.group(1)})", md))
    write_json(outputs[0], result)
    write_text(outputs[1], "\n".join(sections))
    return result
