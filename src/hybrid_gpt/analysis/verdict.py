""""Does the hypothesis hold?": one table and plain sentences generated from the measured analyses.

It reads what `ablate`, `probe`, `importance` and `distill` wrote under a run directory (any of them
may be missing; the verdict says what it lacks) and never states a conclusion the numbers do not give.
The criteria are fixed here and printed with the verdict:

    little loss of quality  the upper end of the 95% CI (over seeds) of hybrid - standard bits per byte is
                            at most QUALITY_TOLERANCE of the standard's (it fails when the lower end exceeds
                            it; between the two, more seeds are needed)
    the MLP does something  the hybrid is measurably better than attention-drop (AANN)
    a large speed gain      cached decode at least SPEED_GAIN times the standard's (batch 1)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from hybrid_gpt.analysis.stats import format_ci, mean_ci
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import JSON_LIMIT, read_json, read_text, write_json, write_text

QUALITY_TOLERANCE = 0.01  # 1% of the standard model's bits per byte
SPEED_GAIN = 1.25
STANDARD, HYBRID, DROP = "AAAA", "AAMM", "AANN"


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
    "probe": ("chance, settings.task, and patterns with pattern and accuracy",
              lambda d: _number(d.get("chance")) and isinstance(d.get("settings"), dict)
              and isinstance(d["settings"].get("task"), str)
              and all(isinstance(p, dict) and isinstance(p.get("pattern"), str) and _interval_of(p.get("accuracy"))
                      for p in _records(d, "patterns"))),
    "importance": ("recommendation with pattern, same_as_deep and deep_pattern",
                   lambda d: isinstance(r := d.get("recommendation"), dict) and isinstance(r.get("pattern"), str)
                   and isinstance(r.get("same_as_deep"), bool) and isinstance(r.get("deep_pattern"), str)),
    "distill": ("arms, each an object whose quality_kept is a number or null",
                lambda d: isinstance(d.get("arms"), dict) and all(
                    isinstance(a, dict) and (a.get("quality_kept") is None or _number(a["quality_kept"]))
                    for a in d["arms"].values())),
}


def _check_shape(name: str, path: Path, data) -> None:
    fields, fits = _SHAPES[name]
    if not (isinstance(data, dict) and fits(data)):
        raise HybridGPTError(f"{path} is damaged: `verdict` needs {fields} (finite numbers); "
                             f"re-run `hybrid-gpt {name}` to rewrite it")


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
    if not found:
        raise HybridGPTError(f"no analyses under {run_dir}: run `hybrid-gpt ablate`, `probe`, `importance` or "
                             "`distill` first (or `hybrid-gpt pipeline --full`)")
    return found


def _variants(found: dict) -> dict[str, dict]:
    return {e["spec"]: e for e in found["ablate"]["data"]["variants"]} if "ablate" in found else {}


def _probe(found: dict) -> dict[str, dict]:
    return {r["pattern"]: r for r in found["probe"]["data"]["patterns"]} if "probe" in found else {}


def _diff(a: dict, b: dict) -> dict:
    """a - b per seed (paired), mean and 95% CI."""
    return mean_ci([x - y for x, y in zip(a["val_bpb"]["values"], b["val_bpb"]["values"])])


def _interval(d: dict) -> str:
    return f" (95% CI [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}])" if d["ci95"] else " (one seed: no interval)"


def _within_noise(d: dict) -> bool:
    return bool(d["ci95"]) and d["ci95"][0] <= 0 <= d["ci95"][1]


def table(found: dict) -> list[dict]:
    variants, probe = _variants(found), _probe(found)
    base = variants.get(STANDARD)
    rows = []
    for spec, e in variants.items():
        p = probe.get(spec)
        rows.append({"pattern": spec, "parameters": e["parameters"], "val_bpb": e["val_bpb"],
                     "bpb_vs_standard": _diff(e, base) if base else None,
                     "probe_accuracy": p["accuracy"] if p else None, "decode_tok_s": e["decode_tok_s"],
                     "decode_vs_standard": e["decode_tok_s"] / base["decode_tok_s"] if base else None,
                     "kv_bytes_per_token": e["kv_bytes_per_token"]})
    for pattern, p in probe.items():  # probe-only patterns still get a row
        if pattern not in variants:
            rows.append({"pattern": pattern, "parameters": None, "val_bpb": None, "bpb_vs_standard": None,
                         "probe_accuracy": p["accuracy"], "decode_tok_s": None, "decode_vs_standard": None,
                         "kv_bytes_per_token": None})
    return rows


def sentences(found: dict) -> list[str]:
    out = []
    variants, probe = _variants(found), _probe(found)
    quality_ok = mlp_matters = speed_ok = quality_state = None
    have_quality = False
    if STANDARD in variants and HYBRID in variants:
        s, h = variants[STANDARD], variants[HYBRID]
        have_quality = True
        d = _diff(h, s)
        tol = QUALITY_TOLERANCE * s["val_bpb"]["mean"]
        hi, lo = (d["ci95"][1], d["ci95"][0]) if d["ci95"] else (d["mean"], d["mean"])
        quality_ok = True if hi <= tol else False if lo > tol else None
        quality_state = {True: "holds", False: "does not hold", None: "cannot be told at this noise"}[quality_ok]
        out.append(f"Quality: {HYBRID} - {STANDARD} = {d['mean']:+.4f} bits per byte{_interval(d)}, "
                   f"{100 * d['mean'] / s['val_bpb']['mean']:+.2f}% of the standard's; the tolerance is "
                   f"{tol:+.4f} ({100 * QUALITY_TOLERANCE:.0f}%), so little loss of quality {quality_state}"
                   + (" (the interval straddles the tolerance: more seeds would tell)" if quality_ok is None else "")
                   + ("" if d["ci95"] else " (one seed: judged on the mean alone)") + ".")
        ratio = h["decode_tok_s"] / s["decode_tok_s"]
        speed_ok = ratio >= SPEED_GAIN
        out.append(f"Speed: cached decode {h['decode_tok_s']:,.0f} vs {s['decode_tok_s']:,.0f} tokens/s = "
                   f"{ratio:.2f}x (batch 1, context {found['ablate']['data']['decode']['context']}); the KV cache is "
                   f"{h['kv_bytes_per_token'] / s['kv_bytes_per_token']:.2f}x the size.")
    if HYBRID in variants and DROP in variants:
        d = _diff(variants[HYBRID], variants[DROP])
        mlp_matters = bool(d["ci95"]) and d["ci95"][1] < 0
        if mlp_matters:
            out.append(f"The per-token MLP earns its place: {HYBRID} - {DROP} = {d['mean']:+.4f} bpb{_interval(d)}.")
        elif d["ci95"] and d["ci95"][0] > 0:
            out.append(f"The per-token MLP is worse than nothing: {HYBRID} - {DROP} = {d['mean']:+.4f} bpb"
                       f"{_interval(d)}; what the hybrid keeps comes from the blocks' feed-forward MLPs, not from a "
                       "static replacement of attention.")
        else:
            out.append(f"The per-token MLP adds nothing measurable: {HYBRID} - {DROP} = {d['mean']:+.4f} bpb"
                       f"{_interval(d)}; dropping the deep attention outright does as well at this budget.")
    if "AA" in variants and HYBRID in variants:
        d = _diff(variants["AA"], variants[HYBRID])
        verdict = ("within noise of" if _within_noise(d) else "better than" if d["mean"] < 0 else "worse than")
        out.append(f"The truncated two-block model AA is {verdict} {HYBRID} ({d['mean']:+.4f} bpb{_interval(d)}).")
    if STANDARD in probe and HYBRID in probe:
        a, b = probe[STANDARD]["accuracy"], probe[HYBRID]["accuracy"]
        chance = found["probe"]["data"]["chance"]
        out.append(f"Token-mixing probe ({found['probe']['data']['settings']['task']}): {STANDARD} "
                   f"{a['mean']:.3f}, {HYBRID} {b['mean']:.3f} accuracy (chance {chance:.3f})"
                   + (f"; {DROP} {probe[DROP]['accuracy']['mean']:.3f}" if DROP in probe else "") + ".")
    if "importance" in found:
        rec = found["importance"]["data"]["recommendation"]
        out.append(f"Layer importance of the trained standard model recommends {rec['pattern']}"
                   + (", the original's choice of the deepest layers." if rec["same_as_deep"] else
                      f", not the deepest layers ({rec['deep_pattern']})."))
    if "distill" in found:
        arms = found["distill"]["data"]["arms"]
        kept = arms.get("distilled", {}).get("quality_kept")
        tuned = arms.get("distilled_finetuned", {}).get("quality_kept")
        if kept is not None:
            after = f", {100 * tuned:.0f}% after the fine-tune." if tuned is not None else "."
            out.append(f"Distilling the deep attention into per-token MLPs recovers {100 * kept:.0f}% of the "
                       "quality that attention-drop loses" + after)
    if have_quality:
        parts = [f"little loss of quality {quality_state}",
                 f"the speed gain is {'large' if speed_ok else 'small'} (criterion: at least {SPEED_GAIN:.2f}x)"]
        if mlp_matters is not None:
            parts.append("the MLP is " + ("measurably better" if mlp_matters else "not measurably better")
                         + " than dropping the attention")
        if quality_ok and speed_ok and mlp_matters is not False:
            status = "holds"
        elif quality_ok is False and not speed_ok:
            status = "does not hold"
        else:
            status = "holds only in part" if (quality_ok or speed_ok) else "is not settled"
        out.append(f"Verdict at this budget: the hypothesis {status} — {'; '.join(parts)}.")
    else:
        out.append("No verdict: it needs the ablation of AAAA and AAMM (`hybrid-gpt ablate`).")
    return out


def render_verdict_markdown(result: dict) -> str:
    L = ["## Does the hypothesis hold?\n",
         "Generated from the analyses below; criteria: little loss of quality = the 95% interval of the hybrid's "
         f"extra bits per byte lies below {100 * QUALITY_TOLERANCE:.0f}% of the standard's; a large speed gain = "
         "cached decode at least "
         f"{SPEED_GAIN:.2f}x; the MLP matters = {HYBRID} measurably better than {DROP}. Sources: "
         + ", ".join(f"`{v}`" for v in result["sources"].values()) + ".\n",
         "| pattern | parameters | val bpb | vs AAAA | probe accuracy | decode tok/s | vs AAAA | KV B/token |",
         "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    def num(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for r in result["table"]:
        d = r["bpb_vs_standard"]
        cells = [r["pattern"], num(r["parameters"], ","), format_ci(r["val_bpb"]), num(d and d["mean"], "+.4f"),
                 format_ci(r["probe_accuracy"], 3), num(r["decode_tok_s"], ",.0f"),
                 num(r["decode_vs_standard"], ".2f") + ("x" if r["decode_vs_standard"] else ""),
                 num(r["kv_bytes_per_token"], ",")]
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    L += [f"- {s}" for s in result["sentences"]]
    return "\n".join(L) + "\n"


def write_verdict(run_dir: str | Path) -> dict:
    """hypothesis.json and hypothesis.md in ``run_dir``: the verdict, then each analysis's own section
    (its plots linked from their subdirectories)."""
    run_dir = Path(run_dir)
    outputs = run_dir / "hypothesis.json", run_dir / "hypothesis.md"
    for path in outputs:  # before either is written: one refused after the other was written leaves a mix
        if os.path.lexists(path) and not path.is_file():
            raise HybridGPTError(f"{path} exists and is not a regular file; it is left untouched (move it away)")
    found = collect(run_dir)
    result = {"sources": {k: v["path"] for k, v in found.items()}, "table": table(found),
              "sentences": sentences(found)}
    sections = [render_verdict_markdown(result)]
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
