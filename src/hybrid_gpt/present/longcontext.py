"""Decode speed against context, presented (analysis/longcontext.py measures it): the plot of the measured and the
predicted speedup (log x) and the tables of the crossings, from its summaries alone."""

from __future__ import annotations

from pathlib import Path

from hybrid_gpt.present.plots import save_plot
from hybrid_gpt.present.tables import markdown_table
from hybrid_gpt.stats import format_ratio


def _levels(summaries: dict[str, dict]) -> list[float]:
    """The speedup levels the summaries' crossings were sought at (their keys, "1.25" and "1.5")."""
    return sorted({float(level) for s in summaries.values() for b in s["batches"].values() for level in b["crossings"]})


def plot_speed_context(summaries: dict[str, dict], path: Path) -> str | None:
    """Measured (markers, 95% intervals) and predicted (lines) decode speedup of each result's pair against
    context, log x, one panel per batch size, one colour per shape; the levels of the crossings as dotted lines.
    None (no plot) when no result has a pair to show."""
    batches = sorted({int(b) for s in summaries.values() for b in s["batches"]})
    if not batches:
        return None
    pairs = sorted({str(s.get("pair")) for s in summaries.values() if s["batches"]})
    levels = _levels(summaries)

    def draw(plt):
        fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), squeeze=False)
        for ax, batch in zip(axes[0], batches):
            for i, (shape, s) in enumerate(summaries.items()):
                b = s["batches"].get(str(batch))
                if not b:
                    continue
                colour = f"C{i}"
                xs = [p["context"] for p in b["series"]]
                ys = [p["ratio"] for p in b["series"]]
                lo = [p["ratio"] - p["ci95"][0] if p["ci95"] else 0 for p in b["series"]]
                hi = [p["ci95"][1] - p["ratio"] if p["ci95"] else 0 for p in b["series"]]
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", color=colour, capsize=3,
                            label=f"{shape} ({s.get('pair')}): measured ({s['weights']} weights)")
                if b["prediction"]:
                    ax.plot([p["context"] for p in b["prediction"]], [p["predicted"] for p in b["prediction"]],
                            "--", color=colour, label=f"{shape}: predicted (roofline)")
            for level in levels:
                ax.axhline(level, color="grey", linestyle=":", linewidth=1)
            ax.axhline(1.0, color="black", linewidth=0.5)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel(f"{pairs[0] if len(pairs) == 1 else 'first / second'} cached decode speed")
            ax.set_title(f"batch {batch}")
            ax.legend(fontsize=7)
        return fig

    return save_plot(path, draw)


def _context(v: int | None) -> str:
    return f"{v:,}" if v else "not within the contexts measured"


def render_markdown(summaries: dict[str, dict], plot: str | None = None) -> str:
    """A table per shape and batch of measured (95% CI) and predicted speedups, and the crossing contexts."""
    L = ["## Decode speed against context\n"]
    if plot:
        L.append(f"![speed vs context]({plot})\n")
    for shape, s in summaries.items():
        if s.get("weights_note"):
            L.append(f"`{shape}`: {s['weights_note']}.\n")
        if not s["batches"]:
            L.append(f"`{shape}`: no speedup between two float32 models to show.\n")
        for batch, b in s["batches"].items():
            rows = [[f"{p['context']:,}", format_ratio(p), f"{p['predicted']:.2f}x" if p.get("predicted") else "-"]
                    for p in b["series"]]
            L += [f"**{shape}, {s.get('pair')}, batch {batch}** ({s['weights']} weights):\n",
                  markdown_table(["context", "measured (95% CI)", "predicted"], rows, padded=True), ""]
            L += [f"- reaches {level}x: measured at about {_context(c['estimate'])} (interval clear of it from "
                  f"{_context(c['clears_from'])}); predicted from {_context(c['predicted'])}"
                  for level, c in b["crossings"].items()]
            L.append("")
    return "\n".join(L) + "\n"
