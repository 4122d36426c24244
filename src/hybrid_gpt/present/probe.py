"""The token-mixing probe, presented (analysis/probe.py measures it): its page and its plots, from probe.json's
data alone."""

from __future__ import annotations

from pathlib import Path

from hybrid_gpt.fsutil import write_json, write_text
from hybrid_gpt.present.plots import save_plot
from hybrid_gpt.present.tables import markdown_table
from hybrid_gpt.stats import format_ci

TASK_NAMES = {"recall": "associative recall (query a key, answer its value)",
              "two-hop": "two-hop associative recall (a -> b, b -> v; query a, answer v)"}
# Each judgement of a pattern (analysis/probe.py's JUDGEMENTS), in words, in the order the page lists them.
JUDGEMENT_TEXT = {"learns": "learns it (every seed learned)", "does not learn": "does not learn it (no seed learned)",
                  "unstable": "unstable (some seeds learned, some did not)"}


def plot_accuracy(result: dict, out: Path) -> str:
    """One panel per task: mean accuracy (95% interval over seeds), each seed, chance and the learned threshold."""

    def draw(plt):
        blocks = list(result["tasks"].values())
        rows0 = blocks[0]["patterns"]
        fig, axes = plt.subplots(1, len(blocks), figsize=(len(blocks) * (1.2 * len(rows0) + 3), 4), squeeze=False)
        for ax, block in zip(axes[0], blocks):
            rows = block["patterns"]
            xs = range(len(rows))
            means = [r["accuracy"]["mean"] for r in rows]
            err = [[m - (r["accuracy"]["ci95"] or [m, m])[0] for m, r in zip(means, rows)],
                   [(r["accuracy"]["ci95"] or [m, m])[1] - m for m, r in zip(means, rows)]]
            ax.bar(xs, means, yerr=err, capsize=4, color="tab:blue", alpha=0.8)
            for x, r in zip(xs, rows):
                ax.plot([x] * len(r["runs"]), [s["accuracy"] for s in r["runs"]], "k.", alpha=0.6)
            ax.axhline(block["chance"], color="tab:red", ls="--", label=f"chance ({block['chance']:.3f})")
            ax.axhline(block["in_context_chance"], color="tab:gray", ls=":",
                       label=f"guess a value in context ({block['in_context_chance']:.3f})")
            ax.axhline(block["learned_threshold"], color="tab:green", ls="-.", lw=0.8,
                       label=f"learned ({block['learned_threshold']:.3f})")
            ax.set_xticks(list(xs), [r["pattern"] for r in rows])
            ax.set_ylim(0, 1)
            ax.set_ylabel("held-out accuracy")
            ax.set_title(f"{block['task']} probe, {block['settings']['steps']} steps per pattern")
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=8)
        return fig
    return save_plot(out / "probe-accuracy.png", draw)


def plot_position_loss(result: dict, out: Path) -> str:
    """Loss by position of each checkpoint (raw and bucket means), and each gap to its baseline with its interval."""
    pl = result["position_loss"]

    def draw(plt):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for label, m in pl["models"].items():
            # Each position averages only a few hundred tokens: the raw curve is noisy, the bucket means are not.
            line, = axes[0].plot(range(len(m["curve"])), m["curve"], alpha=0.3)
            centers = [(b["lo"] + b["hi"] - 1) / 2 for b in m["buckets"]]
            axes[0].plot(centers, [b["loss"] for b in m["buckets"]], "o-", color=line.get_color(),
                         label=f"{label} ({m['layers']}), bucket means")
        axes[0].set_xlabel("position in the context window")
        axes[0].set_ylabel("validation loss (nats/token)")
        for label, g in pl["gaps"].items():
            centers = [(b["lo"] + b["hi"] - 1) / 2 for b in g["buckets"]]
            means = [c["mean"] for c in g["bucket_ci"]]
            err = [[m - (c["ci95"] or [m, m])[0] for m, c in zip(means, g["bucket_ci"])],
                   [(c["ci95"] or [m, m])[1] - m for m, c in zip(means, g["bucket_ci"])]]
            axes[1].errorbar(centers, means, yerr=err, fmt="o-", capsize=3, label=f"{label} - {g['vs']} (95% CI)")
        axes[1].axhline(0, color="gray", lw=0.8)
        axes[1].set_xlabel("position (bucket centre)")
        axes[1].set_ylabel("loss gap (nats/token)")
        for ax in axes:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        return fig
    return save_plot(out / "probe-position-loss.png", draw)


def _task_description(block: dict) -> str:
    s, spec = block["settings"], block["settings"]["spec"]
    links = (f", with {spec['n_links']} one-hop queries (k, answer its pair's second token) mixed in and trained on "
             "but not scored" if spec.get("n_links") else "")
    return (f"**{block['task']}**: {TASK_NAMES[block['task']]}, {spec['n_pairs']} pairs then {spec['n_queries']} "
            f"scored queries per sequence{links}; {spec['n_keys']} keys, {spec['n_values']} values (sequence "
            f"length {s['seq_len']}). AdamW at lr {s['lr']:g} for {s['steps']} steps of {s['batch_size']} sequences; "
            f"accuracy over the scored answers of {s['eval_examples']:,} held-out sequences. Chance is "
            f"{block['chance']:.3f}; guessing among the values in the sequence gives {block['in_context_chance']:.3f}; "
            f"a seed has learned the task at {block['learned_threshold']:.3f} or more.")


def _judgement_sentences(block: dict) -> list[str]:
    rows = block["patterns"]
    top = max(r["accuracy"]["mean"] for r in rows)
    best = [r["pattern"] for r in rows if f"{r['accuracy']['mean']:.3f}" == f"{top:.3f}"]
    lines = [f"{block['task']}: best {', '.join(best)} at {top:.3f}."]
    for judgement, text in JUDGEMENT_TEXT.items():
        group = [r["pattern"] for r in rows if r["judgement"] == judgement]
        if group:
            lines.append(f"{block['task']}: {text}: {', '.join(group)}.")
    return lines


def _accuracy_table(blocks: dict) -> str:
    """One row per pattern: per task its accuracy, each seed's, its judgement (and its one-hop queries')."""
    first = next(iter(blocks.values()))
    header = ["pattern", "attention layers", "params"]
    for name, b in blocks.items():
        header += [f"{name} accuracy", f"{name} per seed", f"{name} judgement"]
        header += [f"{name}: its one-hop queries"] if b["settings"]["spec"].get("n_links") else []
    rows = []
    for i, r in enumerate(first["patterns"]):
        cells = [r["pattern"], str(r["attention_layers"]), f"{r['params']:,}"]
        for b in blocks.values():
            row = b["patterns"][i]
            cells += [format_ci(row["accuracy"], 3), ", ".join(f"{x['accuracy']:.3f}" for x in row["runs"]),
                      row["judgement"]]
            if b["settings"]["spec"].get("n_links"):
                links = [x["link_accuracy"] for x in row["runs"]]
                cells.append(f"{sum(links) / len(links):.3f}")
        rows.append(cells)
    return markdown_table(header, rows, padded=True)


def _tasks_section(result: dict) -> list[str]:
    """The tasks, the judgement's rule, the accuracy table, the judgements and the accuracy plot."""
    blocks = result["tasks"]
    s = next(iter(blocks.values()))["settings"]
    lines = ["## Token-mixing probe", "",
             f"Each pattern: a fresh model of width {s['n_embd']} ({s['n_head']} heads) per task and seed, seeds "
             f"{', '.join(map(str, s['seeds']))}.", "", *[f"- {_task_description(b)}" for b in blocks.values()], "",
             f"Judgement per pattern and task, from fixed thresholds: a seed has learned the task when its "
             f"accuracy is at least {result['settings']['learned_fraction']:g} of the way from guessing a value in "
             "context to 1; the pattern *learns it* when every seed has, *does not learn it* when no seed has, and is "
             "*unstable* when its seeds disagree.", "", _accuracy_table(blocks)]
    if len(blocks) > 1:
        lines += ["", "Params are the first task's models; the other task's differ only by its vocabulary."]
    lines += [""]
    for b in blocks.values():
        lines += _judgement_sentences(b)
    if not s["seeds"][1:]:
        lines.append("One seed: nothing can be unstable and the noise cannot be judged (run with --seeds 1,2,3).")
    lines.append("")
    if "accuracy" in result["plots"]:
        lines += [f"![probe accuracy]({result['plots']['accuracy']})", ""]
    return lines


def _position_table(models: dict, gaps: dict, buckets: list[dict]) -> str:
    """Loss per position bucket of each model and each gap, then over all positions and late - mid."""
    header = ["positions", *[f"{k} ({m['layers']})" for k, m in models.items()],
              *[f"{k} - {g['vs']}" for k, g in gaps.items()]]
    rows = [[f"{b['lo']}-{b['hi'] - 1}", *[f"{m['buckets'][i]['loss']:.4f}" for m in models.values()],
             *[format_ci(g["bucket_ci"][i], 4, signed=True) for g in gaps.values()]] for i, b in enumerate(buckets)]
    rows.append(["all", *[f"{m['mean']:.4f}" for m in models.values()], *[f"{g['mean']:+.4f}" for g in gaps.values()]])
    rows.append(["late - mid", *[f"{m['late_minus_mid']:+.4f}" for m in models.values()],
                 *[f"{g['late_minus_mid']:+.4f}" for g in gaps.values()]])
    return markdown_table(header, rows, padded=True)


def _gap_sentence(label: str, g: dict) -> str:
    """How a model's loss gap to its baseline changes from the first position bucket to the last."""
    change = g["last_minus_first"]
    lo, hi = change["ci95"] or (change["mean"], change["mean"])
    verdict = ("grows with position" if lo > 0 else "shrinks with position" if hi < 0
               else "shows no change with position beyond noise")
    head, tail = (format_ci(g["bucket_ci"][i], 4, signed=True) for i in (0, -1))
    return (f"{label} - {g['vs']}: {head} nats in the first bucket and {tail} in the last (95% intervals over the "
            "windows, which leave out the noise of training these checkpoints); "
            f"last minus first {format_ci(change, 4, signed=True)}: the gap {verdict}.")


def _position_section(result: dict) -> list[str]:
    """Loss by position of the pretrained checkpoints: the table, each gap's change, the plot."""
    pl = result["position_loss"]
    lines = ["### Loss by position in the context window", ""]
    if not pl or not pl["models"]:
        return lines + ["No pretrained checkpoints were given (or found in the run directory), so there is no "
                        "loss-by-position curve.", ""]
    first = next(iter(pl["models"].values()))
    # One table needs one set of positions: a model of another context length is named, not tabulated.
    models = {k: m for k, m in pl["models"].items() if m["block_size"] == first["block_size"]}
    gaps = {k: g for k, g in pl["gaps"].items() if k in models}
    lines += [f"Mean next-token loss (nats) by position, over {first['windows']:,} non-overlapping validation "
              f"windows of {first['block_size']} tokens. Late - mid = mean loss over the last quarter of "
              "positions minus the second quarter (more negative: more gain from far context).", "",
              _position_table(models, gaps, first["buckets"]), ""]
    lines += [_gap_sentence(label, g) for label, g in gaps.items()]
    lines += [f"{label} ({m['layers']}) has a context of {m['block_size']} tokens, not {first['block_size']}: mean "
              f"loss {m['mean']:.4f}, late - mid {m['late_minus_mid']:+.4f}."
              for label, m in pl["models"].items() if label not in models]
    if len(models) < len(pl["models"]) or gaps:
        lines.append("")
    if "position_loss" in result["plots"]:
        lines += [f"![loss by position]({result['plots']['position_loss']})", ""]
    return lines


def render_probe_markdown(result: dict) -> str:
    """probe.md, from probe.json's contents alone."""
    return "\n".join(_tasks_section(result) + _position_section(result))


def write_outputs(result: dict, out: Path) -> None:
    """The plots (named in ``result["plots"]``), probe.json and probe.md into ``out``."""
    result["plots"]["accuracy"] = plot_accuracy(result, out)
    positions = result["position_loss"]
    if positions and positions["models"]:
        result["plots"]["position_loss"] = plot_position_loss(result, out)
    write_json(out / "probe.json", result)
    write_text(out / "probe.md", render_probe_markdown(result))
