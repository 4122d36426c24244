"""Layer importance, presented (analysis/importance.py measures it): its page and its plot, from importance.json's
data alone."""

from __future__ import annotations

from pathlib import Path

from hybrid_gpt.fsutil import write_json, write_text
from hybrid_gpt.present.plots import save_plot
from hybrid_gpt.present.tables import markdown_table


def plot_importance(result: dict, path: Path) -> str:
    """Per attention layer: how much it turns the residual stream, and the loss increase when it is dropped or
    replaced by its mean output."""
    rows = result["per_layer"]
    labels = [str(r["layer"]) for r in rows]
    x = list(range(len(rows)))

    def draw(plt):
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        left.bar(x, [1.0 - r["similarity"] for r in rows], color="tab:blue")
        left.set_title("1 - cos(residual before, after attention)")
        left.set_ylabel("higher: the layer changes the stream more")
        width = 0.4
        for offset, kind, color in ((-width / 2, "drop", "tab:red"), (width / 2, "mean", "tab:green")):
            right.bar([i + offset for i in x], [r[kind]["loss_increase"] for r in rows], width, color=color,
                      label={"drop": "dropped (acts as N)", "mean": "replaced by its mean output"}[kind])
        right.axhline(0.0, color="black", linewidth=0.8)
        right.set_title("validation loss increase")
        right.set_ylabel("nats/token")
        right.legend()
        for ax in (left, right):
            ax.set_xticks(x, labels)
            ax.set_xlabel(f"attention layer (pattern {result['layers']})")
        fig.suptitle(f"Layer importance: {Path(result['checkpoint']).name}")
        fig.tight_layout()
        return fig

    return save_plot(path, draw)


def _layers_text(layers: list[int]) -> str:
    return ", ".join(str(n) for n in layers)


def _plural(k: int) -> str:
    return "s" if k > 1 else ""


def _per_layer(result: dict) -> list[str]:
    """What was measured, and the table of every attention layer."""
    intact = result["intact"]
    context = result.get("settings", {}).get("context")
    rows = [[str(r["layer"]), f"{r['similarity']:.4f}", f"{r['drop']['loss']:.4f}",
             f"{r['drop']['loss_increase']:+.4f}", f"{r['drop']['bpb_increase']:+.4f}", f"{r['mean']['loss']:.4f}",
             f"{r['mean']['loss_increase']:+.4f}", f"{r['mean']['bpb_increase']:+.4f}"] for r in result["per_layer"]]
    return [
        f"Over {intact['tokens']:,} validation tokens ({intact['bytes']:,} bytes) of {result['data']['source']}"
        + (f" in windows of {context:,} tokens" if context else "") + ", "
        f"the intact model's loss is {intact['loss']:.4f} nats/token ({intact['bpb']:.4f} bits per byte). "
        "Each attention layer in turn is dropped (its block acts as `N`) or replaced by its mean output "
        "vector over these same tokens, at inference and without retraining. Similarity is the mean cosine "
        "between the residual stream before and after the attention sub-layer (He et al. 2024); "
        "near 1 means the layer barely changes the stream.",
        "",
        markdown_table(["layer", "cosine before/after", "drop: loss", "drop: increase", "drop: bpb increase",
                        "mean: loss", "mean: increase", "mean: bpb increase"], rows, padded=True),
        "", "Loss in nats/token; increases are over the intact model.", ""]


def _rankings(result: dict) -> list[str]:
    """The three orders from least to most important, whether they agree, and what the mean output saves."""
    rank, rows, k = result["ranking"], result["per_layer"], result["recommendation"]["k"]
    agree = "agree" if rank["orders_agree"] else "disagree"
    rho = f" (Spearman rank correlation {rank['spearman']:+.2f})" if rank["spearman"] is not None else ""
    cheaper = sum(r["mean"]["loss_increase"] < r["drop"]["loss_increase"] for r in rows)
    return [
        f"From least to most important, by similarity: layers {_layers_text(rank['by_similarity'])}; "
        f"by the drop loss increase: {_layers_text(rank['by_drop'])}; by the mean-output loss increase: "
        f"{_layers_text(rank['by_mean'])}. The similarity and drop orders {agree}{rho}, and they "
        f"{'pick the same' if rank['least_important_agree'] else 'pick different'} {k} least important "
        f"layer{_plural(k)}.",
        "", f"Replacing a layer's attention by its mean output costs less than dropping it in {cheaper} of "
            f"{len(rows)} attention layers."]


def _recommendation(result: dict) -> list[str]:
    """The recommended pattern against the deepest layers', both replaced together."""
    rec = result["recommendation"]
    k, joint = rec["k"], rec["joint"]
    sets = [("recommended", rec["replace"], rec["pattern"])]
    if not rec["same_as_deep"]:
        sets.append(("deep", rec["deep_replace"], rec["deep_pattern"]))
    rows = [[_layers_text(layers), f"`{pattern}`", f"{joint[key]['drop']['loss_increase']:+.4f}",
             f"{joint[key]['mean']['loss_increase']:+.4f}"] for key, layers, pattern in sets]
    lines = [
        "",
        f"**Recommended pattern: `{rec['pattern']}`**: replace layer{_plural(k)} "
        f"{_layers_text(rec['replace'])} by `M`, the {k} attention layer{_plural(k)} whose drop costs "
        f"least. The original hybrid's rule, replacing the deepest {k}, gives `{rec['deep_pattern']}` "
        + ("(the same layers)." if rec["same_as_deep"] else f"(layers {_layers_text(rec['deep_replace'])})."),
        "",
        markdown_table(["layers replaced", "pattern", "all dropped: loss increase", "all by their mean: loss increase"],
                       rows, padded=True)]
    if not rec["same_as_deep"]:
        diff = joint["deep"]["drop"]["loss_increase"] - joint["recommended"]["drop"]["loss_increase"]
        better = "recommended" if diff > 0 else "deepest-layers"
        lines += ["", f"Dropped together, the {better} choice costs {abs(diff):.4f} nats/token less."]
    return lines


def render_importance_markdown(result: dict) -> str:
    """The report section, built from the result dict alone."""
    lines = [f"## Layer importance: {Path(result['checkpoint']).name} ({result['layers']})", "",
             *_per_layer(result), *_rankings(result), *_recommendation(result)]
    lines += [
        "",
        "These are inference-time interventions on one trained model: they measure what each layer does "
        "in this model, not the loss a hybrid trained with `M` in those layers would reach.",
        "",
        f"![layer importance]({result['plot']})",
        "",
    ]
    return "\n".join(lines)


def write_outputs(result: dict, out: Path) -> None:
    """importance-layers.png (named in ``result["plot"]``), importance.json and importance.md into ``out``."""
    result["plot"] = plot_importance(result, out / "importance-layers.png")
    write_json(out / "importance.json", result)
    write_text(out / "importance.md", render_importance_markdown(result))
