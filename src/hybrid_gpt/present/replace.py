"""The replacement study's page (analysis/replace.py measures it): its tables, its verdict sentences and its plots,
from replace.json's data alone."""

from __future__ import annotations

from pathlib import Path

from hybrid_gpt.fsutil import write_json, write_text
from hybrid_gpt.present.numbers import signed_interval
from hybrid_gpt.present.plots import save_plot
from hybrid_gpt.present.tables import markdown_table
from hybrid_gpt.stats import format_ci

LABELS = {"drop": "drop (N)", "constant": "constant (training mean)", "linear": "linear (ridge)",
          "distil": "distilled MLP", "matched": "distilled MLP, parameter-matched", "drop+heal": "drop + heal",
          "distil+heal": "distilled MLP + heal"}


def _ratio(r: dict | None) -> str:
    if not r or r.get("ratio") is None:
        return "not measured"
    text = f"{r['ratio']:.2f}x"
    return text + (f" [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]" if r.get("ci95") else "")


def _passkey(p: list | None) -> str:
    return ", ".join(f"{x['correct']}/{x['n']} at {x['context']:,}" for x in p) if p else "-"


def k_sentence(entry: dict, result: dict) -> str:
    """One sentence per k: the quality cost of the distilled + healed arm over its seeds against the tolerance,
    and its decode speed at the same context."""
    head = f"k = {entry['k']} ({entry['choice'] or 'not chosen yet'} layers)"
    if "distil_heal" not in entry:
        return f"{head}: not measured yet."
    d, n = entry["distil_heal"], len(entry["seeds"])
    text = (f"{head}: distilled + healed costs {signed_interval(d)} bits per byte against the full model on "
            f"{result['test_tokens']:,} test tokens ({n} seed{'s' if n != 1 else ''}; tolerance "
            f"{result['tolerance_bpb']:.4f}): quality {entry['quality']}")
    speed = entry.get("speed")
    if speed:
        text += (f"; decode at {result['eval_context']:,} tokens {_ratio(speed['pooled'])} over {speed['pooled']['n']} "
                 f"separate runs (runs {speed['spread'][0]:.2f}x-{speed['spread'][1]:.2f}x; cost model "
                 f"{speed['predicted']:.2f}x)")
    else:
        text += f"; decode speed at {result['eval_context']:,} tokens not measured yet"
    return text + "."


def render_markdown(result: dict, map_sentence: str | None = None) -> str:
    o = result["options"]
    lines = ["# Replacing attention at a real budget", ""]
    if not result["complete"]:
        lines += ["**Unfinished:** the study is still running; what is here is what has finished.", ""]
    if result["full"] is None:
        return "\n".join(lines + ["Nothing has finished yet.", ""])
    lines += [
        f"Checkpoint `{o['checkpoint']}`; staticness map `{o['map']}`. Bits per byte on held-out windows of "
        f"{result['eval_context']:,} tokens spread over the whole held-out split: a selection slice of "
        f"{result['select_tokens']:,} tokens (the only data the choice of layers reads) and "
        f"{result['test_tokens']:,} test tokens, disjoint from it, that every figure below is on. Differences to "
        f"the full model are paired by window (t-interval over windows); the distilled + healed row over its "
        f"{len(o['seeds'])} training seeds {o['seeds']} (fixed before the run) uses an interval over windows and "
        "seeds together (`stats.seed_window_ci`). The tolerance is 1% of the full model's bits per byte.",
        "", *(f"- {k_sentence(e, result)}" for e in result["ks"]), ""]
    if map_sentence:
        lines += [f"- {map_sentence}", ""]
    lines += [f"Full model: {result['full']['test_bpb']:.4f} bits per byte on the test windows "
              f"({result['full']['select_bpb']:.4f} on the selection slice); passkey "
              f"{_passkey(result['full']['passkey'])}.", ""]
    for e in result["ks"]:
        rows = [a for a in result["arms"] if a["k"] == e["k"]]
        if not rows:
            continue
        lines += [f"## k = {e['k']}", ""]
        if e.get("select_bpb"):
            lines += ["Choice of layers (selection slice, distilled arm): " + ", ".join(
                f"{c} {v:.4f}" for c, v in e["select_bpb"].items()) + f" -> **{e['choice']}**.", ""]
        table = [[a["name"], LABELS.get(a["kind"], a["kind"]), ", ".join(map(str, a["layers"])),
                  f"{a['mixer_params']:,}" if a.get("mixer_params") else "-", f"{a['test_bpb']:.4f}",
                  signed_interval(a["delta_bpb"]), a["quality"], _passkey(a.get("passkey"))] for a in
                 sorted(rows, key=lambda a: (a["choice"] != e["choice"], list(LABELS).index(a["kind"]),
                                             a["seed"] or 0))]
        lines += [markdown_table(["arm", "treatment", "layers", "mixer parameters", "test bpb",
                                  "- full [95% CI]", "quality", "passkey"], table), ""]
        lines += _beats(result, e, rows)
        curves = [a for a in rows if a.get("curve")]
        if curves:
            lines += ["Healing curves (test bits per byte minus the full model's, by training tokens):", "",
                      markdown_table(["arm", *[f"{p['tokens']:,}" for p in max(curves, key=lambda a: len(
                          a["curve"]))["curve"]]],
                          [[a["name"], *[format_ci(p["delta_bpb"], signed=True) for p in a["curve"]]] for a in curves]),
                      "", f"![healing curves](replace-curves-k{e['k']}.png)", ""]
    if result.get("speed"):
        s = result["speed"]
        lines += ["## Speed at the same context", "",
                  f"bench's estimator (batch 1, float32, cached decode of {o['decode_tokens']} tokens after a "
                  f"{result['eval_context']:,}-token prompt), the full model interleaved with each shape, in "
                  f"{s['runs']} separate processes:", "",
                  markdown_table(["shape", "decode, each run [within-run 95% CI]", "between runs", "pooled",
                                  "cost model"],
                                 [[n, "; ".join(_ratio(r["decode"]) for r in v["runs"]),
                                   f"{v['spread'][0]:.2f}x-{v['spread'][1]:.2f}x", _ratio(v["pooled"]),
                                   f"{v['predicted']:.2f}x"] for n, v in s["shapes"].items()]), ""]
    lines += [f"Wall time so far: {result['elapsed_s'] / 60:.0f} min.", ""]
    return "\n".join(lines)


def _beats(result: dict, entry: dict, rows: list[dict]) -> list[str]:
    """Whether each replaced layer's distilled MLP beats the constant and the linear predictor on the map's
    held-out tokens, from the map's R^2: said per layer, and loudly where it does not."""
    width = result["options"]["width"]
    distil = next((a for a in rows if a["kind"] == "distil" and a["choice"] == entry["choice"]), None)
    if not distil or not result.get("map_r2"):
        return []
    cells, losers = [], []
    for layer in distil["layers"]:
        r2 = result["map_r2"].get(str(layer), {})
        mlp, lin, const = r2.get(f"mlp{width}"), r2.get("linear"), r2.get("constant")
        if None in (mlp, lin, const):
            continue
        cells.append(f"{layer}: {mlp:.3f} against {lin:.3f} linear, {const:.3f} constant")
        if mlp <= max(lin, const):
            losers.append(str(layer))
    if not cells:
        return []
    head = (f"The distilled MLPs (width {width}) on the map's held-out tokens, R^2 by layer: " + "; ".join(cells)
            + ". ")
    tail = ("Each beats both the constant and the linear predictor." if not losers else
            f"**Layer{'s' if len(losers) > 1 else ''} {', '.join(losers)}: the distilled MLP does not beat the "
            "linear or the constant predictor.**")
    return [head + tail, ""]


def plot_curves(result: dict, k: int, path: Path) -> str:
    arms = [a for a in result["arms"] if a["k"] == k and a.get("curve")]

    def draw(plt):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for a in arms:
            xs = [max(p["tokens"], 1) for p in a["curve"]]
            ys = [p["delta_bpb"]["mean"] for p in a["curve"]]
            lo = [p["delta_bpb"]["ci95"][0] if p["delta_bpb"]["ci95"] else y for p, y in zip(a["curve"], ys)]
            hi = [p["delta_bpb"]["ci95"][1] if p["delta_bpb"]["ci95"] else y for p, y in zip(a["curve"], ys)]
            line, = ax.plot(xs, ys, marker="o", ms=3, label=a["name"])
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        ax.axhline(result["tolerance_bpb"], color="gray", ls="--", lw=1, label="tolerance (1%)")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xscale("symlog", linthresh=1000)
        ax.set_xlabel("healing tokens")
        ax.set_ylabel("test bits per byte - full model's")
        ax.set_title(f"Healing curves, k = {k}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        return fig

    return save_plot(path, draw)


def write_outputs(result: dict, out: Path, map_sentence: str | None = None) -> list[str]:
    """replace.json, replace.md and the plots into ``out``; returns the plots' names."""
    plots = [plot_curves(result, e["k"], out / f"replace-curves-k{e['k']}.png") for e in result["ks"]
             if any(a["k"] == e["k"] and a.get("curve") for a in result["arms"])]
    write_json(out / "replace.json", {**result, "plots": plots})
    write_text(out / "replace.md", render_markdown(result, map_sentence))
    return plots
