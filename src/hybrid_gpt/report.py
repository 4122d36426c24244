"""The experiment's report: results.json, report.md and PNG plots, written from measured numbers only."""

from __future__ import annotations

import json
import math
from pathlib import Path

from hybrid_gpt.fsutil import write_json, write_text
from hybrid_gpt.present.bench import format_table
from hybrid_gpt.present.plots import save_plot, smooth
from hybrid_gpt.stats import format_ci, format_ratio, judge_difference, mean_ci

ORIGINAL = {"val_loss": (5.02, 5.09), "prefill_s": (0.0047, 0.0029), "decode_tok_s": (206.27, 326.11)}


def plot_curves(results: dict, out: Path) -> str:
    def draw(plt):
        stages = ("pretrain", "sft", "dpo")
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for ax, stage in zip(axes, stages):
            for mt, color in (("standard", "tab:blue"), ("hybrid", "tab:orange")):
                c = results["curves"].get(mt, {}).get(stage)
                if not c:
                    continue
                xs, ys = [x for x, _ in c["train"]], smooth([y for _, y in c["train"]], 25)
                ax.plot(xs, ys, color=color, alpha=0.6, label=f"{mt} train (smoothed)")
                if c["val"]:
                    vx, vy = zip(*c["val"])
                    ax.plot(vx, vy, "o-", color=color, label=f"{mt} validation")
            ax.set_title({"pretrain": "pretraining (nats/token)", "sft": "SFT (assistant tokens)",
                          "dpo": "DPO loss"}[stage])
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        return fig
    return save_plot(out / "loss_curves.png", draw)


def plot_decode(results: dict, out: Path) -> str:
    def draw(plt):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for mt, color in (("standard", "tab:blue"), ("hybrid", "tab:orange")):
            rows = [r for r in results["bench"]["models"][mt]["rows"] if r["batch"] == 1]
            ctx = [r["context"] for r in rows]
            ax.plot(ctx, [r["decode_tok_s"]["median"] for r in rows], "o-", color=color, label=f"{mt}, KV cache")
            if "naive_decode_tok_s" in rows[0]:
                ax.plot(ctx, [r["naive_decode_tok_s"]["median"] for r in rows], "s--", color=color,
                        label=f"{mt}, no cache (naive)")
        if results["bench"].get("peer"):
            rows = [r for r in results["bench"]["peer"]["rows"] if r["batch"] == 1]
            ax.plot([r["context"] for r in rows], [r["decode_tok_s"]["median"] for r in rows], "^:", color="gray",
                    label="transformers GPT-2 (standard weights)")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("new tokens / s (batch 1, median)")
        ax.set_xscale("log", base=2)
        contexts = results["bench"]["config"]["contexts"]
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return fig
    return save_plot(out / "decode_speed.png", draw)


def plot_kv(results: dict, out: Path) -> str:
    def draw(plt):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        ctx = sorted({r["context"] for r in results["bench"]["models"]["standard"]["rows"]})
        full = list(range(1, max(ctx) + 1))
        for mt, color in (("standard", "tab:blue"), ("hybrid", "tab:orange")):
            per = results["bench"]["models"][mt]["kv_bytes_per_token"]
            ax.plot(full, [per * c / 2**20 for c in full], color=color, label=f"{mt} ({per:,} B/token)")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("KV cache, MB (batch 1, fp32)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return fig
    return save_plot(out / "kv_cache.png", draw)


def _stat(results: dict, mt: str, key: str) -> dict:
    values = [f[key] for f in results["per_seed"][mt].values() if f.get(key) is not None]
    return mean_ci(values) if values else {"mean": None, "ci95": None, "n": 0, "values": []}


def _row(bench: dict, mt: str, context: int, batch: int = 1) -> dict:
    for r in bench["models"][mt]["rows"]:
        if r["context"] == context and r["batch"] == batch:
            return r
    raise KeyError(context)


def mcnemar_p(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value: of the pairs the two models rank differently, how unlikely a split this
    uneven is if either model were as likely to be the one that is right (a binomial test at 1/2)."""
    n, k = only_first + only_second, min(only_first, only_second)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired_accuracy(standard: list, hybrid: list) -> dict | None:
    """Hybrid vs standard DPO reward accuracy on the same validation pairs, from each pair's reward margin
    (None: a pair the model was not scored on; the chosen reply is ranked first where the margin is > 0).
    The difference's 95% interval is a t-interval over pairs of (hybrid right) - (standard right), which
    pairing makes narrower than two separate accuracies' intervals; McNemar's exact test on the pairs the
    two rank differently. None when no pair was scored for both."""
    both = [(s > 0, h > 0) for s, h in zip(standard, hybrid) if s is not None and h is not None]
    if not both:
        return None
    diff = mean_ci([int(h) - int(s) for s, h in both])
    only_h = sum(1 for s, h in both if h and not s)
    only_s = sum(1 for s, h in both if s and not h)
    return {"pairs": len(both), "standard_accuracy": sum(s for s, _ in both) / len(both),
            "hybrid_accuracy": sum(h for _, h in both) / len(both),
            "difference": {k: v for k, v in diff.items() if k != "values"},
            "only_hybrid_right": only_h, "only_standard_right": only_s, "mcnemar_p": mcnemar_p(only_h, only_s)}


def dpo_paired(results: dict) -> dict:
    """The paired test of reward accuracy per seed ("not recorded" for runs without per-pair margins, or whose
    two models were scored on different pair lists), and mean_ci of the per-seed differences across seeds."""
    per_seed: dict[str, dict | str] = {}
    for seed in map(str, results["seeds"]):
        s, h = (results["per_seed"][mt][seed].get("dpo_val_pair_margins") for mt in ("standard", "hybrid"))
        if not s or not h:
            per_seed[seed] = "not recorded"
        elif len(s) != len(h):
            per_seed[seed] = "not comparable (the two models were scored on different validation files)"
        else:
            per_seed[seed] = paired_accuracy(s, h) or "not comparable (no pair was scored for both models)"
    diffs = [p["difference"]["mean"] for p in per_seed.values() if isinstance(p, dict)]
    return {"per_seed": per_seed, "across_seeds": mean_ci(diffs) if diffs else None}


def summarize(results: dict) -> dict:
    """The headline figures: quality with mean/CI over seeds, speed at the reference context."""
    bench = results["bench"]
    contexts = bench["config"]["contexts"]
    ref = 256 if 256 in contexts else max(contexts)
    quality_keys = ["pretrain_val_loss", "pretrain_val_bpb", "dpo_val_loss", "dpo_val_bpb", "sft_val_loss",
                    "dpo_val_rewards/accuracies", "dpo_val_rewards/margins"]
    quality = {mt: {k: _stat(results, mt, k) for k in quality_keys} for mt in ("standard", "hybrid")}
    speed = {}
    for mt in ("standard", "hybrid"):
        r = _row(bench, mt, ref)
        speed[mt] = {"prefill_ms": r["prefill_ms"]["median"], "decode_tok_s": r["decode_tok_s"]["median"],
                     "naive_decode_tok_s": r.get("naive_decode_tok_s", {}).get("median"),
                     "kv_cache_bytes": r["kv_cache_bytes"]}
    verdicts = [
        judge_difference("validation bits per byte after pretraining",
                         quality["standard"]["pretrain_val_bpb"]["values"],
                         quality["hybrid"]["pretrain_val_bpb"]["values"], "bpb", lower_is_better=True),
        judge_difference("validation loss of the aligned (DPO) models",
                         quality["standard"]["dpo_val_loss"]["values"],
                         quality["hybrid"]["dpo_val_loss"]["values"], "nats/token", lower_is_better=True),
    ]
    return {"reference_context": ref, "quality": quality, "speed": speed, "speedups": _speedups(bench, ref, speed),
            "verdicts": verdicts, "dpo_paired": dpo_paired(results)}


def _speedups(bench: dict, ref: int, speed: dict) -> dict:
    """Hybrid vs standard at the reference context, batch 1, as {"ratio", "ci95"}: bench's paired ratio and its
    interval where its ratio rows carry one, else the ratio of the medians (no interval)."""
    row = next((r for r in bench.get("ratios", {}).get("hybrid/standard", [])
                if r["context"] == ref and r["batch"] == 1), {})
    s, h = speed["standard"], speed["hybrid"]
    medians = {"decode_speedup": h["decode_tok_s"] / s["decode_tok_s"],
               "prefill_speedup": s["prefill_ms"] / h["prefill_ms"],
               "naive_decode_speedup": (h["naive_decode_tok_s"] / s["naive_decode_tok_s"]
                                        if s["naive_decode_tok_s"] and h["naive_decode_tok_s"] else None)}
    return {k: {"ratio": row.get(k, v), "ci95": row.get(f"{k}_ci95")} for k, v in medians.items()}


def _speed_sentence(summary: dict) -> str:
    up = summary["speedups"]
    text = (f"At context {summary['reference_context']}, batch 1, the hybrid decodes "
            f"{format_ratio(up['decode_speedup'])} as fast as the standard model with the KV cache")
    if up["naive_decode_speedup"]["ratio"] is not None:
        text += (f" and {format_ratio(up['naive_decode_speedup'])} as fast without it (the naive way the original "
                 "likely measured)")
    text += f"; its prefill is {format_ratio(up['prefill_speedup'])} as fast"
    return text + (" (95% intervals in brackets)." if up["decode_speedup"]["ci95"] else ".")


def loss_change(diff: float) -> str:
    """hybrid - standard of a loss in words: "+0.0572" under a column of speedups read as a gain."""
    if diff == 0:
        return "same"
    return f"{abs(diff):.4f} {'higher (worse)' if diff > 0 else 'lower (better)'}"


def headline_table(results: dict, summary: dict) -> str:
    """The original's rows with our values, then our extra rows (markdown)."""
    q, sp = summary["quality"], summary["speed"]
    ref = summary["reference_context"]
    seeds = results["seeds"]
    L = []
    L.append(f"| metric (context {ref}) | standard | hybrid | hybrid vs standard | original: standard | "
             "original: hybrid |")
    L.append("| --- | --- | --- | --- | --- | --- |")
    dl = q["hybrid"]["dpo_val_loss"]["mean"] - q["standard"]["dpo_val_loss"]["mean"]
    L.append(f"| final validation loss (DPO models, nats/token) | {format_ci(q['standard']['dpo_val_loss'])} | "
             f"{format_ci(q['hybrid']['dpo_val_loss'])} | {loss_change(dl)} | 5.02 | 5.09 |")
    up = summary["speedups"]
    L.append(f"| prefill time (batch 1) | {sp['standard']['prefill_ms']:.2f} ms | "
             f"{sp['hybrid']['prefill_ms']:.2f} ms | {format_ratio(up['prefill_speedup'])} as fast | 4.7 ms | 2.9 ms |")
    L.append(f"| decode speed, KV cache (batch 1) | {sp['standard']['decode_tok_s']:.1f} tok/s | "
             f"{sp['hybrid']['decode_tok_s']:.1f} tok/s | {format_ratio(up['decode_speedup'])} as fast | 206 tok/s | "
             "326 tok/s |")
    if up["naive_decode_speedup"]["ratio"] is not None:
        L.append(f"| decode speed, no cache (batch 1) | {sp['standard']['naive_decode_tok_s']:.1f} tok/s | "
                 f"{sp['hybrid']['naive_decode_tok_s']:.1f} tok/s | {format_ratio(up['naive_decode_speedup'])} as "
                 "fast | | |")
    L.append("")
    L.append("Our extra rows:\n")
    L.append("| metric | standard | hybrid |")
    L.append("| --- | --- | --- |")
    rows = [("pretraining: validation loss (nats/token)", "pretrain_val_loss"),
            ("pretraining: validation bits per byte", "pretrain_val_bpb"),
            ("aligned (DPO) model: validation bits per byte", "dpo_val_bpb"),
            ("SFT: validation loss on assistant tokens", "sft_val_loss"),
            ("DPO: validation reward accuracy", "dpo_val_rewards/accuracies"),
            ("DPO: validation reward margin", "dpo_val_rewards/margins")]
    for label, key in rows:
        L.append(f"| {label} | {format_ci(q['standard'][key])} | {format_ci(q['hybrid'][key])} |")
    first = str(seeds[0])
    ps, ph = results["per_seed"]["standard"][first], results["per_seed"]["hybrid"][first]
    L.append(f"| parameters | {ps['parameters']:,} | {ph['parameters']:,} |")
    L.append(f"| KV cache per token (fp32) | {ps['kv_bytes_per_token']:,} B | {ph['kv_bytes_per_token']:,} B |")
    L.append(f"| KV cache at context {ref} (batch 1) | {sp['standard']['kv_cache_bytes'] / 2**20:.2f} MB | "
             f"{sp['hybrid']['kv_cache_bytes'] / 2**20:.2f} MB |")
    L.append(f"| pretraining time (seed {first}) | {ps['pretrain_train_seconds']:.0f} s | "
             f"{ph['pretrain_train_seconds']:.0f} s |")
    L.append(f"| pretraining throughput (median tokens/s) | {ps['pretrain_train_tokens_per_sec']:,.0f} | "
             f"{ph['pretrain_train_tokens_per_sec']:,.0f} |")
    return "\n".join(L)


def dpo_paired_lines(paired: dict) -> list[str]:
    """The paired test of DPO reward accuracy as markdown: a row per seed, then the mean over seeds."""
    L = ["Reward accuracy paired on the same validation pairs (hybrid - standard; a pair counts as right where the "
         "model's reward margin ranks the chosen reply first; interval: 95% t over pairs; p: McNemar's exact test "
         "on the pairs the two rank differently):\n",
         "| seed | pairs | standard | hybrid | hybrid - standard | only hybrid right | only standard right | p |",
         "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for seed, p in paired["per_seed"].items():
        if isinstance(p, str):
            L.append(f"| {seed} | {p} | | | | | | |")
            continue
        L.append(f"| {seed} | {p['pairs']:,} | {p['standard_accuracy']:.3f} | {p['hybrid_accuracy']:.3f} | "
                 f"{format_ci(p['difference'], digits=3, signed=True)} | {p['only_hybrid_right']:,} | "
                 f"{p['only_standard_right']:,} | {p['mcnemar_p']:.3g} |")
    across = paired["across_seeds"]
    L.append("")
    if across is None:
        L.append("Per-pair results were not recorded for any seed (runs made before they were kept): no paired "
                 "test.\n")
    else:
        L.append(f"Across {across['n']} seed(s): hybrid - standard reward accuracy = "
                 f"{format_ci(across, digits=3, signed=True)}"
                 + (" (mean ± half-width of a 95% t-interval over the per-seed differences)." if across["ci95"] else
                    " (one seed: no interval over seeds).") + "\n")
    return L


def render_markdown(results: dict, summary: dict, plots: dict) -> str:
    seeds = results["seeds"]
    L = []
    L.append(f"# hybrid-gpt report: standard vs hybrid ({results['preset']} preset)\n")
    L.append(f"Seeds: {', '.join(map(str, seeds))}. Quality figures are means over seeds"
             + (" ± the half-width of a 95% confidence interval (Student's t)." if len(seeds) > 1 else
                " (one seed: no confidence interval).")
             + f" Speed figures are medians of {results['bench']['config']['repeats']} interleaved repeats, "
             "measured in one process on the aligned (DPO) models of the first seed.\n")
    L.append("## The original's table, measured again\n")
    L.append(headline_table(results, summary))
    first = str(seeds[0])
    ps, ph = results["per_seed"]["standard"][first], results["per_seed"]["hybrid"][first]
    ci = ps.get("dpo_val_rewards/accuracies_ci95")
    L.append("")
    if ci:
        L.append(f"DPO reward accuracy is measured on {ps['dpo_val_pairs']} held-out pairs; for seed {first} the "
                 f"standard model's 95% interval is [{ci[0]:.3f}, {ci[1]:.3f}] and the hybrid's "
                 f"[{ph['dpo_val_rewards/accuracies_ci95'][0]:.3f}, {ph['dpo_val_rewards/accuracies_ci95'][1]:.3f}].\n")
    L += dpo_paired_lines(summary["dpo_paired"])
    L.append("## What the numbers say\n")
    for v in summary["verdicts"]:
        L.append(f"- {v}")
    L.append(f"- {_speed_sentence(summary)}")
    L.append("")
    L.append("## Benchmark\n")
    L.append("```")
    L.append(format_table(results["bench"]))
    L.append("```\n")
    L.append("![decode speed](decode_speed.png)\n\n![KV cache](kv_cache.png)\n\n![loss curves](loss_curves.png)\n")
    L.append("## Samples\n")
    for mt in ("standard", "hybrid"):
        s = results["samples"][mt]
        L.append(f"### {mt}\n")
        L.append(f"Greedy continuation of `{s['prompt']}` by the pretrained model:\n")
        L.append("```\n" + s["greedy_pretrain_sample"].strip() + "\n```\n")
        L.append("Chat replies of the aligned model (temperature 0.8, top-k 50, seed 1):\n")
        for turn in s["chat"]:
            L.append(f"> **user:** {turn['user']}  \n> **assistant:** {' '.join(turn['assistant'].split())}\n")
    L.append("## Machine and commands\n")
    m = results["machine"]
    cpu = f", {m['cpu_model']}" if m.get("cpu_model") else ""
    gpu = f" ({m['gpu']})" if m.get("gpu") else ""
    kernels = f"; linear layers: {m['linear_kernels']}" if m.get("linear_kernels") else ""
    L.append(f"- machine: {m['platform']}{cpu}, {m['cpu_count']} CPUs, device {m['device']}{gpu}, "
             f"{m['threads']} torch threads{kernels}")
    L.append(f"- versions: Python {m['python']}, torch {m['torch']}"
             + (f", transformers {m['transformers']}" if "transformers" in m else ""))
    L.append(f"- data: {results['data']['source']}, vocabulary {results['data']['vocab_size']}")
    L.append(f"- pipeline wall time in this invocation: {results['pipeline_seconds']:.0f} s")
    L.append(f"- command: `{results['command']}`")
    L.append("- re-run: `uv run hybrid-gpt pipeline` (stages already complete are skipped; delete the run "
             "directory to start over)")
    return "\n".join(L) + "\n"



def write_report(results: dict, run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    summary = summarize(results)
    results["summary"] = summary
    plots = {"curves": plot_curves(results, run_dir), "decode": plot_decode(results, run_dir),
             "kv": plot_kv(results, run_dir)}
    results["plots"] = plots
    write_json(run_dir / "results.json", json.loads(json.dumps(results, default=str)))
    write_text(run_dir / "report.md", render_markdown(results, summary, plots))
    return run_dir / "report.md"
