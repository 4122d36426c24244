"""Attention distillation, presented (analysis/distill.py measures it): its page, its sentences on quality and its
plots, from distill.json's data and the verdict's reading of its quality kept."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hybrid_gpt.fsutil import write_json, write_text
from hybrid_gpt.present.numbers import count, pct, sci
from hybrid_gpt.present.plots import save_plot, smooth
from hybrid_gpt.present.tables import markdown_table
from hybrid_gpt.stats import format_ratio, format_share

ARMS = {  # result key -> label, in the order of the tables
    "teacher": "teacher",
    "distilled": "distilled",
    "distilled_finetuned": "distilled + fine-tune",
    "drop": "attention-drop",
    "drop_finetuned": "attention-drop + fine-tune",
    "scratch": "hybrid from scratch",
}
QUALITY_KEPT = ("quality kept = (bpb of attention-drop - bpb of the model) / (bpb of attention-drop - bpb of the "
                "teacher), with attention-drop before any fine-tune: 1 is the teacher's quality, 0 is no better "
                "than deleting those attention layers, above 1 better than the teacher; not measurable when "
                "attention-drop is within noise of the teacher (the 95% interval of their per-window difference "
                "reaches 0), since a ratio over noise can be any number")


@dataclass(frozen=True)
class QualityKept:
    """The verdict's reading of a distill result (analysis/distill.py's judge_quality_kept): each arm's quality
    kept, None where it is not measurable, and why it is not ("" when it is)."""

    shares: dict[str, float | None]
    why: str

    def text(self, arm: str) -> str:
        return format_share(self.shares.get(arm))


def plot_mse(result: dict, path: Path) -> str:
    """Each distilled block's MSE to the teacher's attention output: training batches, held out, predicting zero."""

    def draw(plt):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for n, row in enumerate(result["distillation"]["layers"]):
            color = f"C{n}"
            train = row["train_mse"]
            ax.plot(range(1, len(train) + 1), smooth(train, max(1, len(train) // 30)), color=color, alpha=0.6,
                    label=f"block {row['block']}: training batches")
            ax.plot([p["step"] for p in row["val_curve"]], [p["mse"] for p in row["val_curve"]], "o-", color=color,
                    label=f"block {row['block']}: held out")
            ax.axhline(row["mse_zero"], color=color, ls=":", lw=1, label=f"block {row['block']}: predicting zero")
        ax.set_yscale("log")
        ax.set_xlabel("distillation step")
        ax.set_ylabel("MSE to the teacher's attention output")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        return fig

    return save_plot(path, draw)


def plot_bpb(result: dict, path: Path) -> str:
    """Every arm's validation bits per byte, in the tables' order."""

    def draw(plt):
        names = [k for k in ARMS if k in result["arms"]]
        values = [result["arms"][k]["bpb"] for k in names]
        fig, ax = plt.subplots(figsize=(6.5, 0.5 * len(names) + 1.2))
        ys = range(len(names))[::-1]  # the table's order, top to bottom
        bars = ax.barh(ys, values, color=[f"C{i}" for i in range(len(names))])
        ax.bar_label(bars, [f" {v:.4f}" for v in values], fontsize=8)
        ax.set_yticks(ys, [f"{ARMS[k]} ({result['arms'][k]['layers']})" for k in names], fontsize=8)
        ax.axvline(result["arms"]["teacher"]["bpb"], color="gray", ls=":", lw=1)
        lo, hi = min(values), max(values)
        ax.set_xlim(max(0.0, lo - 0.6 * (hi - lo + 1e-3)), hi + 0.25 * (hi - lo + 1e-3))
        ax.set_xlabel("validation bits per byte (lower is better; dotted: the teacher)")
        ax.grid(alpha=0.3, axis="x")
        return fig

    return save_plot(path, draw)


def _imitation_section(result: dict) -> list[str]:
    """What was distilled, and per block how well the MLP imitates the attention output."""
    s, rows = result["settings"], result["distillation"]["layers"]
    blocks = ", ".join(str(b) for b in result["distilled_blocks"])
    table = [[str(r["block"]), f"{r['var_target']:.4g}", f"{r['mse_zero']:.4g}", f"{r['mse_before']:.4g}",
              f"{r['mse_after']:.4g}", pct(r["fve_before"]), pct(r["fve_after"])] for r in rows]
    lower = [r for r in rows if r["mse_after"] < r["mse_before"]]
    return [f"## Attention distillation: {result['teacher_layers']} -> {result['layers']}", "",
            f"Teacher `{result['checkpoint']}` ({result['teacher_layers']}). In block(s) {blocks} (1-based) a "
            f"per-token MLP (hidden size {s['mlp_hidden']}, with the block's LayerNorm initialised from the "
            f"teacher's) was trained for {s['steps']} steps ({s['batch_size']} x {s['block_size']} "
            f"tokens, AdamW, lr {s['lr']:g}) on the mean squared error to the teacher's attention output "
            "mixer(ln_1(x)), given the residual stream x the frozen teacher feeds that block, then swapped into a "
            "copy of the teacher whose other parameters are unchanged. Attention-drop "
            f"({result['drop_layers']}) is the teacher with those attention layers removed and nothing in their "
            "place.", "",
            f"### Imitating attention, per block (held-out MSE over {rows[0]['held_out_tokens']:,} validation "
            "tokens)", "",
            markdown_table(["block", "variance of the target", "MSE of predicting zero", "MSE before", "MSE after",
                            "variance explained before", "after"], table, padded=True),
            "", f"Distillation lowered the held-out MSE in {len(lower)} of {len(rows)} block(s); after it the "
            "MLP explains " + ", ".join(f"{pct(r['fve_after'])} (block {r['block']})" for r in rows)
            + " of the variance of the attention output. Variance explained is 1 - MSE / variance, the variance "
            "taken around the target's mean in each dimension: predicting that mean scores 0%, and predicting zero "
            "(attention-drop) scores " + ", ".join(f"{pct(r['fve_zero'])} (block {r['block']})" for r in rows)
            + ", below 0% because the attention output's mean is not zero.", ""]


def _quality_section(result: dict, kept: QualityKept) -> list[str]:
    """Every arm's bits per byte, quality kept and compute, by phase, and the sentences on quality."""
    arms = result["arms"]
    table = [[a["label"], a["layers"], f"{a['bpb']:.4f}", f"{a['loss']:.4f}", kept.text(k),
              count(a["compute"]["tokens"]), sci(a["compute"]["approx_flops"]), f"{a['parameters']:,}"]
             for k, a in ((k, arms[k]) for k in ARMS if k in arms)]
    lines = ["### Quality and compute", "",
             f"Validation bits per byte over {arms['teacher']['eval_tokens']:,} held-out tokens. "
             f"{QUALITY_KEPT[0].upper()}{QUALITY_KEPT[1:]}. Compute counts every optimizer step that led to the "
             "model (tokens = steps x tokens per step, the teacher's pretraining included); FLOPs are "
             "approximate: 6 x parameters per trained token, and for distillation 2 x the teacher's parameters "
             "up to the last replaced block (forward only) plus 6 x the students' parameters.", "",
             markdown_table(["model", "pattern", "bpb", "loss (nats/token)", "quality kept", "training tokens",
                             "approx. FLOPs", "parameters"], table, padded=True),
             "", "Compute by phase:", ""]
    for k in ARMS:
        if k in arms:
            phases = "; ".join(f"{p['phase']}: {count(p['steps'])} steps x {count(p['tokens_per_step'])} tokens"
                               for p in arms[k]["compute"]["phases"])
            lines.append(f"- {arms[k]['label']}: {phases}")
    return lines + ["", quality_sentences(result, kept), ""]


def _decode_section(result: dict) -> list[str]:
    """Cached decode speed of the teacher, the distilled model and attention-drop; the plots; the checkpoints."""
    s, arms, dec = result["settings"], result["arms"], result["decode"]
    table = [[ARMS[k], arms[k]["layers"], f"{v['median']:,.0f} ({v['min']:,.0f}-{v['max']:,.0f})",
              format_ratio(dec["ratios"][k])] for k, v in dec["tok_s"].items()]
    lines = ["### Cached decode speed", "",
             f"Greedy decoding with the KV cache, batch 1, N = {dec['new_tokens']} new tokens ending at context "
             f"{dec['context']}, measured as `bench` measures it: N cached greedy steps from a primed cache, so "
             "prefill is excluded; median (min-max) of "
             f"{dec['repeats']} interleaved repeats in a shuffled order after a warm-up, on {s['device']} with "
             f"{s['threads']} threads. 'vs teacher' is the geometric mean of the per-repeat ratios to the teacher "
             "[95% interval]. Fine-tuned models share their architecture's speed.", "",
             markdown_table(["model", "pattern", "tokens/s", "vs teacher"], table, padded=True),
             "", f"![held-out MSE during distillation]({result['plots']['mse']})",
             f"![validation bits per byte]({result['plots']['bpb']})", ""]
    if result["checkpoints"]:
        lines += ["Checkpoints: " + ", ".join(f"`{p}`" for p in result["checkpoints"].values()) + ".", ""]
    return lines


def render_distill_markdown(result: dict, kept: QualityKept) -> str:
    """The distill section of a report, from distill.json's contents and the verdict's reading of them."""
    return "\n".join(_imitation_section(result) + _quality_section(result, kept) + _decode_section(result))


def quality_sentences(result: dict, kept: QualityKept) -> str:
    """What distillation kept of the teacher's quality, against attention-drop, the fine-tune and the hybrid from
    scratch, in sentences."""
    arms = result["arms"]

    def compare(a: str, b: str) -> str:
        d = arms[a]["bpb"] - arms[b]["bpb"]
        word = "lower" if d < 0 else "higher"
        return f"{abs(d):.4f} bits per byte {word} than the {arms[b]['label']}"

    why = kept.why
    out = [f"Before any fine-tune the distilled model keeps {kept.text('distilled')} of the "
           f"teacher's quality ({compare('distilled', 'teacher')}; {compare('distilled', 'drop')})."]
    if why:
        out = [f"Before any fine-tune the distilled model is {compare('distilled', 'teacher')} "
               f"({compare('distilled', 'drop')}); {why}."]
    if "distilled_finetuned" in arms:
        out.append(f"After the same {result['finetune']['steps']}-step fine-tune "
                   + (f"it keeps {kept.text('distilled_finetuned')} and attention-drop {kept.text('drop_finetuned')}: "
                      if not why else "")
                   + f"the distilled model ends {compare('distilled_finetuned', 'drop_finetuned')}, with the same "
                     "fine-tune budget.")
    else:
        out.append("No fine-tune was run (finetune_steps 0).")
    if "scratch" in arms:
        best = "distilled_finetuned" if "distilled_finetuned" in arms else "distilled"
        out.append(f"The {arms[best]['label']} model is {compare(best, 'scratch')} "
                   f"(`{result['scratch']['checkpoint']}`, quality kept {kept.text('scratch')}).")
    else:
        out.append(f"No from-scratch model to compare: {result['scratch']['note']}.")
    return " ".join(out)


def write_outputs(result: dict, out: Path, kept: QualityKept) -> None:
    """The plots (named in ``result["plots"]``), distill.json and distill.md into ``out``."""
    plot_mse(result, out / result["plots"]["mse"])
    plot_bpb(result, out / result["plots"]["bpb"])
    write_json(out / "distill.json", result)
    write_text(out / "distill.md", render_distill_markdown(result, kept))
