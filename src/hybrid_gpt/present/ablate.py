"""The ablation's pages: its plots (quality against speed, bits per byte, learning curves, differences against
the budget) and its markdown, from the dict analysis/ablate.py returns (the one it writes as ablate.json)."""

from __future__ import annotations

from pathlib import Path

from hybrid_gpt.present.plots import save_plot
from hybrid_gpt.stats import format_ci


def plot_ablate(result: dict, out: Path) -> dict:

    variants = result["variants"]

    def err(e):
        ci = e["val_bpb"]["ci95"]
        return 0.0 if not ci else (ci[1] - ci[0]) / 2

    def pareto(plt):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for e in variants:
            ax.errorbar(e["decode_tok_s"], e["val_bpb"]["mean"], yerr=err(e), fmt="o", capsize=4)
            ax.annotate(e["spec"], (e["decode_tok_s"], e["val_bpb"]["mean"]), textcoords="offset points",
                        xytext=(6, 4), fontsize=9)
        ax.set_xlabel(f"cached decode tokens/s (batch 1, context {result['decode']['context']})")
        ax.set_ylabel("validation bits per byte (lower is better)")
        ax.set_title(f"Quality vs speed ({result['budget']} budget, {len(result['seeds'])} seed(s), 95% CI)")
        ax.grid(alpha=0.3)
        return fig

    def bars(plt):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        xs = range(len(variants))
        ax.bar(xs, [e["val_bpb"]["mean"] for e in variants], yerr=[err(e) for e in variants], capsize=4,
               color="tab:blue", alpha=0.8)
        ax.set_xticks(list(xs), [e["spec"] for e in variants], rotation=20)
        lo = min(e["val_bpb"]["mean"] - err(e) for e in variants)
        hi = max(e["val_bpb"]["mean"] + err(e) for e in variants)
        ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
        ax.set_ylabel("validation bits per byte")
        ax.set_title("Bits per byte per pattern (mean, 95% CI)")
        return fig

    plots = {"pareto": save_plot(out / "ablate-pareto.png", pareto), "bpb": save_plot(out / "ablate-bpb.png", bars)}
    if result.get("curves"):
        plots["curves"] = plot_curves(result, out)
    if any(g["points"] for g in result.get("gaps", [])):
        plots["gaps"] = plot_gaps(result, out)
    return plots


def plot_gaps(result: dict, out: Path) -> str:
    """ablate-gaps.png: each question's difference (other - base bpb, paired by seed) against training tokens, in
    its 95% band, with the tolerance it must clear."""
    def draw(plt):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for g in result["gaps"]:
            if not g["points"]:
                continue
            x = [p["tokens"] for p in g["points"]]
            mean = [p["difference"]["mean"] for p in g["points"]]
            line, = ax.plot(x, mean, "o-", markersize=3, label=f"{g['other']} - {g['base']}")
            lo = [p["difference"]["ci95"][0] if p["difference"]["ci95"] else m for p, m in zip(g["points"], mean)]
            hi = [p["difference"]["ci95"][1] if p["difference"]["ci95"] else m for p, m in zip(g["points"], mean)]
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
        tol = [(p["tokens"], p["tolerance"]) for g in result["gaps"][:1] for p in g["points"]]
        if tol:
            ax.plot([t for t, _ in tol], [v for _, v in tol], "k--", linewidth=1, label="tolerance (1% of base)")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("difference in validation bits per byte")
        ax.set_title(f"Differences against the budget ({len(result['seeds'])} seed(s), paired; 95% CI band)",
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return fig

    return save_plot(out / "ablate-gaps.png", draw)


def gap_table(gaps: list[dict]) -> list[str]:
    """The differences against the budget as markdown: one row per question, one column per evaluation."""
    steps = sorted({p["step"] for g in gaps for p in g["points"]})
    if not steps:
        return []
    tokens = {p["step"]: p["tokens"] for g in gaps for p in g["points"]}
    L = ["| difference (bpb) | " + " | ".join(f"{tokens[s]:,} tokens" for s in steps) + " |",
         "| --- |" + " --- |" * len(steps)]
    for g in gaps:
        at = {p["step"]: p for p in g["points"]}
        cells = [(format_ci(at[s]["difference"], signed=True) + (" **clear**" if at[s]["clear"] else ""))
                 if s in at else "-" for s in steps]
        L.append(f"| {g['other']} - {g['base']} | " + " | ".join(cells) + " |")
    return L


def plot_curves(result: dict, out: Path) -> str:
    """ablate-curves.png: validation bpb against step, one line per pattern (mean over seeds) in a 95% band."""
    spec = {e["slug"]: e["spec"] for e in result["variants"]}

    def draw(plt):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for slug, c in result["curves"].items():
            line, = ax.plot(c["steps"], c["mean"], "o-", markersize=3, label=spec.get(slug, slug))
            lo = [ci[0] if ci else m for ci, m in zip(c["ci95"], c["mean"])]
            hi = [ci[1] if ci else m for ci, m in zip(c["ci95"], c["mean"])]
            ax.fill_between(c["steps"], lo, hi, color=line.get_color(), alpha=0.2)
            f = c.get("final")
            if f:
                err = [[f["mean"] - f["ci95"][0]], [f["ci95"][1] - f["mean"]]] if f["ci95"] else None
                ax.errorbar([f["step"]], [f["mean"]], yerr=err, fmt="*", markersize=9, capsize=4,
                            color=line.get_color())
        ax.set_xlabel("step")
        ax.set_ylabel("validation bits per byte (lower is better)")
        ax.set_title(f"Learning curves ({len(result['seeds'])} seed(s): mean, 95% CI band; star: final "
                     "evaluation, on more tokens)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return fig

    return save_plot(out / "ablate-curves.png", draw)


def power_table(power: list[dict], seeds: int) -> list[str]:
    """The power lines as markdown: is the interval of each difference clear of the tolerance, and if not,
    how many seeds would make it so."""
    L = ["| question | difference (bpb) | half-width now | tolerance (1% of base) | decided | "
         "seeds to decide (80% power) |",
         "| --- | --- | --- | --- | --- | --- |"]
    for p in power:
        half = "-" if p["half_width"] is None else f"{p['half_width']:.4f}"
        needed = (p["seeds_needed"] if p["seeds_needed"] is not None else
                  "unknown (one seed has no spread)" if seeds < 2 else "over 1000 (the mean is at the tolerance)")
        L.append(f"| {p['other']} - {p['base']} | {format_ci(p['difference'], signed=True)} | {half} | "
                 f"{p['tolerance']:.4f} | {'yes' if p['decided'] else 'no'} | {needed} |")
    return L


def render_ablate_markdown(result: dict) -> str:
    seeds = result["seeds"]
    budget = (f"equal optimizer steps ({result['steps']} each)" if result["budget"] == "steps" else
              f"equal wall-clock time (the time {result['calibration']['reference']} takes for "
              f"{result['calibration']['reference_steps']} steps; step counts from training rates measured side "
              "by side)")
    L = ["## Ablations: which layers, and is the MLP doing anything?\n",
         f"Preset `{result['preset']}`, budget: {budget}; seeds {', '.join(map(str, seeds))}. Bits per byte on the "
         "validation plays: mean ± half-width of a 95% CI over seeds (Student's t)"
         + ("" if len(seeds) > 1 else "; one seed gives no interval") + ". Decode: cached, batch 1, median of "
         f"{result['decode']['repeats']} interleaved repeats (seed {result['decode']['seed']}'s models).\n",
         "| pattern | M hidden | parameters | KV cache B/token | steps | val bpb | train s | decode tok/s |",
         "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in result["variants"]:
        L.append(f"| {e['spec']} | {e['mlp_hidden'] or '-'} | {e['parameters']:,} | {e['kv_bytes_per_token']:,} | "
                 f"{e['steps']} | {format_ci(e['val_bpb'])} | {e['train_seconds']['mean']:.0f} | "
                 f"{e['decode_tok_s']:,.0f} |")
    L.append("")
    L += [f"- {s}" for s in result["sentences"]]
    L.append("")
    if result.get("power"):
        share = 100 * result["tolerance_fraction"]
        L.append(f"Power: each difference's 95% interval over {len(seeds)} seed(s) against the tolerance it must "
                 f"resolve ({share:.0f}% of the base's bits per byte, the verdict's), and the "
                 "seeds that would resolve it with 80% power at the spread seen between seeds (a count to fix before "
                 "a new run, not to top this one up: adding seeds until an interval decides is optional "
                 "stopping).\n")
        L += power_table(result["power"], len(seeds))
        L.append("")
    if result.get("gaps") and gap_table(result["gaps"]):
        L.append("Differences against the training budget: other - base validation bits per byte at each periodic "
                 "evaluation, paired by seed (95% t-interval over seeds); **clear**: the interval lies wholly above "
                 "the tolerance. AA - AAAA is the testbed's own check: a testbed where the half-depth model is "
                 "not clearly worse cannot see what the deep layers do.\n")
        L += gap_table(result["gaps"])
        L.append("")
        if "gaps" in result["plots"]:
            L.append(f"![differences against the budget]({result['plots']['gaps']})\n")
    L.append(f"![quality vs speed]({result['plots']['pareto']})\n\n![bits per byte]({result['plots']['bpb']})\n")
    if "curves" in result["plots"]:
        L.append("Learning curves: validation bits per byte at each periodic evaluation, mean over seeds in a 95% "
                 "band; the star is the final evaluation (the table's figure), on more validation tokens than the "
                 "periodic ones, so it is not joined to the line.\n")
        L.append(f"![learning curves]({result['plots']['curves']})\n")
    return "\n".join(L) + "\n"
