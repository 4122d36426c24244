"""The benchmark's and the cost model's text: the tables `hybrid-gpt bench` and `hybrid-gpt costs` print (and the
report quotes), rendered from the dicts that infer/bench.py (run_bench, run_train_bench) and infer/costs.py
(costs_table) return, and the sentence a result of random-weight models carries.

The tables are fixed-width text, not markdown: every cell padded to its column's widest, two spaces apart, a rule
of dashes under the header (:func:`_aligned`).
"""

from __future__ import annotations

from hybrid_gpt.present.numbers import count, sci
from hybrid_gpt.stats import format_ratio

# The bench table's columns, one row per entry (ours, then the peers), context and batch.
COLUMNS = ["model", "context", "batch", "prefill ms", "cached tok/s", "of limit", "naive tok/s", "KV cache MB"]
# The costs table's columns, one row per model, context and batch of a phase.
COST_COLUMNS = ["model", "context", "batch", "MFLOP/tok", "MB/tok", "KV share", "step ms", "tok/s", "bound",
                "dominant component"]
# What a precision of a costs table holds, where it is not "<dtype> weights and KV cache" (infer.config.INT8's).
PRECISION_TEXT = {"int8": "int8 linear weights (a float32 scale per row), float32 tables, norms and KV cache"}
PHASE_TEXT = {"decode": "decode: one new token per row, `context` tokens cached",
              "prefill": "prefill: a `context`-token prompt per row, last position's logits"}


def _aligned(table: list[list[str]]) -> list[str]:
    """The lines of a fixed-width table: each cell padded to its column's widest, two spaces apart, and a rule of
    dashes under the first row (the header)."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table]
    return lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:]


def _figure(s: dict, digits: int = 1) -> str:
    """A figure's summary (infer.timing.summary) as "median [min-max]"."""
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def random_weights(shape: dict) -> str:
    """The sentence a result of random-weight models of a preset's shape carries (its "weights" key): ``shape``
    holds "preset", "layers" (the patterns), "block_size" and "seed"."""
    return (f"random (GPT's initialisation, seed {shape['seed']}; the {shape['preset']} shape at context "
            f"{count(shape['block_size'])}, layers {','.join(shape['layers'])}): speed does not depend on what "
            "weights learned")


def _preamble(results: dict) -> list[str]:
    """Where and how the figures were measured: the machine and versions, the weights, repeats and order."""
    env, cfg = results["environment"], results["config"]
    lines = [f"device {env['device']}, {env['dtype']}, {env['threads']} threads, torch {env['torch']}"
             + (f", transformers {env['transformers']}" if "transformers" in env else "")
             + (f", ctranslate2 {env['ctranslate2']}" if "ctranslate2" in env else "")
             + (f"; CPU {env['cpu_model']}" if env.get("cpu_model") and env["device"] == "cpu" else "")
             + (f"; our linear layers: {env['linear_kernels']}" if "linear_kernels" in env else "")]
    if results.get("weights"):
        lines.append(f"weights: {results['weights']}")
    shuffled = f", models in a new order each repeat (seed {results['order']['seed']})" if "order" in results else ""
    lines.append(f"{cfg['repeats']} repeats after {cfg['warmup']} warm-up{shuffled}, {cfg['new_tokens']} new "
                 "tokens; medians [min-max]")
    return lines


def _naive_limit(cfg: dict) -> int | None:
    """The context above which naive decode was skipped; None when it was not measured at all."""
    return cfg.get("naive_max_context") if cfg.get("naive", True) else None


def _figure_table(results: dict) -> list[list[str]]:
    """The table's header and cells: every row of every entry, ours then the peers'."""
    naive_limit = _naive_limit(results["config"])

    def naive_cell(r):
        if "naive_decode_tok_s" in r:
            return _figure(r["naive_decode_tok_s"])
        return "skipped" if naive_limit and r["context"] > naive_limit and "kv_cache_bytes" in r else "-"

    entries = [(n, m["rows"]) for n, m in results["models"].items()]
    entries += [(f"{name} ({peer['weights_of']})", peer["rows"]) for name, peer in results.get("peers", {}).items()]
    table = [COLUMNS]
    for name, rows in entries:
        for r in rows:
            table.append([name, str(r["context"]), str(r["batch"]),
                          _figure(r["prefill_ms"], 2) if "prefill_ms" in r else "-", _figure(r["decode_tok_s"]),
                          f"{100 * r['decode_fraction_of_limit']:.0f}%" if "decode_fraction_of_limit" in r else "-",
                          naive_cell(r),
                          f"{r['kv_cache_bytes'] / 2**20:.2f}" if "kv_cache_bytes" in r else "-"])
    return table


def _not_measured(cfg: dict) -> list[str]:
    """What the table leaves out, and why: the prefill (--no-prefill), naive decode at long contexts."""
    lines, naive_limit = [], _naive_limit(cfg)
    if not cfg.get("prefill", True):
        lines.append("prefill not timed (--no-prefill): each decoder was primed once per context and batch")
    if naive_limit and any(c > naive_limit for c in cfg["contexts"]):
        lines.append(f"naive decode skipped above context {naive_limit:,} (--naive-max-context): each of its steps "
                     "re-runs the whole sequence")
    return lines


def _speedups(ratios: dict) -> list[str]:
    """Each pair's paired speedups (infer.timing.ratios), a line per context and batch."""
    lines = []
    for key, rows in ratios.items():
        lines.append("")
        lines.append(f"speedup {key} (>1: the first is faster; geometric mean of the paired per-repeat ratios "
                     "[95% CI])")
        for r in rows:
            parts = [f"{k.removesuffix('_speedup')} {format_ratio({'ratio': v, 'ci95': r.get(k + '_ci95')})}"
                     for k, v in r.items() if k.endswith("speedup")]
            lines.append(f"  context {r['context']}, batch {r['batch']}: " + ", ".join(parts))
    return lines


def _checks(results: dict) -> list[str]:
    """What backs the figures: the peers' and compiled steps' agreement with ours, each precision's quality, the
    hardware limit of the "of limit" column."""
    lines = []
    for name, peer in results.get("peers", {}).items():
        agree = f", same greedy token at {100 * peer['top1_agreement']:.1f}% of positions" if (
            "top1_agreement" in peer) else ""
        lines.append(f"{name} ({peer.get('implementation', 'transformers')}) logits match: max |difference| "
                     f"{sci(peer['max_abs_logit_diff'])}{agree}")
    for name, c in results.get("compiled", {}).items():
        lines.append(f"{name} ({c['step']}): the eager path's greedy token at {100 * c['same_greedy_tokens']:.0f}% "
                     "of steps (the lowest over the sizes measured)")
    for name, q in results.get("quality", {}).items():
        lines.append(f"quality {name}: {q['bpb']:.4f} bits per byte on {count(results['config']['quality_tokens'])} "
                     f"validation tokens ({q['cost_bpb']:+.4f} vs float32)")
    if "hardware" in results:
        hw = results["hardware"]
        lines.append(f"hardware limit ('of limit' column): {hw['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s memory "
                     f"bandwidth, {hw['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s matmul ({hw['method']}); a step's limit "
                     "is the larger of reading weights + KV cache and its arithmetic. Small models that fit in the "
                     "CPU's caches can exceed a DRAM-bandwidth limit.")
    return lines


def format_table(results: dict) -> str:
    """A result of run_bench as plain text for the terminal and the report: medians [min-max] of every entry,
    then the paired speedups with their 95% intervals and what checks the figures."""
    lines = _preamble(results) + _aligned(_figure_table(results)) + _not_measured(results["config"])
    return "\n".join(lines + _speedups(results["ratios"]) + _checks(results))


def format_train_table(train: dict) -> str:
    """A result of run_train_bench as plain text: tokens/s of each model's optimizer step."""
    lines = [f"training throughput: one optimizer step (forward, backward, AdamW), batch {train['batch_size']} "
             "x the model's context; tokens/s, medians [min-max]"]
    for name, s in train["tokens_per_sec"].items():
        lines.append(f"  {name:<16} {s['median']:,.0f} [{s['min']:,.0f}-{s['max']:,.0f}]")
    if "standard_vs_peer" in train:
        lines.append(f"  standard / peer: {train['standard_vs_peer']:.2f}x")
    return "\n".join(lines)


def _si(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def _cost_cells(r: dict) -> list[str]:
    """One row of costs_table as the costs table's cells."""
    kv = r["components"]["kv_cache"]
    kv_share = (kv["bytes_read"] + kv["bytes_written"]) / r["bytes"]
    return [r["model"], count(r["context"]), str(r["batch"]), _si(r["flops"] / r["tokens"] / 1e6, 2),
            _si(r["bytes"] / r["tokens"] / 1e6, 3), f"{100 * kv_share:.0f}%",
            _si(r["seconds"] * 1e3, 3), _si(r["tokens_per_s"], 0), r["bound"],
            f"{r['dominant']} ({100 * r['dominant_share']:.0f}%)"]


def _predicted(table: dict) -> list[str]:
    """Each pair's predicted speedups, where they reach each target, and their bound."""
    lines = []
    for key, pair in table["speedups"].items():
        other = key.split("/")[0]
        lines += ["", f"predicted speedup {key} (> 1: {other} faster); first context reaching each target up to "
                      f"{count(table['search_limit'])}; Amdahl bound = the limit as context -> infinity"]
        for lim in pair["limits"]:
            at = ", ".join(f"{count(r['context'])}: {r['speedup']:.2f}x" for r in pair["rows"]
                           if r["phase"] == lim["phase"] and r["batch"] == lim["batch"])
            reach = ", ".join(f"{x}x at {count(c)}" if c else f"{x}x never" for x, c in
                              lim["first_context_reaching"].items())
            bound = "unbounded" if lim["amdahl_bound"] is None else f"{lim['amdahl_bound']:.2f}x"
            lines.append(f"  {lim['phase']}, batch {lim['batch']}: {at}; reaches {reach}; bound {bound}")
    return lines


def format_costs(table: dict) -> str:
    """A costs_table as text: per phase a row per model, context and batch, then the predicted speedups."""
    hw = table["hardware"]
    lines = [f"hardware: memory bandwidth {hw['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, matmul "
             f"{hw['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s ({hw.get('method', 'given')})",
             f"{PRECISION_TEXT.get(table['dtype'], table['dtype'] + ' weights and KV cache')}; a step's time is "
             "the larger of its bytes / bandwidth and its FLOPs / matmul rate; per token = per step / tokens the "
             "step computes"]
    for name, m in table["models"].items():
        lines.append(f"  {name}: {m['family']}, context {count(m['config']['block_size'])}, "
                     f"{count(m['parameters'])} parameters, KV cache {count(m['kv_bytes_per_token'])} bytes per token")
    for phase in table["phases"]:
        cells = [COST_COLUMNS] + [_cost_cells(r) for r in table["rows"] if r["phase"] == phase]
        lines += ["", PHASE_TEXT[phase]] + [line.rstrip() for line in _aligned(cells)]
    return "\n".join(lines + _predicted(table))
