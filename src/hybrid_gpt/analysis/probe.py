"""The token-mixing probe: can a layer pattern still move information between positions late in the network?

Two measurements:

- **Associative recall**, generated on the fly: ``k1 v1 k2 v2 ... kn vn ? ka ? kb ...``; at each query key
  the model must name the value paired with it. One-hop recall needs two attention layers (one to pair each
  value with the key before it, one to look the query up); **two-hop** recall (``a b``, ``b v``, query
  ``a``, answer ``v``) needs a third lookup, so it asks for token mixing after the first two layers. Every
  pattern gets a fresh model of the preset's width and the same seeded training budget; accuracy is taken
  at the answer positions only, on a held-out generated set.
- **Loss by position** on the validation split, for pretrained checkpoints: a model that cannot mix
  tokens late should gain less from long contexts than one that can.

Several queries per sequence, not one: with a single answer per sequence an AA model of the cpu preset's
width sat on the guess-a-value-in-context plateau for 1,500 steps; with four queries it left it after 400.
One-hop recall is the default because two-hop was not learned within the cpu budget even by AAAA (still on
the plateau after 2,000 steps), so there it only measures the plateau.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hybrid_gpt.analysis.plots import save_plot
from hybrid_gpt.checkpoint import checkpoint_data, is_checkpoint, load_checkpoint, resolve
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import check_replaceable, output_dir, write_json, write_text
from hybrid_gpt.model.gpt import GPT, GPTConfig, parse_layers
from hybrid_gpt.presets import get_preset
from hybrid_gpt.runtime import resolve_device
from hybrid_gpt.stats import format_ci, mean_ci
from hybrid_gpt.train.evaluate import evaluating, windows
from hybrid_gpt.train.loop import TrainConfig, train

TASKS = ("recall", "two-hop")
DEFAULT_PATTERNS = ("AAAA", "AAMM", "AANN", "MMAA", "AA")

# The probe's own budget per preset; the model width comes from the preset itself.
PROBE_SETTINGS: dict[str, dict] = {
    "smoke": dict(task="recall", n_pairs=2, n_keys=16, n_values=16, n_queries=2, steps=80, batch_size=32,
                  lr=3e-3, eval_examples=500, position_tokens=4096),
    # lr 3e-4: at 1e-3 the 4-layer models stayed on the guess-a-value-in-context plateau for 1,000 steps.
    "cpu": dict(task="recall", n_pairs=4, n_keys=16, n_values=16, n_queries=4, steps=800, batch_size=64, lr=3e-4,
                eval_examples=2000, position_tokens=131072),
    "seed": dict(task="recall", n_pairs=8, n_keys=64, n_values=64, n_queries=8, steps=3000, batch_size=128,
                 lr=3e-4, eval_examples=2000, position_tokens=131072),
}
TRAIN_STREAM, EVAL_STREAM = 0, 1  # first entropy word of the generator: training and held-out data never share a stream
EVAL_SEED = 0  # one held-out set for every pattern and seed, so accuracies are paired
N_BUCKETS = 8  # position buckets of the loss-by-position table


@dataclass(frozen=True)
class RecallSpec:
    """Token layout: keys are ids [0, n_keys), values [n_keys, n_keys + n_values), then the query marker."""

    task: str = "recall"
    n_pairs: int = 4
    n_keys: int = 16
    n_values: int = 16
    n_queries: int = 4

    def validate(self) -> "RecallSpec":
        if self.task not in TASKS:
            raise HybridGPTError(f"unknown probe task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.n_pairs < 2 or (self.task == "two-hop" and self.n_pairs % 2):
            raise HybridGPTError(f"probe n_pairs must be at least 2 (and even for two-hop), got {self.n_pairs}")
        if self.n_keys < self.n_pairs:
            raise HybridGPTError(f"probe needs n_keys >= n_pairs for distinct keys ({self.n_keys} < {self.n_pairs})")
        if self.n_values < self.value_pairs:
            raise HybridGPTError(f"probe needs n_values >= {self.value_pairs} for distinct values, got {self.n_values}")
        if not 1 <= self.n_queries <= self.value_pairs:
            raise HybridGPTError(f"probe n_queries must be in 1..{self.value_pairs} (distinct query keys), "
                                 f"got {self.n_queries}")
        return self

    @property
    def value_pairs(self) -> int:
        """Pairs whose second token is a value: all of them for recall, half for two-hop (the rest link keys)."""
        return self.n_pairs if self.task == "recall" else self.n_pairs // 2

    @property
    def query_token(self) -> int:
        return self.n_keys + self.n_values

    @property
    def vocab_size(self) -> int:
        return self.n_keys + self.n_values + 1

    @property
    def seq_len(self) -> int:
        return 2 * self.n_pairs + 2 * self.n_queries

    @property
    def chance(self) -> float:
        return 1.0 / self.n_values

    @property
    def in_context_chance(self) -> float:
        """Accuracy of guessing among the values present in the sequence, which needs no lookup at all."""
        return 1.0 / self.value_pairs


# What a probe output directory holds: it replaces only a directory of these.
PROBE_FILES = ("probe.json", "probe.md", "probe-*.png")

def _distinct(rng: np.random.Generator, rows: int, population: int, k: int) -> np.ndarray:
    """``rows`` independent draws of ``k`` distinct integers from [0, population)."""
    return rng.random((rows, population)).argsort(axis=1)[:, :k]


def recall_batch(spec: RecallSpec, rows: int, seed: int, step: int, stream: int = TRAIN_STREAM
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of shape [rows, seq_len]: a pure function of (stream, seed, step), like data.batch_offsets.

    x is the pairs, then ``n_queries`` times (query marker, query key) for distinct keys; y is -1 (ignored by
    GPT.forward) everywhere except at the query keys, whose targets are their answers.
    """
    rng = np.random.default_rng([stream, seed, step])
    n, m = spec.n_pairs, spec.value_pairs
    r = np.arange(rows)[:, None]
    keys = _distinct(rng, rows, spec.n_keys, n)
    values = _distinct(rng, rows, spec.n_values, m) + spec.n_keys
    if spec.task == "recall":
        firsts, seconds = keys, values
    else:  # chains a -> b -> v: keys[:, :m] are the a's, keys[:, m:] the b's
        order = _distinct(rng, rows, n, n)  # shuffle the pairs, so a link may come before or after its target
        firsts, seconds = keys[r, order], np.concatenate([keys[:, m:], values], axis=1)[r, order]
    q = _distinct(rng, rows, m, spec.n_queries)  # keys[:, q] lead (in one or two hops) to values[:, q]
    seq = np.empty((rows, spec.seq_len), dtype=np.int64)
    seq[:, 0:2 * n:2], seq[:, 1:2 * n:2] = firsts, seconds
    seq[:, 2 * n::2] = spec.query_token
    seq[:, 2 * n + 1::2] = keys[r, q]
    y = np.full_like(seq, -1)
    y[:, 2 * n + 1::2] = values[r, q]
    return torch.from_numpy(seq), torch.from_numpy(y)


def probe_config(spec: RecallSpec, pattern: str, preset: str) -> GPTConfig:
    """A model of the preset's width, the pattern's depth, and just the probe's vocabulary and length."""
    p = get_preset(preset)
    return GPTConfig(vocab_size=spec.vocab_size, block_size=spec.seq_len, n_embd=p["n_embd"], n_head=p["n_head"],
                     layers=pattern, dropout=0.0).validate()


class RecallTask:
    """The probe's training data as a task of train.loop.train: generated batches, loss at the answers only."""

    def __init__(self, spec: RecallSpec, seed: int, rows: int):
        self.spec, self.seed, self.rows_global = spec, seed, rows
        self.tokens_per_row = spec.seq_len

    def rows(self, step: int):
        return recall_batch(self.spec, self.rows_global, self.seed, step)

    def take(self, batch, lo: int, hi: int, device):
        return tuple(t[lo:hi].to(device) for t in batch)

    def loss(self, model, micro):
        _, loss = model(*micro)
        return loss, {}


def train_probe_model(spec: RecallSpec, pattern: str, preset: str, *, seed: int, steps: int, batch_size: int,
                      lr: float, device="cpu", progress: bool = False) -> tuple[GPT, float]:
    """A fresh model trained on ``steps`` generated batches; returns it and its mean loss over the last 10% of steps.

    The shared training loop, in memory: AdamW, a short warmup then cosine decay to a tenth, clipping at 1.
    The caller's torch random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(probe_config(spec, pattern, preset))
        cfg = TrainConfig(max_steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 20),
                          min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0, eval_interval=steps, seed=seed,
                          progress=progress)
        result = train(model, RecallTask(spec, seed, batch_size), cfg, device=torch.device(device),
                       info={"stage": f"probe {pattern} seed {seed}"})
    tail = [m["loss"] for m in result.metrics][-max(1, steps // 10):]
    return model.eval(), sum(tail) / len(tail)


@torch.inference_mode()
def probe_accuracy(model: GPT, spec: RecallSpec, examples: int, batch_size: int = 500) -> dict:
    """Accuracy and loss over the answer positions of ``examples`` held-out sequences (the same set for every
    model); ``first_query_accuracy`` counts only each sequence's first query, the single-query version."""
    device = next(model.parameters()).device
    correct, first, loss_sum, answers = 0, 0, 0.0, 0
    with evaluating(model) as model:
        for i, start in enumerate(range(0, examples, batch_size)):
            x, y = recall_batch(spec, min(batch_size, examples - start), EVAL_SEED, i, stream=EVAL_STREAM)
            at = y[0] >= 0  # the answer positions are the same in every row
            logits = model(x.to(device))[:, at].float()
            target = y[:, at].to(device)
            hit = logits.argmax(-1) == target
            correct += int(hit.sum())
            first += int(hit[:, 0].sum())
            loss_sum += float(F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum"))
            answers += target.numel()
    return {"accuracy": correct / answers, "first_query_accuracy": first / examples,
            "answer_loss": loss_sum / answers, "examples": examples, "answers": answers}


@torch.inference_mode()
def window_losses(model: GPT, val_tokens: np.ndarray, max_tokens: int, batch_size: int = 16) -> torch.Tensor:
    """Next-token loss [windows, T] over the windows evaluate_lm reads (train.evaluate.windows)."""
    T = model.config.block_size
    if min(max_tokens, len(val_tokens) - 1) < T:
        raise HybridGPTError(f"loss by position needs whole windows of {T} targets: at least {T + 1} validation "
                             f"tokens and max_tokens {T}; got {len(val_tokens)} tokens and max_tokens {max_tokens}")
    device = next(model.parameters()).device
    rows_out = []
    with evaluating(model) as model:
        for chunk in windows(val_tokens, T, max_tokens, batch_size):
            x, y = chunk[:, :-1].to(device), chunk[:, 1:].to(device)
            logits = model(x).float()
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
            rows_out.append(loss.view(len(chunk), T).double().cpu())
    return torch.cat(rows_out)


def position_loss(model: GPT, val_tokens: np.ndarray, max_tokens: int, batch_size: int = 16) -> list[float]:
    """Mean next-token loss at each position 0..T-1 of the context window; its mean is evaluate_lm's loss."""
    return window_losses(model, val_tokens, max_tokens, batch_size).mean(0).tolist()


def _buckets(T: int) -> list[tuple[int, int]]:
    """Equal position ranges [lo, hi) covering 0..T-1."""
    n = min(N_BUCKETS, T)
    edges = [round(i * T / n) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def summarize_curve(curve: list[float]) -> dict:
    """Bucket means, and late - mid: mean loss over the last quarter of positions minus the second quarter.

    The more negative late - mid, the more a model still gains from context far back.
    """
    T = len(curve)
    q = max(1, T // 4)
    return {"buckets": [{"lo": lo, "hi": hi, "loss": _mean(curve[lo:hi])} for lo, hi in _buckets(T)],
            "mean": _mean(curve), "late_minus_mid": _mean(curve[T - q:]) - _mean(curve[q:2 * q])}


def _default_checkpoints(run_dir: Path) -> dict[str, Path]:
    found = {}
    for name in ("standard", "hybrid"):
        path = run_dir / f"pretrain-{name}"
        if is_checkpoint(path):
            found[name] = path
    return found


def _label(path: Path) -> str:
    name = path.name if path.suffix not in (".pt", ".safetensors") else path.parent.name
    return name.removeprefix("pretrain-")


def _ci(values: torch.Tensor) -> dict:
    stat = mean_ci(values.tolist())
    return {"mean": stat["mean"], "ci95": stat["ci95"], "n": stat["n"]}


def _gap(per_window: torch.Tensor) -> dict:
    """A model's loss minus the baseline's, per position and bucket, with 95% intervals over the windows
    (paired: both models read the same windows), and how the gap changes from the first bucket to the last."""
    buckets = [per_window[:, lo:hi].mean(1) for lo, hi in _buckets(per_window.size(1))]
    curve = per_window.mean(0).tolist()
    return {"curve": curve, **summarize_curve(curve),
            "bucket_ci": [_ci(b) for b in buckets], "last_minus_first": _ci(buckets[-1] - buckets[0])}


def position_losses(checkpoints: dict[str, Path], max_tokens: int, device="cpu", log=print) -> dict:
    """Loss-by-position curves of each checkpoint on its own validation split, and the gap of every other
    model to the first all-attention one: only between models of the same data and context, since losses
    in nats per token of different tokenizers do not compare."""
    models, per_window = {}, {}
    for label, path in checkpoints.items():
        model, tokenizer, training = load_checkpoint(path, device=device)
        data = checkpoint_data(Path(path), tokenizer, training)
        per_window[label] = window_losses(model, data.val, max_tokens)
        curve = per_window[label].mean(0).tolist()
        models[label] = {"checkpoint": str(path), "layers": model.config.layers, "block_size": len(curve),
                         "data_dir": str(Path(data.root).resolve()), "windows": per_window[label].size(0),
                         "curve": curve, **summarize_curve(curve)}
        log(f"probe: loss by position of {label} ({model.config.layers}): mean {models[label]['mean']:.4f}, "
            f"late - mid {models[label]['late_minus_mid']:+.4f}")
    base = next((k for k, v in models.items() if set(v["layers"]) == {"A"}), None)
    gaps = {}
    for label, m in models.items():
        if base is None or label == base or (m["block_size"], m["data_dir"]) != (models[base]["block_size"],
                                                                                models[base]["data_dir"]):
            continue
        gaps[label] = {"vs": base, **_gap(per_window[label] - per_window[base])}
    return {"max_tokens": max_tokens, "models": models, "baseline": base, "gaps": gaps}


def run_probe(*, run_dir, out_dir=None, patterns=DEFAULT_PATTERNS, preset: str = "cpu", seeds=(1, 2, 3),
              steps: int | None = None, task: str | None = None, checkpoints=None, device="cpu", log=print,
              progress: bool = True) -> dict:
    """Train every pattern on the recall probe, measure loss by position of the checkpoints, write
    probe.json, probe.md and the PNGs into ``out_dir`` (default ``run_dir/probe``), return the results.

    ``checkpoints``: paths (or {label: path}); by default ``run_dir/pretrain-{standard,hybrid}`` where present.
    """
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "probe"
    check_replaceable(out, PROBE_FILES, "probe output")  # before the work, not after it
    if preset not in PROBE_SETTINGS:
        raise HybridGPTError(f"unknown preset {preset!r}; choose one of {', '.join(PROBE_SETTINGS)}")
    settings = dict(PROBE_SETTINGS[preset])
    if steps is not None:
        if steps < 1:
            raise HybridGPTError(f"steps must be at least 1, got {steps}")
        settings["steps"] = steps
    if task is not None:
        settings["task"] = task
    patterns = [parse_layers(p) for p in patterns if p.strip()]  # a bad letter fails now, before any training
    if not patterns:
        raise HybridGPTError("patterns is empty; give layer patterns such as AAAA,AAMM")
    seeds = list(seeds)
    if not seeds:
        raise HybridGPTError("seeds is empty; give at least one seed")
    spec = RecallSpec(settings["task"], settings["n_pairs"], settings["n_keys"], settings["n_values"],
                      settings["n_queries"]).validate()
    if checkpoints is None:
        checkpoints = _default_checkpoints(run_dir)
    elif not isinstance(checkpoints, dict):
        labelled = {}
        for c in map(Path, checkpoints):
            labelled[_label(c) if _label(c) not in labelled else str(c)] = c
        checkpoints = labelled
    for path in checkpoints.values():
        resolve(path)  # a missing checkpoint is an error now, not after minutes of training
    device = resolve_device(device) if isinstance(device, str) else device
    preset_values = get_preset(preset)

    log(f"probe: {spec.task} with {spec.n_pairs} pairs (vocab {spec.vocab_size}, length {spec.seq_len}), "
        f"{settings['steps']} steps x {settings['batch_size']} per pattern; chance {spec.chance:.3f}, "
        f"guessing a value in context {spec.in_context_chance:.3f}")
    results = []
    for pattern in patterns:
        runs = []
        for seed in seeds:
            t0 = time.time()
            model, train_loss = train_probe_model(spec, pattern, preset, seed=seed, steps=settings["steps"],
                                                  batch_size=settings["batch_size"], lr=settings["lr"],
                                                  device=device, progress=progress)
            ev = probe_accuracy(model, spec, settings["eval_examples"])
            runs.append({"seed": seed, **ev, "train_loss": train_loss, "seconds": time.time() - t0})
            log(f"probe {pattern} seed {seed}: accuracy {ev['accuracy']:.3f} (chance {spec.chance:.3f}) "
                f"in {runs[-1]['seconds']:.0f}s")
        results.append({"pattern": pattern, "attention_layers": pattern.count("A"), "params": model.num_params(),
                        "accuracy": mean_ci([r["accuracy"] for r in runs]), "runs": runs})

    positions = position_losses(checkpoints, settings["position_tokens"], device, log) if checkpoints else None
    result = {
        "settings": {"preset": preset, **settings, "seeds": seeds, "eval_seed": EVAL_SEED,
                     "n_embd": preset_values["n_embd"], "n_head": preset_values["n_head"],
                     "spec": asdict(spec), "vocab_size": spec.vocab_size, "seq_len": spec.seq_len},
        "chance": spec.chance,
        "in_context_chance": spec.in_context_chance,
        "patterns": results,
        "position_loss": positions,
        "plots": {},
    }
    with output_dir(out, allowed=PROBE_FILES, what="probe output", overwrite=True) as tmp:
        result["plots"]["accuracy"] = plot_accuracy(result, tmp)
        if positions and positions["models"]:
            result["plots"]["position_loss"] = plot_position_loss(result, tmp)
        write_json(tmp / "probe.json", result)
        write_text(tmp / "probe.md", render_probe_markdown(result))
    log(f"probe: wrote {out / 'probe.md'}")
    return result


def plot_accuracy(result: dict, out: Path) -> str:

    def draw(plt):
        rows = result["patterns"]
        fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 3, 4))
        xs = range(len(rows))
        means = [r["accuracy"]["mean"] for r in rows]
        err = [[m - (r["accuracy"]["ci95"] or [m, m])[0] for m, r in zip(means, rows)],
               [(r["accuracy"]["ci95"] or [m, m])[1] - m for m, r in zip(means, rows)]]
        ax.bar(xs, means, yerr=err, capsize=4, color="tab:blue", alpha=0.8)
        for x, r in zip(xs, rows):
            ax.plot([x] * len(r["runs"]), [s["accuracy"] for s in r["runs"]], "k.", alpha=0.6)
        ax.axhline(result["chance"], color="tab:red", ls="--", label=f"chance ({result['chance']:.3f})")
        ax.axhline(result["in_context_chance"], color="tab:gray", ls=":",
                   label=f"guess a value in context ({result['in_context_chance']:.3f})")
        ax.set_xticks(list(xs), [r["pattern"] for r in rows])
        ax.set_ylim(0, 1)
        ax.set_ylabel("held-out accuracy")
        ax.set_title(f"{result['settings']['task']} probe, {result['settings']['steps']} steps per pattern")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        return fig
    return save_plot(out / "probe-accuracy.png", draw)


def plot_position_loss(result: dict, out: Path) -> str:

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


def _above(stat: dict, level: float) -> bool:
    """Above ``level`` by the 95% interval, or by 0.05 when a single seed gives no interval."""
    return stat["ci95"][0] > level if stat["ci95"] else stat["mean"] > level + 0.05


def _accuracy_sentences(result: dict) -> list[str]:
    rows, chance, ctx = result["patterns"], result["chance"], result["in_context_chance"]
    top = max(r["accuracy"]["mean"] for r in rows)
    best = [r["pattern"] for r in rows if f"{r['accuracy']['mean']:.3f}" == f"{top:.3f}"]
    how = "by its 95% interval" if result["settings"]["seeds"][1:] else "by more than 0.05"
    groups = [
        (f"Above the guess-a-value-in-context baseline {how} (the lookup was learned)",
         [r for r in rows if _above(r["accuracy"], ctx)]),
        ("Above chance but not above that baseline (at most which values are present was learned)",
         [r for r in rows if _above(r["accuracy"], chance) and not _above(r["accuracy"], ctx)]),
        ("Not above chance", [r for r in rows if not _above(r["accuracy"], chance)]),
    ]
    lines = [f"Best: {', '.join(best)} at {top:.3f}."]
    lines += [f"{label}: {', '.join(r['pattern'] for r in group)}." for label, group in groups if group]
    if not result["settings"]["seeds"][1:]:
        lines.append("One seed: the noise cannot be judged (run with --seeds 1,2,3).")
    return lines


def render_probe_markdown(result: dict) -> str:
    s = result["settings"]
    lines = ["## Token-mixing probe", ""]
    hops = "two-hop associative recall (a -> b, b -> v; query a, answer v)" if s["task"] == "two-hop" \
        else "associative recall (query a key, answer its value)"
    lines.append(f"Task: {hops}, {s['n_pairs']} pairs then {s['n_queries']} queries per sequence, {s['n_keys']} "
                 f"keys, {s['n_values']} values (sequence length {s['seq_len']}). Each pattern: a fresh model of "
                 f"width {s['n_embd']} ({s['n_head']} heads), AdamW at lr {s['lr']:g} for {s['steps']} steps of "
                 f"{s['batch_size']} sequences, seeds {', '.join(map(str, s['seeds']))}; accuracy over the answers of "
                 f"{s['eval_examples']:,} held-out sequences. Chance is {result['chance']:.3f}; guessing among the "
                 f"values in the sequence gives {result['in_context_chance']:.3f}.")
    lines += ["", "| pattern | attention layers | params | accuracy | chance | answer loss |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in result["patterns"]:
        loss = _mean([x["answer_loss"] for x in r["runs"]])
        lines.append(f"| {r['pattern']} | {r['attention_layers']} | {r['params']:,} | {format_ci(r['accuracy'], 3)} "
                     f"| {result['chance']:.3f} | {loss:.3f} |")
    lines += ["", *_accuracy_sentences(result), ""]
    if "accuracy" in result["plots"]:
        lines += [f"![probe accuracy]({result['plots']['accuracy']})", ""]

    pl = result["position_loss"]
    lines += ["### Loss by position in the context window", ""]
    if not pl or not pl["models"]:
        lines += ["No pretrained checkpoints were given (or found in the run directory), so there is no "
                  "loss-by-position curve.", ""]
        return "\n".join(lines)
    first = next(iter(pl["models"].values()))
    # One table needs one set of positions: a model of another context length is named, not tabulated.
    models = {k: m for k, m in pl["models"].items() if m["block_size"] == first["block_size"]}
    gaps = {k: g for k, g in pl["gaps"].items() if k in models}
    lines.append(f"Mean next-token loss (nats) by position, over {first['windows']:,} non-overlapping validation "
                 f"windows of {first['block_size']} tokens. Late - mid = mean loss over the last quarter of "
                 "positions minus the second quarter (more negative: more gain from far context).")
    lines += [""]
    header = ["positions", *[f"{k} ({m['layers']})" for k, m in models.items()], *[f"{k} - {g['vs']}"
                                                                                   for k, g in gaps.items()]]
    lines += ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for i, b in enumerate(first["buckets"]):
        cells = [f"{b['lo']}-{b['hi'] - 1}"]
        cells += [f"{m['buckets'][i]['loss']:.4f}" for m in models.values()]
        cells += [format_ci(g["bucket_ci"][i], 4, signed=True) for g in gaps.values()]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["all", *[f"{m['mean']:.4f}" for m in models.values()], *[f"{g['mean']:+.4f}" for g in gaps.values()]]
    lines.append("| " + " | ".join(cells) + " |")
    cells = ["late - mid", *[f"{m['late_minus_mid']:+.4f}" for m in models.values()],
             *[f"{g['late_minus_mid']:+.4f}" for g in gaps.values()]]
    lines += ["| " + " | ".join(cells) + " |", ""]
    for label, g in gaps.items():
        change = g["last_minus_first"]
        lo, hi = change["ci95"] or (change["mean"], change["mean"])
        verdict = ("grows with position" if lo > 0 else "shrinks with position" if hi < 0
                   else "shows no change with position beyond noise")
        first, last = (format_ci(g["bucket_ci"][i], 4, signed=True) for i in (0, -1))
        lines.append(f"{label} - {g['vs']}: {first} nats in the first bucket "
                     f"and {last} in the last (95% intervals over the windows, "
                     "which leave out the noise of training these checkpoints); "
                     f"last minus first {format_ci(change, 4, signed=True)}: the gap {verdict}.")
    for label, m in pl["models"].items():
        if label not in models:
            lines.append(f"{label} ({m['layers']}) has a context of {m['block_size']} tokens, not "
                         f"{first['block_size']}: mean loss {m['mean']:.4f}, late - mid {m['late_minus_mid']:+.4f}.")
    if len(models) < len(pl["models"]) or gaps:
        lines.append("")
    if "position_loss" in result["plots"]:
        lines += [f"![loss by position]({result['plots']['position_loss']})", ""]
    return "\n".join(lines)
