"""The token-mixing probe: can a layer pattern still move information between positions late in the network?

Measurements:

- **Associative recall** (task ``recall``, the one-hop control), generated on the fly:
  ``k1 v1 k2 v2 ... kn vn ? ka ? kb ...``; at each query key the model must name the value paired with it.
  Two attention layers solve it (one pairs each value with the key before it, one looks the query up), so
  every pattern that keeps the first two (AA, AAMM, AANN) can: it cannot tell whether deep attention did anything.
- **Two-hop recall** (task ``two-hop``, the depth test): chains a -> b -> v written as pairs ``a b`` and
  ``b v``, all pairs shuffled; ``? a`` asks for v. Answering composes two lookups after the pairs are bound:
  one layer binds each pair (the second token takes in the first), a second finds a's pair and brings b to
  the query, and only then can a third find b's pair and bring v. Two attention layers should not suffice:
  after one layer a position holds its own token and position plus a mixture of earlier raw tokens, so the
  query's second-layer lookup must pick v's pair by keys that carry b and v but nothing of a, and it does
  not hold b yet. The way round, a first layer that copies the whole context into every position for the
  MLPs to resolve, needs a residual of about vocabulary x length dimensions (34 x 30 at the cpu preset
  against a width of 128). No shortcut: the answer is a value while one hop from a lands on a key; the
  pairs are shuffled, so every position varies; every chain, asked or not, is drawn alike, so the distractor
  values in context look like the answer. One-hop queries ``! k`` (answer: the second token of k's pair) are
  mixed into each sequence and trained on but scored apart (``link_accuracy``): they give the lookup a
  signal of its own, since a loss only at the two-hop answers leaves the model nothing to climb from the
  guess-a-value-in-context plateau until the whole three-layer circuit exists.
- **Loss by position** on the validation split, for pretrained checkpoints: a model that cannot mix
  tokens late should gain less from long contexts than one that can.

Every pattern gets a fresh model of the preset's width and the same seeded training budget per task;
accuracy is taken at the scored answer positions only, on a held-out generated set. Several queries per
sequence, not one: with a single answer per sequence an AA model of the cpu preset's width sat on the
guess-a-value-in-context plateau for 1,500 steps; with four queries it left it after 400.

Judgement per pattern and task, from a fixed threshold (LEARNED_FRACTION): a seed has *learned* the task
when its accuracy is at least half of the way from guessing a value in context (1 / the values in the
sequence) to 1. The pattern *learns it* when every seed has, *does not learn it* when no seed has, and is
*unstable* when its seeds disagree (say 1.0, 1.0, 0.27): a mean with a wide interval is not "at chance".
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hybrid_gpt.analysis.probe_config import DEFAULT_PATTERNS, DEFAULT_SEEDS, DEFAULT_TASK, TASK_CHOICES, TASKS
from hybrid_gpt.checkpoint import (
    checkpoint_data,
    is_checkpoint,
    load_checkpoint,
    open_checkpoint_data,
    read_config,
    resolve,
)
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import check_replaceable, output_dir
from hybrid_gpt.model.gpt import GPT, GPTConfig, parse_layers
from hybrid_gpt.present.probe import write_outputs
from hybrid_gpt.presets import get_preset
from hybrid_gpt.runtime import resolve_device
from hybrid_gpt.stats import mean_ci
from hybrid_gpt.train.evaluate import evaluating, windows
from hybrid_gpt.train.loop import TrainConfig, train

logger = logging.getLogger(__name__)

# The probe's own budget per preset and task; the model width comes from the preset itself.
PROBE_SETTINGS: dict[str, dict[str, dict]] = {
    "smoke": {
        "recall": dict(n_pairs=2, n_keys=16, n_values=16, n_queries=2, steps=80, batch_size=32, lr=3e-3,
                       eval_examples=500),
        "two-hop": dict(n_pairs=4, n_keys=16, n_values=16, n_queries=2, n_links=4, steps=80, batch_size=32, lr=3e-3,
                        eval_examples=500),
    },
    "cpu": {
        # lr 3e-4: at 1e-3 the 4-layer models stayed on the guess-a-value-in-context plateau for 1,000 steps.
        "recall": dict(n_pairs=4, n_keys=16, n_values=16, n_queries=4, steps=800, batch_size=64, lr=3e-4,
                       eval_examples=2000),
        # One-hop queries on every pair: with half the pairs asked, AAAA had not learned even those in 1,200 steps.
        "two-hop": dict(n_pairs=6, n_keys=16, n_values=16, n_queries=3, n_links=6, steps=2000, batch_size=64, lr=3e-4,
                        eval_examples=2000),
    },
    "seed": {
        "recall": dict(n_pairs=8, n_keys=64, n_values=64, n_queries=8, steps=3000, batch_size=128, lr=3e-4,
                       eval_examples=2000),
        "two-hop": dict(n_pairs=8, n_keys=64, n_values=64, n_queries=4, n_links=8, steps=3000, batch_size=128,
                        lr=3e-4, eval_examples=2000),
    },
}
PROBE_POSITION_TOKENS = {"smoke": 4096, "cpu": 131072, "seed": 131072}  # validation tokens of loss by position
# A seed has learned a task at LEARNED_FRACTION of the way from guessing a value in context to perfect accuracy.
LEARNED_FRACTION = 0.5
JUDGEMENTS = ("learns", "does not learn", "unstable")
TRAIN_STREAM, EVAL_STREAM = 0, 1  # first entropy word of the generator: training and held-out data never share a stream
EVAL_SEED = 0  # one held-out set for every pattern and seed, so accuracies are paired
N_BUCKETS = 8  # position buckets of the loss-by-position table


@dataclass(frozen=True)
class RecallSpec:
    """Token layout: keys are ids [0, n_keys), values [n_keys, n_keys + n_values), then the query marker (and,
    for two-hop, the link marker of the one-hop queries mixed in).

    Two-hop: ``n_pairs // 2`` chains a -> b -> v, so ``n_pairs`` pairs; ``n_queries`` scored two-hop queries
    (``? a``, answer v) on distinct chains and ``n_links`` one-hop queries (``! k``, answer the second token of
    k's pair) on distinct pairs, in a random order per sequence.
    """

    task: str = "recall"
    n_pairs: int = 4
    n_keys: int = 16
    n_values: int = 16
    n_queries: int = 4
    n_links: int = 0

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
        most = self.n_pairs if self.task == "two-hop" else 0
        if not 0 <= self.n_links <= most:
            raise HybridGPTError(f"probe n_links must be in 0..{most} for {self.task} (one-hop queries on distinct "
                                 f"pairs of a two-hop sequence), got {self.n_links}")
        return self

    @property
    def value_pairs(self) -> int:
        """Pairs whose second token is a value: all of them for recall, half for two-hop (the rest link keys)."""
        return self.n_pairs if self.task == "recall" else self.n_pairs // 2

    @property
    def query_token(self) -> int:
        """The marker before a scored query key."""
        return self.n_keys + self.n_values

    @property
    def link_token(self) -> int:
        """The marker before a one-hop query of a two-hop sequence (trained on, scored apart)."""
        return self.n_keys + self.n_values + 1

    @property
    def vocab_size(self) -> int:
        return self.n_keys + self.n_values + (2 if self.task == "two-hop" else 1)

    @property
    def seq_len(self) -> int:
        return 2 * self.n_pairs + 2 * (self.n_queries + self.n_links)

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

    x is the pairs, then the queries, each a marker and a key (distinct keys per kind); y is -1 (ignored by
    GPT.forward) everywhere except at the query keys, whose targets are their answers.
    """
    rng = np.random.default_rng([stream, seed, step])
    n, m = spec.n_pairs, spec.value_pairs
    r = np.arange(rows)[:, None]
    keys = _distinct(rng, rows, spec.n_keys, n)
    values = _distinct(rng, rows, spec.n_values, m) + spec.n_keys
    seq = np.empty((rows, spec.seq_len), dtype=np.int64)
    y = np.full_like(seq, -1)
    if spec.task == "recall":
        seq[:, 0:2 * n:2], seq[:, 1:2 * n:2] = keys, values
        q = _distinct(rng, rows, m, spec.n_queries)
        seq[:, 2 * n::2] = spec.query_token
        seq[:, 2 * n + 1::2] = keys[r, q]
        y[:, 2 * n + 1::2] = values[r, q]
        return torch.from_numpy(seq), torch.from_numpy(y)
    # Chains a -> b -> v: pair i is (keys[i], seconds[i]); pairs [0, m) are the links a -> b, [m, n) the b -> v.
    seconds = np.concatenate([keys[:, m:], values], axis=1)
    order = _distinct(rng, rows, n, n)  # shuffle the pairs, so a link may come before or after its target
    seq[:, 0:2 * n:2], seq[:, 1:2 * n:2] = keys[r, order], seconds[r, order]
    q = _distinct(rng, rows, m, spec.n_queries)  # keys[:, q] lead in two hops to values[:, q]
    links = _distinct(rng, rows, n, spec.n_links)  # one hop: keys[:, l] -> seconds[:, l]
    markers = np.concatenate([np.full(q.shape, spec.query_token), np.full(links.shape, spec.link_token)], axis=1)
    asked = np.concatenate([keys[r, q], keys[r, links]], axis=1)
    answers = np.concatenate([values[r, q], seconds[r, links]], axis=1)
    mix = _distinct(rng, rows, markers.shape[1], markers.shape[1])  # the two kinds in a random order
    seq[:, 2 * n::2], seq[:, 2 * n + 1::2] = markers[r, mix], asked[r, mix]
    y[:, 2 * n + 1::2] = answers[r, mix]
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


def _hits(logits: torch.Tensor, y: torch.Tensor, at: torch.Tensor) -> tuple[int, int, float, int]:
    """Correct answers, correct first answers (per row), summed loss and answers, over the positions ``at``."""
    if not bool(at.any()):
        return 0, 0, 0.0, 0
    hit = (logits.argmax(-1) == y) & at
    first = hit.gather(1, at.int().argmax(1, keepdim=True))  # each row's first position in ``at``
    loss = float(F.cross_entropy(logits[at], y[at], reduction="sum"))
    return int(hit.sum()), int(first.sum()), loss, int(at.sum())


@torch.inference_mode()
def probe_accuracy(model: GPT, spec: RecallSpec, examples: int, batch_size: int = 500) -> dict:
    """Accuracy and loss over the scored answers of ``examples`` held-out sequences (the same set for every
    model); ``first_query_accuracy`` counts only each sequence's first scored query, the single-query version.
    A two-hop sequence with one-hop queries mixed in adds ``link_accuracy``: those answered, apart."""
    device = next(model.parameters()).device
    totals = {"query": [0, 0, 0.0, 0], "link": [0, 0, 0.0, 0]}
    with evaluating(model) as model:
        for i, start in enumerate(range(0, examples, batch_size)):
            x, y = recall_batch(spec, min(batch_size, examples - start), EVAL_SEED, i, stream=EVAL_STREAM)
            logits = model(x.to(device)).float().cpu()
            marker = torch.cat([torch.full_like(x[:, :1], -1), x[:, :-1]], dim=1)  # the token before each position
            for kind, token in (("query", spec.query_token), ("link", spec.link_token)):
                for j, v in enumerate(_hits(logits, y, (y >= 0) & (marker == token))):
                    totals[kind][j] += v
    correct, first, loss_sum, answers = totals["query"]
    out = {"accuracy": correct / answers, "first_query_accuracy": first / examples,
           "answer_loss": loss_sum / answers, "examples": examples, "answers": answers}
    if totals["link"][3]:
        out["link_accuracy"] = totals["link"][0] / totals["link"][3]
    return out


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


def check_position_data(path: Path, max_tokens: int) -> None:
    """HybridGPTError unless the checkpoint at ``path`` has prepared data of its own tokenizer holding the whole
    windows :func:`window_losses` reads: checked from its config.json and data, before any probe trains."""
    data = open_checkpoint_data(path)
    T = read_config(resolve(path)[0])[0].block_size
    if min(max_tokens, len(data.val) - 1) < T:
        raise HybridGPTError(f"loss by position of {path} needs whole windows of its context, {T} tokens: its "
                             f"validation split in {data.root} has {len(data.val):,} tokens and the budget is "
                             f"{max_tokens:,}; prepare a larger corpus or leave it out of --checkpoints")


def position_losses(checkpoints: dict[str, Path], max_tokens: int, device="cpu") -> dict:
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
        logger.info(f"probe: loss by position of {label} ({model.config.layers}): mean {models[label]['mean']:.4f}, "
                    f"late - mid {models[label]['late_minus_mid']:+.4f}")
    base = next((k for k, v in models.items() if set(v["layers"]) == {"A"}), None)
    gaps = {}
    for label, m in models.items():
        if base is None or label == base or (m["block_size"], m["data_dir"]) != (models[base]["block_size"],
                                                                                models[base]["data_dir"]):
            continue
        gaps[label] = {"vs": base, **_gap(per_window[label] - per_window[base])}
    return {"max_tokens": max_tokens, "models": models, "baseline": base, "gaps": gaps}


def _spec(settings: dict, task: str) -> RecallSpec:
    return RecallSpec(task, settings["n_pairs"], settings["n_keys"], settings["n_values"], settings["n_queries"],
                      settings.get("n_links", 0)).validate()


def learned_threshold(in_context_chance: float) -> float:
    """The accuracy at which one seed counts as having learned a task: LEARNED_FRACTION of the way from
    guessing a value in context (the plateau every pattern reaches without a lookup) to perfect."""
    return in_context_chance + LEARNED_FRACTION * (1.0 - in_context_chance)


def judge_seeds(accuracies: list[float], in_context_chance: float) -> str:
    """One of JUDGEMENTS: every seed at or over learned_threshold, none of them, or some but not all."""
    learned = sum(a >= learned_threshold(in_context_chance) for a in accuracies)
    return JUDGEMENTS[0] if learned == len(accuracies) else JUDGEMENTS[1] if learned == 0 else JUDGEMENTS[2]


def _probe_task(spec: RecallSpec, settings: dict, patterns: list[str], seeds: list[int], preset: str, device,
                progress: bool) -> dict:
    """Train and score every pattern x seed on one task; the task's block of probe.json."""
    preset_values = get_preset(preset)
    logger.info(f"probe: {spec.task} with {spec.n_pairs} pairs (vocab {spec.vocab_size}, length {spec.seq_len}), "
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
            logger.info(f"probe {spec.task} {pattern} seed {seed}: accuracy {ev['accuracy']:.3f} "
                        f"(chance {spec.chance:.3f}) in {runs[-1]['seconds']:.0f}s")
        accuracies = [r["accuracy"] for r in runs]
        results.append({"pattern": pattern, "attention_layers": pattern.count("A"), "params": model.num_params(),
                        "accuracy": mean_ci(accuracies), "runs": runs,
                        "seeds_learned": sum(a >= learned_threshold(spec.in_context_chance) for a in accuracies),
                        "judgement": judge_seeds(accuracies, spec.in_context_chance)})
    return {"task": spec.task,
            "settings": {"preset": preset, "task": spec.task, **settings, "seeds": seeds, "eval_seed": EVAL_SEED,
                         "n_embd": preset_values["n_embd"], "n_head": preset_values["n_head"],
                         "spec": asdict(spec), "vocab_size": spec.vocab_size, "seq_len": spec.seq_len},
            "chance": spec.chance, "in_context_chance": spec.in_context_chance,
            "learned_threshold": learned_threshold(spec.in_context_chance), "patterns": results}


def run_probe(*, run_dir, out_dir=None, patterns=DEFAULT_PATTERNS, preset: str = "cpu", seeds=DEFAULT_SEEDS,
              steps: int | None = None, task: str = DEFAULT_TASK, checkpoints=None, device="cpu",
              progress: bool = True) -> dict:
    """Train every pattern on the recall probe(s), measure loss by position of the checkpoints, write
    probe.json, probe.md and the PNGs into ``out_dir`` (default ``run_dir/probe``), return the results.

    ``task``: "recall", "two-hop" or "both" (recall first). ``steps`` replaces every task's step count.
    ``checkpoints``: paths (or {label: path}); by default ``run_dir/pretrain-{standard,hybrid}`` where present.
    probe.json: ``tasks`` maps each task run to its block (settings, chance, in_context_chance,
    learned_threshold, patterns with accuracy, runs, seeds_learned and judgement); the top-level ``settings``,
    ``chance``, ``in_context_chance`` and ``patterns`` repeat the first task's, as before there were two.
    """
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "probe"
    check_replaceable(out, PROBE_FILES, "probe output")  # before the work, not after it
    if preset not in PROBE_SETTINGS:
        raise HybridGPTError(f"unknown preset {preset!r}; choose one of {', '.join(PROBE_SETTINGS)}")
    if task not in TASK_CHOICES:
        raise HybridGPTError(f"unknown probe task {task!r}; choose one of {', '.join(TASK_CHOICES)}")
    if steps is not None and steps < 1:
        raise HybridGPTError(f"steps must be at least 1, got {steps}")
    tasks = TASKS if task == "both" else (task,)
    settings = {t: {**PROBE_SETTINGS[preset][t], **({"steps": steps} if steps is not None else {})} for t in tasks}
    specs = {t: _spec(settings[t], t) for t in tasks}
    patterns = [parse_layers(p) for p in patterns if p.strip()]  # a bad letter fails now, before any training
    if not patterns:
        raise HybridGPTError("patterns is empty; give layer patterns such as AAAA,AAMM")
    seeds = list(seeds)
    if not seeds:
        raise HybridGPTError("seeds is empty; give at least one seed")
    if checkpoints is None:
        checkpoints = _default_checkpoints(run_dir)
    elif not isinstance(checkpoints, dict):
        labelled = {}
        for c in map(Path, checkpoints):
            labelled[_label(c) if _label(c) not in labelled else str(c)] = c
        checkpoints = labelled
    position_tokens = PROBE_POSITION_TOKENS[preset]
    for path in checkpoints.values():  # a missing checkpoint or its data is an error now, not after the training
        check_position_data(path, position_tokens)
    device = resolve_device(device) if isinstance(device, str) else device

    blocks = {t: _probe_task(specs[t], settings[t], patterns, seeds, preset, device, progress) for t in tasks}
    positions = position_losses(checkpoints, position_tokens, device) if checkpoints else None
    first = blocks[tasks[0]]
    result = {
        "settings": {**first["settings"], "tasks": list(tasks), "position_tokens": position_tokens,
                     "learned_fraction": LEARNED_FRACTION},
        "chance": first["chance"],
        "in_context_chance": first["in_context_chance"],
        "patterns": first["patterns"],
        "tasks": blocks,
        "position_loss": positions,
        "plots": {},
    }
    with output_dir(out, allowed=PROBE_FILES, what="probe output", overwrite=True) as tmp:
        write_outputs(result, tmp)
    logger.info(f"probe: wrote {out / 'probe.md'}")
    return result
