"""The retrofit study, presented (analysis/retrofit.py measures it): its page, its verdict's sentences and its
Pareto plots, from retrofit.json's data alone."""

from __future__ import annotations

from pathlib import Path

from hybrid_gpt.fsutil import write_json, write_text
from hybrid_gpt.present.numbers import pct, sci, signed_interval
from hybrid_gpt.present.plots import save_plot
from hybrid_gpt.present.tables import markdown_table
from hybrid_gpt.stats import format_ratio

FULL = "full"  # the full model's arm: its name and its kind in retrofit.json
MARKERS = {FULL: "*", "drop": "v", "distil": "o", "drop+heal": "^", "distil+heal": "s"}
CHOICES = {"deepest": "the k deepest",
           "importance": "the k least important by residual similarity on the training split"}


def plural(n: int, word: str) -> str:
    """``n`` and ``word``, in the plural unless n is 1: "16 windows", "1 trial"."""
    return f"{n:,} {word}{'s' * (n != 1)}"


# -- the verdict's sentences (analysis/retrofit.verdict writes them into retrofit.json) ---------------------------

def speed_text(speed: list[dict]) -> str:
    """The decode speedups measured, each with its context: "1.02x [0.99, 1.05] at 2,048"."""
    return ", ".join(f"{format_ratio(s)} at {s['context']:,}" for s in speed if s.get("ratio") is not None)


def group_sentence(g: dict) -> str:
    """One choice and treatment: the largest k whose quality holds, and the decode speed it buys."""
    head = f"{g['choice']}, {g['kind']}: "
    if g["largest_k"] is None:
        states = ", ".join(f"k = {s['k']} {s['quality']}" for s in g["states"])
        return head + f"quality holds at no k measured ({states})"
    text = head + f"quality holds up to k = {g['largest_k']}"
    undecided = g["largest_k_undecided"]
    if undecided is not None and undecided > g["largest_k"]:
        text += f" (k = {undecided} cannot be told)"
    return text + "; its decode speed against the full model: " + (speed_text(g["speed"]) or "not measured")


def answer_sentence(groups: list[dict], top: int | None, attention_layers: int) -> str:
    """The study's one answer: the largest k (``top``) whose quality holds, and by which choices and treatments."""
    if not groups:
        return "no k above 0 was measured: there is nothing to judge"
    if top is None:
        return ("no arm keeps its quality cost within the tolerance at any k measured"
                + (" (some cannot be told at this noise)" if any(g["largest_k_undecided"] for g in groups) else ""))
    winners = [g for g in groups if g["largest_k"] == top]
    return (f"the largest k whose quality cost stays within the tolerance is {top} of {attention_layers} attention "
            "layers, by " + "; ".join(f"{g['choice']} {g['kind']} (decode speedup "
                                      f"{speed_text(g['speed']) or 'not measured'})" for g in winners))


def rule_sentence(windows: int, tolerance_bpb: float, quality_tolerance: float, speed_gain: float) -> str:
    """The verdict's rule, with its numbers."""
    return (f"quality holds when the whole 95% interval (t over the {plural(windows, 'held-out window')}, paired by "
            f"window) of arm - full bits per byte lies at or below {100 * quality_tolerance:.0f}% of the full model's "
            f"({tolerance_bpb:.4f}); it does not hold when the whole interval lies above; between, it cannot be told. "
            "A large speed gain: the decode speedup's interval (paired repeats) above "
            f"{speed_gain:.2f}x.")


# -- plots --------------------------------------------------------------------------------------------------------

def _usable_passkey(result: dict, arm: dict) -> float | None:
    """Mean passkey accuracy over the contexts that test something (all of them when none does)."""
    ctx = result["passkey"]["contexts"]
    use = [i for i, c in enumerate(ctx) if c["tests_something"]] or list(range(len(ctx)))
    return sum(arm["passkey"][i]["accuracy"] for i in use) / len(use) if use else None


def plot_pareto(result: dict, context: int, path: Path) -> str:
    """Quality against decode speed at one context, one point per arm: bits per byte, and passkey accuracy."""
    arms = list(result["arms"].values())

    def draw(plt):
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
        colors = {None: "black", "deepest": "tab:blue", "importance": "tab:orange"}
        for a in arms:
            s = next((x for x in a["speed"] if x["context"] == context), {})
            x = s.get("ratio")
            if x is None:
                continue
            for ax, y in ((left, a["bpb"]), (right, _usable_passkey(result, a))):
                if y is None:
                    continue
                ax.scatter([x], [y], marker=MARKERS[a["kind"]], color=colors[a["choice"]], s=60 if a["k"] else 120)
                if a["k"]:
                    ax.annotate(str(a["k"]), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for kind, marker in MARKERS.items():
            left.scatter([], [], marker=marker, color="gray", label=kind)
        for choice in result["settings"]["choices"]:
            left.scatter([], [], marker="o", color=colors[choice], label=f"{choice} layers")
        v = result["verdict"]
        left.axhline(result["arms"][FULL]["bpb"] + v["tolerance_bpb"], color="gray", ls=":", lw=1,
                     label=f"full + {100 * v['quality_tolerance']:.0f}% tolerance")
        left.set_ylabel("held-out bits per byte (lower is better)")
        right.set_ylabel("passkey accuracy (mean over informative lengths)")
        right.set_ylim(-0.05, 1.05)
        for ax in (left, right):
            ax.axvline(1.0, color="gray", lw=0.8)
            ax.set_xlabel(f"cached decode speedup over the full model at context {context:,} (batch 1)")
            ax.grid(alpha=0.3)
        left.legend(fontsize=7)
        fig.suptitle(f"Retrofit of {Path(result['checkpoint']).name}: quality against speed at context {context:,} "
                     "(numbers: k)")
        fig.tight_layout()
        return fig

    return save_plot(path, draw)


def write_plots(result: dict, out: Path) -> dict[str, str]:
    """A Pareto plot per speed context into ``out``: {context: file name}, what retrofit.json's "plots" holds."""
    contexts = result["settings"]["speed_contexts"]
    return {str(c): plot_pareto(result, c, out / f"retrofit-pareto-{c}.png") for c in contexts}


# -- the page -----------------------------------------------------------------------------------------------------

def _treatments(s: dict) -> str:
    """The treatments of a study's settings, in words."""
    parts = {"drop": "drop (N blocks)",
             "distil": f"distil (M blocks, hidden width {s['mlp_hidden']}, trained together for {s['distil_steps']} "
                       f"steps of {s['rows']} x {s['tokens_per_row']} tokens, lr {s['distil_lr']:g})",
             "heal": f"heal (each of those arms again after {s['heal_steps']} steps of KL to the full model's logits, "
                     f"{s['rows']} x {s['tokens_per_row']} tokens a step, lr {s['heal_lr']:g}; the same batches for "
                     "every healed arm)"}
    return ", ".join(text for t, text in parts.items() if t in s["treatments"])


def _head(result: dict) -> list[str]:
    """The title, what was run, and the verdict."""
    s, v = result["settings"], result["verdict"]
    lines = [f"## Retrofit: {Path(result['checkpoint']).name} ({result['attention_layers']} attention layers)", "",
             f"Checkpoint `{result['checkpoint']}`, {s['mode']} study: `{result['command']}`, "
             f"{result['elapsed_s'] / 60:.1f} min on {s['device']} with {s['threads']} "
             f"thread{'s' * (s['threads'] != 1)}. For k in {', '.join(map(str, s['ks']))} attention layers, chosen as "
             + " and as ".join(CHOICES[c] for c in s["choices"]) + ": " + _treatments(s) + ".", "",
             "### Verdict", "", f"**{v['answer'][0].upper()}{v['answer'][1:]}.** {v['rule']}", ""]
    return lines + [f"- {g['text']}" for g in v["groups"]]


def _arms_section(result: dict) -> list[str]:
    """Every arm's quality, agreement, passkey, decode speed and compute in one table; the plots."""
    s, arms = result["settings"], result["arms"]
    full, ev = arms[FULL], arms[FULL]["eval"]
    quality = {st["arm"]: st["quality"] for g in result["verdict"]["groups"] for st in g["states"]}
    head = ["arm", "k", "blocks", "bpb", "Δ bpb [95% CI]", "quality", "top-1 agr.", "KL"]
    head += [f"passkey {c:,}" for c in s["passkey_contexts"]] + [f"decode {c:,}" for c in s["speed_contexts"]]
    rows = []
    for name, a in arms.items():
        is_full = a["kind"] == FULL
        rows.append([name + (f" (= {a['same_as']})" if a.get("same_as") else ""), str(a["k"]),
                     ", ".join(map(str, a["replaced"])) or "-", f"{a['bpb']:.4f}",
                     "-" if is_full else signed_interval(a["delta_bpb"]), "reference" if is_full else quality[name],
                     f"{a['agreement']['top1_agreement']:.3f}", f"{a['agreement']['kl']:.4f}",
                     *[pct(p["accuracy"]) for p in a["passkey"]], *[format_ratio(x) for x in a["speed"]],
                     f"{a['compute']['tokens']:,}", f"{a['compute']['teacher_forwards']:,}"])
    return ["", "### Every arm", "",
            f"Bits per byte over {ev['tokens']:,} held-out play tokens ({plural(ev['windows'], 'window')} of "
            f"{s['eval_context']:,}); Δ = arm - full, mean of the per-window differences [95% t-interval over the "
            f"windows]. Agreement and KL(full || arm) in nats per token on "
            f"{full['agreement']['tokens']:,} tokens of held-out chat transcripts. Passkey: accuracy over "
            f"{plural(s['passkey_trials'], 'trial')}. Decode: the pattern's cached decode speedup over the full "
            f"model, batch 1, {s['dtypes'][0]}. Compute beyond the pretrained model: training tokens and teacher "
            "forwards.", "", markdown_table(head + ["tokens", "teacher fwd"], rows, padded=True),
            "", *[f"![quality against speed at context {c}]({p})" for c, p in result["plots"].items()], ""]


def _passkey_section(result: dict) -> list[str]:
    """Passkey accuracy per arm and length, and the lengths that test nothing."""
    pk = result["passkey"]
    lines = ["### Passkey retrieval", "",
             "A random 5-digit key stated once in held-out play text, asked for at the end; "
             f"{plural(pk['trials'], 'trial')} per length, greedy, exact match. A length where the full model "
             f"scores below {pct(pk['floor'])} "
             "tests nothing: an arm cannot lose what the model does not have.", ""]
    lines += [f"- At {c['context']:,} tokens the full model gets {pct(c['full_accuracy'])}: this length tests nothing."
              for c in pk["contexts"] if not c["tests_something"]]
    rows = [[name, *[pct(c["accuracy"][name]) for c in pk["contexts"]]] for name in result["arms"]]
    return lines + ["", markdown_table(["arm", *[f"{c['context']:,}" for c in pk["contexts"]]], rows, padded=True)]


def _answers_section(result: dict) -> list[str]:
    """The greedy answers to the fixed questions, for people to read."""
    ans = result["answers"]
    lines = ["", "### Greedy answers", "", "For people to read, not a metric: the full model and the arms at k = "
             + " and ".join(map(str, result["settings"]["answer_ks"])) + ".", ""]
    for q, question in enumerate(ans["questions"]):
        lines += [f"**{question}**", ""]
        lines += [f"- *{name}*: {' '.join(answers[q].split()) or '(empty)'}" for name, answers in ans["by_arm"].items()]
        lines.append("")
    return lines


def _speed_section(result: dict) -> list[str]:
    """Prefill and decode of each shape against the full model, measured and predicted."""
    sp = result["speed"]
    rows = [[name, str(shape["attention_layers"]), r["dtype"], f"{r['context']:,}", str(r["batch"]),
             f"{r['kv_cache_bytes'] / 2**20:.1f}", f"{r['prefill_ms']:.1f}", format_ratio(r["prefill"]),
             f"{r['predicted_prefill']:.2f}x", f"{r['decode_tok_s']:.1f}", format_ratio(r["decode"]),
             f"{r['predicted_decode']:.2f}x"] for name, shape in sp["shapes"].items() for r in shape["rows"]]
    return ["### Speed", "",
            f"infer/bench.py's estimator ({sp['config']['repeats']} interleaved repeats after a warm-up, "
            f"{sp['config']['new_tokens']} cached greedy steps from a primed cache; prefill: one forward over the "
            f"context), on {sp['environment']['device']}. Weights: {sp['weights']}; {sp['layout']}. Ratios are "
            "paired per repeat against the full model [95% interval]; predicted: the cost model's roofline "
            "(infer/costs.py) on the memory bandwidth and matmul rate measured in the same run.", "",
            markdown_table(["shape", "attention layers", "dtype", "context", "batch", "KV cache MB", "prefill ms",
                            "prefill speedup", "predicted", "decode tok/s", "decode speedup", "predicted"], rows,
                           padded=True)]


def _compute_section(result: dict) -> list[str]:
    """The shared distillation, per block, and each arm's compute by phase."""
    lines = ["", "### Compute", ""]
    d = result["distillation"]
    if d:
        rows = [[str(r["block"]), f"{r['mse_zero']:.4g}", f"{r['mse_before']:.4g}", f"{r['mse_after']:.4g}",
                 pct(r["fve_after"])] for r in d["layers"]]
        lines += [f"Shared distillation: blocks {', '.join(map(str, d['blocks']))} (1-based) trained together for "
                  f"{d['steps']} steps of {d['rows']} x {d['tokens_per_row']} tokens ({d['tokens']:,} tokens), one "
                  f"teacher forward per step through its first {d['teacher_forward_blocks']} blocks serving every "
                  "layer; each layer's student trains on its own MSE alone, so each distil arm holds bit-identical "
                  "copies of its layers' students and is charged its share of the teacher forwards.", "",
                  markdown_table(["block", "MSE of predicting zero", "MSE before", "MSE after",
                                  "variance explained after"], rows, padded=True), ""]
    rows = []
    for name, a in result["arms"].items():
        c = a["compute"]
        phases = "; ".join(p["phase"] + (f" ({pct(p['share'])} share)" if "share" in p else "")
                           for p in c["phases"]) or "none"
        rows.append([name, phases, f"{c['steps']:,}", f"{c['tokens']:,}", f"{c['teacher_forwards']:,}",
                     sci(c["approx_flops"])])
    return lines + [markdown_table(["arm", "phases", "steps", "tokens", "teacher forwards", "approx. FLOPs"], rows,
                                   padded=True)]


def _choices_and_time(result: dict) -> list[str]:
    """The residual similarity behind the layer choices, the choices, the wall time and where the arms are."""
    rows = [[str(r["block"]), f"{r['similarity']:.4f}"] for r in result["similarity"]]
    lines = ["", "### Layer choices", "",
             "Residual similarity (cosine before/after the attention sub-layer; high = least important) over "
             f"{result['settings']['similarity_tokens']:,} tokens of the training split:", "",
             markdown_table(["block", "similarity"], rows, padded=True)]
    lines += ["", *[f"- {c}, k = {k}: blocks {', '.join(map(str, b))}" for c, ks in result["choices"].items()
                    for k, b in ks.items()], ""]
    t, arms = result["timings"], result["arms"].values()
    lines += ["### Time", "", f"Whole study {result['elapsed_s'] / 60:.1f} min: similarity {t['similarity_s']:.0f} s, "
              f"distillation {t['distillation_s']:.0f} s, probes {t['probes_s']:.0f} s, arms "
              f"{sum(a.get('build_s', 0) + a.get('score_s', 0) for a in arms if not a.get('same_as')):.0f} s, "
              f"speed {t['speed_s']:.0f} s.", ""]
    saved = [a["checkpoint"] for a in arms if a.get("checkpoint") and not a.get("same_as")]
    if saved:
        lines += [f"Each arm's checkpoint is under `{result['out_dir']}/arms/`; talk to one with "
                  f"`hybrid-gpt chat {saved[0]}`.", ""]
    return lines


def render_retrofit_markdown(result: dict) -> str:
    """retrofit.md, from retrofit.json's contents alone."""
    return "\n".join(_head(result) + _arms_section(result) + _passkey_section(result) + _answers_section(result)
                     + _speed_section(result) + _compute_section(result) + _choices_and_time(result))


def write_outputs(result: dict, out: Path) -> None:
    """retrofit.json and retrofit.md into ``out`` (the plots it names are :func:`write_plots`')."""
    write_json(out / "retrofit.json", result)
    write_text(out / "retrofit.md", render_retrofit_markdown(result))
