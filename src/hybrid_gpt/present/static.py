"""The staticness map's page (analysis/static.py measures it): its tables, its sentence and its plots, from
static.json's data alone."""

from __future__ import annotations

from pathlib import Path

from hybrid_gpt.fsutil import write_json, write_text
from hybrid_gpt.present.plots import save_plot
from hybrid_gpt.present.tables import markdown_table

LABELS = {"zero": "zero (drop)", "constant": "constant (training mean)", "linear": "linear (ridge)"}


def label(name: str) -> str:
    return LABELS.get(name, f"MLP, width {name[3:]}" if name.startswith("mlp") else name)


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def best_per_token(row: dict) -> float | None:
    """The most any per-token predictor explains of this layer's output (zero and constant included)."""
    values = [v for v in row["r2"].values() if v is not None]
    return max(values) if values else None


def map_sentence(result: dict, deep_from: int | None = None) -> str:
    """One sentence: at most how much of the deep layers' attention output a per-token function explains.
    ``deep_from`` (a layer number): the first layer counted as deep, default the deeper third."""
    rows = [r for r in result["layers"] if best_per_token(r) is not None]
    if not rows:
        return "The staticness map has no finished layer yet."
    numbers = [r["layer"] for r in rows]
    if deep_from is None:
        deep_from = numbers[len(numbers) * 2 // 3] if len(numbers) > 2 else numbers[0]
    deep = [r for r in rows if r["layer"] >= deep_from]
    top = max(deep, key=best_per_token)
    mean = sum(best_per_token(r) for r in deep) / len(deep)
    fitted = sorted({int(n[3:]) for r in deep for n in r["r2"] if n.startswith("mlp")})
    predictors = "ridge" + (f" and MLPs up to width {fitted[-1]:,}" if fitted else "")
    return (f"In layers {deep[0]['layer']}-{deep[-1]['layer']}, the best per-token predictor fitted ({predictors}) "
            f"explains at most {100 * best_per_token(top):.0f}% of an attention layer's output (layer "
            f"{top['layer']}; {100 * mean:.0f}% on average), on {result['eval_tokens']:,} held-out tokens at context "
            f"{result['context']:,}: what a per-token replacement of these layers can be expected to keep.")


def render_markdown(result: dict) -> str:
    names = [n for n in ("zero", "constant", "linear", *(f"mlp{w}" for w in result["widths"]))]
    short = result.get("short_context")
    headers = ["layer", *[label(n) for n in names]] + ([f"linear at {short:,}"] if short else [])
    rows = []
    for r in result["layers"]:
        cells = [str(r["layer"]), *[_num(r["r2"].get(n)) for n in names]]
        if short:
            cells.append(_num(r.get("r2_short", {}).get("linear")))
        rows.append(cells)
    fits = []
    for r in result["layers"]:
        for name, f in r["fits"].items():
            fits.append([str(r["layer"]), label(name), f"{f['params']:,}", f"{f['best_epoch']:.1f}",
                         f"{f['epochs']:.1f}", "yes" if f["stopped_early"] else "no (hit the epoch cap)",
                         f"{f['seconds']:.0f}"])
    lines = [
        "# Staticness map: how much of each attention layer's output is a per-token function",
        "",
        f"Checkpoint `{result['checkpoint']}` (pattern of {len(result['pattern'])} blocks). "
        f"For every attention layer, R^2 on {result['eval_tokens']:,} held-out tokens (windows of "
        f"{result['context']:,} tokens spread over the whole held-out split) of predictors of the layer's output "
        f"from its own token's input u = ln_1(x), fitted on {result['fit_tokens']:,} training-split tokens; the "
        f"MLPs stop when the MSE on {result['stop_tokens']:,} further training-split tokens stops improving. "
        "R^2 = 1 - residual / total sum of squares over every output dimension, the total about the held-out "
        "tokens' own mean: the training mean scores about 0, dropping the layer (predicting zero) below it.",
        "",
        map_sentence(result),
        "",
    ]
    if not result.get("complete", True):
        lines += ["**Unfinished:** the map is still running; the missing cells are fits not yet done.", ""]
    lines += [markdown_table(headers, rows), "", "![R^2 by layer](static-r2.png)", ""]
    if fits:
        lines += ["## The MLP fits", "",
                  "Learning curves (the stopping slice's R^2 per half epoch): ![curves](static-curves.png)", "",
                  markdown_table(["layer", "predictor", "parameters", "best epoch", "epochs run", "stopped early",
                                  "seconds"], fits), ""]
    lines += [f"Wall time of the fits and captures: {result['elapsed_s'] / 60:.0f} min.", ""]
    return "\n".join(lines)


def plot_r2(result: dict, path: Path) -> str:
    names = ["constant", "linear", *(f"mlp{w}" for w in result["widths"])]
    layers = [r["layer"] for r in result["layers"]]

    def draw(plt):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name in names:
            ys = [r["r2"].get(name) for r in result["layers"]]
            if any(y is not None for y in ys):
                ax.plot(layers, [float("nan") if y is None else y for y in ys], marker="o", ms=3, label=label(name))
        if result.get("short_context"):
            ys = [r.get("r2_short", {}).get("linear") for r in result["layers"]]
            ax.plot(layers, [float("nan") if y is None else y for y in ys], ls="--", color="gray",
                    label=f"linear at context {result['short_context']:,}")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xlabel("attention layer")
        ax.set_ylabel("held-out R^2 of the layer's output")
        ax.set_ylim(min(-0.05, ax.get_ylim()[0]), 1.0)
        ax.set_title(f"How much of each attention layer is a per-token function (context {result['context']:,})")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        return fig

    return save_plot(path, draw)


def plot_curves(result: dict, path: Path) -> str:
    widths = [w for w in result["widths"] if any(f"mlp{w}" in r["fits"] for r in result["layers"])]

    def draw(plt):
        import matplotlib

        fig, axes = plt.subplots(1, max(1, len(widths)), figsize=(4.5 * max(1, len(widths)), 4), squeeze=False)
        cmap = matplotlib.colormaps["viridis"]
        n = max(1, len(result["layers"]) - 1)
        for ax, w in zip(axes[0], widths):
            for i, r in enumerate(result["layers"]):
                fit = r["fits"].get(f"mlp{w}")
                if fit:
                    ax.plot([p["epoch"] for p in fit["curve"]], [p["r2_stop"] for p in fit["curve"]],
                            color=cmap(i / n), lw=1)
            ax.set_title(f"MLP width {w}: stopping-slice R^2")
            ax.set_xlabel("epoch")
            ax.set_ylim(-0.05, 1.0)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("R^2 (colour: layer, dark = first)")
        return fig

    return save_plot(path, draw)


def write_outputs(result: dict, out: Path) -> list[str]:
    """static.json, static.md and the plots into ``out``; returns the plots' names."""
    plots = [plot_r2(result, out / "static-r2.png")]
    if any(r["fits"] for r in result["layers"]):
        plots.append(plot_curves(result, out / "static-curves.png"))
    write_json(out / "static.json", {**result, "plots": plots})
    write_text(out / "static.md", render_markdown(result))
    return plots
