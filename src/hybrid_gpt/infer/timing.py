"""The decode-speed estimator's timing: how a figure is timed, how the entries take turns, and what a figure and a
speedup are made of.

Every figure is a median over repeats with its min and max; the entries are measured interleaved
(:func:`interleave`), every entry once per repeat in an order shuffled anew each repeat (seeded, and recorded),
after a warm-up, so that a noisy shared machine affects them alike and no entry always runs first. A speedup is
the paired ratio of two entries' figures (stats.ratio_ci: the geometric mean of the per-repeat ratios, with a 95%
t-interval), which cancels the machine's drift between repeats (:func:`speedup`, :func:`ratios`). Decode is N
cached greedy steps from a primed cache, rewound to context - N (:func:`decode_rate`; the decoders are in
infer/decoders.py and infer/peer.py): prefill excluded by construction.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

import torch

from hybrid_gpt.errors import RunFailure
from hybrid_gpt.infer.entries import entry_name
from hybrid_gpt.model.gpt import GPT
from hybrid_gpt.stats import ratio_ci


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn``, the device's queued work finished before and after."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def median_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The median seconds of ``repeats`` calls of ``fn``, after one that warms up."""
    return statistics.median([time_call(fn, device) for _ in range(repeats + 1)][1:])  # the first run warms up


def summary(values: list[float | None]) -> dict:
    """Median, min, max and n of the timed repeats' ``values``, and the values themselves in repeat order
    ("values"; None for a repeat with no valid figure), which pair with the other models' of the same rows."""
    valid = [v for v in values if v is not None]
    if not valid:
        raise RunFailure("every timing of a figure was swamped by other work on this machine; run bench again "
                         "when it is quieter, or with more --repeats")
    return {"median": statistics.median(valid), "min": min(valid), "max": max(valid), "n": len(valid),
            "values": list(values)}


def speedup(base: dict, other: dict, fig: str) -> dict | None:
    """How many times as fast ``other`` is as ``base`` in figure ``fig`` of two rows measured side by side (a time
    in ms: base / other; a rate in tokens/s: other / base): stats.ratio_ci of their paired per-repeat values,
    as {"ratio", "ci95", "n"}; None where either row lacks the figure or no repeat has both."""
    if fig not in base or fig not in other:
        return None
    pairs = [(b, o) for b, o in zip(base[fig]["values"], other[fig]["values"]) if b is not None and o is not None]
    if not pairs:
        return None
    b, o = (list(x) for x in zip(*pairs))
    r = ratio_ci(b, o) if fig.endswith("_ms") else ratio_ci(o, b)
    return {"ratio": r["ratio"], "ci95": r["ci95"], "n": r["n"]}


# Each figure and the key of its speedup in a ratio row.
SPEEDUPS = {"prefill_ms": "prefill_speedup", "decode_tok_s": "decode_speedup",
            "naive_decode_tok_s": "naive_decode_speedup"}


def _ratio_row(base: dict, other: dict) -> dict:
    """One row of speedups of ``other`` over ``base`` (same context and batch): each figure both have, as the
    paired ratio and its interval ("<figure>_speedup", "<figure>_speedup_ci95": [lo, hi], None from one repeat)."""
    row = {"context": base["context"], "batch": base["batch"]}
    for fig, key in SPEEDUPS.items():
        r = speedup(base, other, fig)
        if r:
            row[key], row[f"{key}_ci95"] = r["ratio"], r["ci95"]
    return row


def ratios(results: dict) -> dict:
    """Speedups per row (> 1: the first named is faster), each the paired ratio of per-repeat figures with its
    interval: each model against the standard model of the same precision (or the first listed where there is
    none); each of our standard entries against the peer of its precision and, for the issue's comparison,
    against the float32 peer."""
    models = results["models"]
    out = {}
    groups: dict[tuple, list[str]] = {}  # same precision, and compiled or not
    for name, m in models.items():
        groups.setdefault((m.get("dtype", "float32"), m.get("compiled", False)), []).append(name)
    for (dtype, compiled), names in groups.items():
        base = entry_name("standard", dtype) + ("+compile" if compiled else "")
        base = base if base in names else names[0]
        for other in names:
            if other == base:
                continue
            rows = []
            for rb, ro in zip(models[base]["rows"], models[other]["rows"]):
                r = _ratio_row(rb, ro)
                r["kv_cache_ratio"] = (ro["kv_cache_bytes"] / rb["kv_cache_bytes"]) if rb["kv_cache_bytes"] else None
                # the cost model's roofline ratio on the hardware measured in this run, beside the measured one
                if "decode_limit_tok_s" in rb and "decode_limit_tok_s" in ro:
                    r["predicted_decode_speedup"] = ro["decode_limit_tok_s"] / rb["decode_limit_tok_s"]
                rows.append(r)
            out[f"{other}/{base}"] = rows
    # Each entry against itself without one change: what compiling buys, then what a lower precision buys.
    selves = [(name, name.removesuffix("+compile")) for name, m in models.items() if m.get("compiled")]
    selves += [(name, name.split("@")[0]) for name, m in models.items()
               if m.get("dtype", "float32") != "float32" and not m.get("compiled")]
    for name, ref in selves:
        if ref in models:
            out[f"{name}/{ref}"] = [_ratio_row(b, o) for o, b in zip(models[name]["rows"], models[ref]["rows"])]
    peers = results.get("peers", {})
    pairs = [(peer["weights_of"], name) for name, peer in peers.items()]
    # a peer in a precision our entry was not converted from (CTranslate2's int8): ours in that precision too
    pairs += [(entry_name(peer["weights_of"], peer["dtype"]), name) for name, peer in peers.items()
              if entry_name(peer["weights_of"], peer["dtype"]) in models and peer["dtype"] != "float32"
              and "@" not in peer["weights_of"]]
    pairs += [(f"{of}+compile", name) for of, name in pairs if f"{of}+compile" in models]
    for float_peer in ("peer", "ctranslate2"):  # lower precisions of ours against each float32 peer
        if float_peer in peers:
            pairs += [(name, float_peer) for name, m in models.items()
                      if m.get("dtype", "float32") != "float32" and set(m["layers"]) == {"A"}
                      and (name, float_peer) not in pairs]
    for of, peer_name in pairs:
        out[f"{of}/{peer_name}"] = [_ratio_row(p, o) for o, p in zip(models[of]["rows"], peers[peer_name]["rows"])]
    return out


def decode_rate(decoder, tokens: torch.Tensor, n: int, device) -> float:
    """New tokens per second of ``n`` cached greedy steps at batch ``tokens.size(0)``, prefill excluded.

    ``decoder`` has been primed by ``prefill(tokens)`` (``tokens`` [B, context]); it is rewound to
    ``context - n`` and steps ``n`` times from there, feeding back its own greedy token, so every repeat
    decodes the same positions at the same cost without a second prefill (which at long contexts costs
    minutes). Ours and the transformers peer run the same loop (decoders.Stepping: model call, argmax, next
    call); CTranslate2 runs its own loop in C++ (peer.CT2Decoder says what is timed)."""
    return n * tokens.size(0) / time_call(lambda: decoder.decode(tokens, n), device)


def naive_rate(model: GPT, tokens: torch.Tensor, n: int, device) -> float:
    """New tokens per second without a cache: each of the last ``n`` tokens of ``tokens`` computed by
    re-running the whole sequence before it."""
    length = tokens.size(1) - n

    def steps():
        for i in range(n):
            model(tokens[:, : length + i + 1], last_only=True)

    return n * tokens.size(0) / time_call(steps, device)


def interleave(runners: dict[str, dict[str, Callable[[], float]]], warmup: int, repeats: int,
               shuffler: random.Random, between: Callable[[], None] | None = None) -> tuple[dict, list[list[str]]]:
    """Run every entry's figures (``runners``: name -> {figure: a call that returns its value}) once per repeat,
    the entries in an order ``shuffler`` draws anew each repeat, ``warmup`` untimed repeats first, and ``between``
    (if given) after each timed repeat. Returns ({(name, figure): the timed repeats' values, in repeat order; None
    for a NaN, so that the values still pair}, the timed repeats' orders)."""
    samples: dict[tuple[str, str], list[float | None]] = {}
    orders = []
    for rep in range(warmup + repeats):
        order = list(runners)
        shuffler.shuffle(order)  # every entry once per repeat, in a new order each time
        for name in order:
            for fig, fn in runners[name].items():
                value = fn()
                if rep >= warmup:
                    samples.setdefault((name, fig), []).append(value if value == value else None)
        if rep >= warmup:
            if between is not None:
                between()
            orders.append(order)
    return samples, orders
