"""The verdict's page, "Does the hypothesis hold?": its table of patterns and its per-context table, from the
data analysis/verdict.py gathers, and the words its judgements are shown by."""

from __future__ import annotations

from hybrid_gpt.stats import format_ci, format_ratio

NOT_MEASURED = "not measured"
STATES = {True: "holds", False: "does not hold", None: "cannot be told", NOT_MEASURED: NOT_MEASURED}


def render_verdict_markdown(result: dict, criteria: dict) -> str:
    """hypothesis.md's verdict section from what analysis/verdict.py found (``result``: sources, table,
    sentences, per_context) and the criteria it judged by (its CRITERIA)."""
    tolerance, gain = criteria["quality_tolerance"], criteria["speed_gain"]
    STANDARD, HYBRID, DROP = criteria["standard"], criteria["hybrid"], criteria["drop"]
    ctx = result.get("per_context")
    tasks = list(dict.fromkeys(t for r in result["table"] for t in r["probe_accuracy"]))
    L = ["## Does the hypothesis hold?\n"]
    if ctx:
        L.append(f"**The hypothesis {ctx['answer']['text']}.**\n")
    L += ["Generated from the analyses below; criteria: little loss of quality = the 95% interval of the hybrid's "
          f"extra bits per byte lies below {100 * tolerance:.0f}% of the standard's; a large speed gain = "
          f"the 95% interval of its cached decode speedup (batch 1) lies above {gain:.2f}x; "
          f"the MLP matters = {HYBRID} measurably better than {DROP}. Each is judged holds, does not hold, or "
          "cannot be told (the interval straddles the criterion, or there is none). Sources: "
          + ", ".join(f"`{v}`" for v in result["sources"].values()) + ".\n",
          "| pattern | parameters | val bpb | vs AAAA | " + "".join(f"probe: {t} | " for t in tasks)
          + "decode tok/s | vs AAAA | KV B/token |", "| --- " * (7 + len(tasks)) + "|"]

    def num(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for r in result["table"]:
        d = r["bpb_vs_standard"]
        cells = [r["pattern"], num(r["parameters"], ","), format_ci(r["val_bpb"]), num(d and d["mean"], "+.4f"),
                 *(format_ci(r["probe_accuracy"].get(t), 3) for t in tasks), num(r["decode_tok_s"], ",.0f"),
                 format_ratio(r["decode_vs_standard"]),
                 num(r["kv_bytes_per_token"], ",")]
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    if ctx and ctx["rows"]:
        d = ctx["quality_cost_bpb"]
        L += [f"Per context, like with like (quality: {HYBRID} - {STANDARD} bits per byte of the trained models, "
              f"measured at context {ctx['quality_context']:,}, tolerance {ctx['tolerance_bpb']:.4f}; speed: "
              "hybrid/standard cached decode at batch 1, 95% interval over paired repeats; a row pairs the two only "
              "where both were measured on the same trained models at its context):\n",
              "| context | weights | quality cost (95% CI) | little loss | decode speedup (95% CI) | predicted | "
              "large gain | verdict |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in ctx["rows"]:
            measured = r["quality_context"] is not None
            L.append(f"| {r['context']:,} | {r['weights']} | "
                     f"{format_ci(d, signed=True) if measured else NOT_MEASURED} | {STATES[r['quality']]} | "
                     f"{format_ratio({'ratio': r['ratio'], 'ci95': r['ci95']})} | "
                     f"{num(r['predicted'], '.2f') + ('x' if r['predicted'] else '')} | {STATES[r['speed']]} | "
                     f"{STATES[r['state']]} |")
        L.append("")
    L += [f"- {s}" for s in result["sentences"]]
    return "\n".join(L) + "\n"
