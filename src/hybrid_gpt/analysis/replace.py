"""Replacement at a real budget: k attention layers of a pretrained model replaced by per-token functions, with
controls, healing curves, training seeds and a held-out selection slice apart from the test windows.

It builds on a staticness map (analysis/static.py) of the same checkpoint, whose captures (every attention
layer's input u = ln_1(x) and output on training-split windows) and fitted MLPs it reuses, so that the
distilled replacements are the map's converged, early-stopped fits. Per k and choice of layers (the k deepest,
or the k least important by residual similarity on the training split, as in retrofit), the arms:

- drop: the blocks become N (no mixer);
- constant: each mixer outputs the training mean of its attention output (costs nothing at run time);
- linear: each mixer is the map's ridge regression of the output on u, refitted from the captures;
- distil: M blocks of hidden width ``width`` holding the map's fitted MLPs;
- matched: M blocks whose MLP has as many parameters as the attention block it replaces, fitted the same way;
- distil+heal (one arm per training seed) and drop+heal: the arm, then a whole-model fine-tune toward the full
  model's logits (KL, distill.LogitMatching) at a constant learning rate after a short warmup, scored at
  every point of the healing curve; drop+heal sees the same batches, then continues until it has also used
  the teacher forwards the distillation's captures cost (matched compute).

Held-out windows of ``eval_context`` tokens are spread over the whole held-out split and dealt into a selection
slice and disjoint test windows. The choice of layers at each k is made from the distil arms' selection-slice
bits per byte alone (:func:`select_choice`); every reported figure is on the test windows, as a difference to
the full model paired by window, and for the seeded arm over windows and seeds together (stats.seed_window_ci).
Passkey retrieval runs at the lengths where the full model is reliable. Speed: bench's estimator in separate
processes (analysis/speed_worker.py), the full model interleaved with each replaced shape at the same context.

Every finished arm is recorded in state.json at once, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from hybrid_gpt.analysis import passkey
from hybrid_gpt.analysis.distill import LogitMatching, transplant
from hybrid_gpt.analysis.importance import ConstantMixer, attention_layers, attention_stats, swapped_mixers
from hybrid_gpt.analysis.replace_config import ReplaceConfig
from hybrid_gpt.analysis.retrofit import choose_layers
from hybrid_gpt.analysis.runstate import RunState, resumable_dir
from hybrid_gpt.analysis.static import (
    StaticConfig,
    capture_plan,
    closed_form,
    fit_mlp,
    load_fit,
    load_layer,
    save_fit,
    split_rows,
)
from hybrid_gpt.analysis.verdict import QUALITY_TOLERANCE, SPEED_GAIN, STATES
from hybrid_gpt.checkpoint import checkpoint_data, load_checkpoint, weights_sha256
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import read_json, write_json
from hybrid_gpt.model.gpt import GPT, GPTConfig, TokenMLP
from hybrid_gpt.options import check_fields
from hybrid_gpt.runtime import resolve_device
from hybrid_gpt.stats import judge_interval, mean_ci, seed_window_ci
from hybrid_gpt.train.evaluate import bpb_difference, evaluate_lm, window_differences, window_starts
from hybrid_gpt.train.loop import TrainConfig, train

logger = logging.getLogger(__name__)

# What a replacement study's directory may hold (a tree spec, fsutil.check_replaceable): anything else, at any
# depth, means it is not ours to resume or replace.
REPLACE_FILES = ("replace.json", "replace.md", "replace-*.png", "state.json", "fits/*.safetensors", "fits/*.json",
                 "speed/run-*.json")
FULL = "full"


# ---- per-token mixers that are not M blocks --------------------------------------------------------------------

class LinearMixer(nn.Module):
    """Stands in for an attention sub-layer: an affine map of the block's own token, u W + b."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", bias.detach().float().clone())

    def forward(self, x: torch.Tensor, kv_cache=None) -> torch.Tensor:
        return (x.float() @ self.weight + self.bias).to(x.dtype)


def matched_width(config: GPTConfig, attention: nn.Module) -> int:
    """The M width whose TokenMLP has about as many parameters as ``attention`` (the block it replaces)."""
    def params(width: int) -> int:
        return sum(p.numel() for p in TokenMLP(replace(config, mlp_hidden=width)).parameters())

    target = sum(p.numel() for p in attention.parameters())
    per_width = params(2) - params(1)
    return max(1, round((target - (params(1) - per_width)) / per_width))


# ---- the map ---------------------------------------------------------------------------------------------------

@dataclass
class MapSource:
    """A staticness map read for its captures and fits: where they are, the recipe its MLPs were fitted by, and
    which captured training windows were its fit and its stopping slice."""

    root: Path
    recipe: StaticConfig
    fit_rows: list[int]
    stop_rows: list[int]

    @classmethod
    def open(cls, root: Path, checkpoint: Path, digest: str | None = None) -> "MapSource":
        """The map at ``root``, refused unless it is of ``checkpoint``: the same weights (``digest``, their
        sha256, computed when not given) where the map records them, else the same path."""
        if not (root / "state.json").is_file():
            raise HybridGPTError(f"no staticness map at {root}: run `hybrid-gpt static {checkpoint}` first, or "
                                 "pass --map with the directory it wrote")
        state = read_json(root / "state.json", "the staticness map's state")
        options = state.get("options") if isinstance(state, dict) else None
        if not isinstance(options, dict):
            raise HybridGPTError(f"{root / 'state.json'} is not a staticness map's state; run `hybrid-gpt static` "
                                 "again")
        if "checkpoint_sha256" in options:
            other = options["checkpoint_sha256"] != (digest or weights_sha256(checkpoint))
        else:
            other = Path(str(options.get("checkpoint", ""))).resolve() != checkpoint.resolve()
        if other:
            raise HybridGPTError(f"the map at {root} is of {options.get('checkpoint')}, not {checkpoint}; map this "
                                 "checkpoint or pass --map with its map")
        recipe = StaticConfig(**{k: v for k, v in options.items() if k in StaticConfig.__dataclass_fields__})
        fit_rows, stop_rows = split_rows(capture_plan(recipe, recipe.context))
        source = cls(root, recipe, fit_rows, stop_rows)
        if not (source.captures / "done.json").is_file():
            raise HybridGPTError(f"the map at {root} has no complete captures of the training split: run "
                                 f"`hybrid-gpt static {checkpoint} --out {root} --resume` to capture them again")
        return source

    @property
    def captures(self) -> Path:
        return self.root / "captures" / f"{self.recipe.context}-train"

    def fit_data(self, block: int) -> dict:
        return {"fit": self.fit(block), "stop": load_layer(self.captures, block, self.stop_rows)}

    def fit(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's captured (u, a) on the map's fit windows."""
        return load_layer(self.captures, block, self.fit_rows)


def _mlp(source: MapSource, config: GPTConfig, block: int, width: int, seed: int, out: Path,
         progress: bool) -> nn.Module:
    """The fitted MLP of ``block`` at ``width`` and ``seed``: the map's own fit when it has it (its seed), else
    one fitted here on the map's captures with the map's recipe, kept under out/fits/."""
    name = f"mlp{width}-block{block + 1}"
    theirs = source.root / "fits" / f"{name}.safetensors"
    if seed == source.recipe.seed and theirs.is_file():
        return load_fit(config, width, theirs)
    ours = out / "fits" / f"{name}-seed{seed}.safetensors"
    if ours.is_file():
        return load_fit(config, width, ours)
    t0 = time.time()
    mlp, record = fit_mlp(config, width, source.fit_data(block), replace(source.recipe, seed=seed), progress,
                          desc=f"fit block {block + 1} width {width} seed {seed}")
    ours.parent.mkdir(parents=True, exist_ok=True)
    save_fit(mlp, ours)
    write_json(ours.with_suffix(".json"), {k: v for k, v in record.items()})
    logger.info(f"fitted block {block + 1} at width {width}, seed {seed}: {record['epochs']:.1f} epochs "
                f"({'stopped early' if record['stopped_early'] else 'hit the epoch cap'}), {time.time() - t0:.0f} s")
    return mlp


# ---- held-out windows ------------------------------------------------------------------------------------------

def held_out_windows(n_tokens: int, context: int, n_select: int, n_test: int) -> dict[str, list[int]]:
    """Start offsets of the selection slice and of the test windows: n_select + n_test windows spread over the
    whole held-out split (window_starts), the selection slice every few windows, the rest the test set."""
    total = n_select + n_test
    T, starts = window_starts(n_tokens, context, total * context, spread=True)
    if T != context or len(starts) < total:
        raise HybridGPTError(f"{total} held-out windows of {context:,} tokens need {total * context + 1:,} tokens "
                             f"but the held-out split has {n_tokens:,}; lower --select-windows, --test-windows or "
                             "--eval-context")
    every = total / n_select
    chosen = {int(i * every + every / 2) for i in range(n_select)}
    return {"select": [s for i, s in enumerate(starts) if i in chosen],
            "test": [s for i, s in enumerate(starts) if i not in chosen]}


@torch.no_grad()
def score_windows(model: GPT, tokens: np.ndarray, byte_lengths: np.ndarray, starts: list[int], context: int) -> dict:
    """Each window's bits and bytes (evaluate_lm on it alone), and their bits per byte."""
    bits, nbytes = [], []
    for s in starts:
        ev = evaluate_lm(model, tokens[s:s + context + 1], byte_lengths, context, context=context)
        bits.append(ev["loss"] * ev["tokens"] / math.log(2))
        nbytes.append(ev["bytes"])
    return {"bpb": sum(bits) / max(sum(nbytes), 1), "window_bits": bits, "window_bytes": nbytes}


def select_choice(candidates: dict[str, dict], full_select: dict) -> str:
    """The choice of layers whose distil arm scores the lowest selection-slice bits per byte (ties: the first
    listed). Reads the selection slice only: this is the one place an arm is chosen."""
    return min(candidates, key=lambda c: candidates[c]["bpb"] - full_select["bpb"])


# ---- healing ---------------------------------------------------------------------------------------------------

class CurveHealing(LogitMatching):
    """Healing (KL to the teacher's logits) that scores the model at given steps of its run: ``score(model)``
    at every step in ``points`` (0: before the first step), appended to ``curve`` with its step."""

    def __init__(self, teacher: GPT, points: list[int], score, *stream):
        super().__init__(teacher, *stream)
        self.points, self.score, self.curve, self.done = set(points), score, [], 0

    def rows(self, step: int):
        self.done = step + 1  # the optimizer step this batch completes
        return super().rows(step)

    def evaluate(self, model, final: bool, autocast=nullcontext) -> dict:
        if self.done not in self.points or any(p["step"] == self.done for p in self.curve):
            return {}
        scored = self.score(model)
        self.curve.append({"step": self.done, **scored})
        return {"bpb": scored["select"]["bpb"]}


def heal(model: GPT, teacher: GPT, data, cfg: ReplaceConfig, steps: list[int], seed: int, score, progress: bool,
         desc: str) -> list[dict]:
    """Fine-tune ``model`` toward ``teacher`` for max(steps) steps (the shared loop, in memory, AdamW without
    weight decay, clipping at 1, constant learning rate after warmup) on training-split rows drawn by ``seed``;
    returns the curve: ``score(model)`` at each of ``steps``."""
    last = max(steps)
    task = CurveHealing(teacher, steps, score, data, cfg.heal_context, seed, cfg.heal_rows, 0)
    tcfg = TrainConfig(max_steps=last, batch_size=cfg.heal_rows, lr=cfg.heal_lr, min_lr_ratio=1.0,
                       warmup_steps=min(cfg.heal_warmup, last), weight_decay=0.0, grad_clip=1.0, eval_interval=1,
                       eval_at_start=True, seed=seed, progress=progress)
    train(model, task, tcfg, info={"stage": desc})
    model.eval()
    return sorted(task.curve, key=lambda p: p["step"])


# ---- the study -------------------------------------------------------------------------------------------------

def arm_name(k: int, choice: str, kind: str, seed: int | None = None) -> str:
    name = f"{choice}-k{k}-{kind.replace('+', '-')}"
    return f"{name}-seed{seed}" if seed is not None else name


def check_config(cfg: ReplaceConfig, model_config: GPTConfig) -> None:
    """Every field within its option's range, and the rules that need the model: one-line errors before work."""
    check_fields(replace(cfg, out_dir=None if cfg.out_dir is None else str(cfg.out_dir),
                         map_dir=None if cfg.map_dir is None else str(cfg.map_dir),
                         data_dir=None if cfg.data_dir is None else str(cfg.data_dir)))
    n_attn = model_config.layers.count("A")
    if not n_attn:
        raise HybridGPTError(f"the checkpoint's pattern {model_config.layers} has no attention layer to replace")
    over = [k for k in cfg.ks if k > n_attn]
    if over:
        raise HybridGPTError(f"k = {over[0]}: the model has {n_attn} attention layers; give --ks up to {n_attn}")
    for name in ("eval_context", "heal_context"):
        if getattr(cfg, name) > model_config.block_size:
            raise HybridGPTError(f"{name} {getattr(cfg, name):,} exceeds the model's context of "
                                 f"{model_config.block_size:,}")
    # a passkey length must leave room for its answer (passkey reads 8 new tokens)
    over = [c for c in cfg.passkey_contexts if c + 8 > model_config.block_size]
    if over:
        raise HybridGPTError(f"passkey length {over[0]:,} leaves no room for the answer in the model's context of "
                             f"{model_config.block_size:,}; give --passkey-contexts below "
                             f"{model_config.block_size - 8:,}")
    if cfg.eval_context + cfg.decode_tokens > model_config.block_size:
        raise HybridGPTError(f"the speed measurement decodes {cfg.decode_tokens} tokens after {cfg.eval_context:,}: "
                             f"more than the model's context of {model_config.block_size:,}")


def run_replace(checkpoint: str | Path, config: ReplaceConfig | None = None, *, progress: bool = True,
                **options) -> dict:
    """The whole study on ``checkpoint`` (see the module's docstring) into ``config.out_dir``: state.json as
    the work goes, then replace.json, replace.md and the plots. Returns what replace.json holds."""
    from hybrid_gpt.checkpoint import read_config, resolve
    from hybrid_gpt.present.replace import write_outputs

    cfg = config or ReplaceConfig(**options)
    root, _ = resolve(checkpoint)
    model_config, _ = read_config(root)
    check_config(cfg, model_config)
    digest = weights_sha256(root)
    source = MapSource.open(Path(cfg.map_dir) if cfg.map_dir else root.parent / "static", root, digest)
    out = Path(cfg.out_dir) if cfg.out_dir else root.parent / "replace"
    t_start = time.time()
    dev = resolve_device(cfg.device)
    fingerprint = {**cfg.fingerprint(), "checkpoint": str(root.resolve()), "map": str(source.root.resolve()),
                   "checkpoint_sha256": digest,
                   "map_recipe": {k: v for k, v in source.recipe.fingerprint().items() if k != "widths"}}
    model, tokenizer, training = load_checkpoint(root, dev)
    data = checkpoint_data(root, tokenizer, training, cfg.data_dir)
    windows = held_out_windows(len(data.val), cfg.eval_context, cfg.select_windows, cfg.test_windows)
    trials = {c: passkey.passkey_trials(tokenizer, data.val, context=c, trials=cfg.passkey_trials, seed=cfg.seed,
                                        template=tokenizer.chat_template()) for c in cfg.passkey_contexts}
    with resumable_dir(out, allowed=REPLACE_FILES, what="replacement study", fingerprint=fingerprint,
                       overwrite=cfg.overwrite, resume=cfg.resume, free=("checkpoint", "map"),
                       adopted=("checkpoint_sha256", "map_recipe")) as study:
        runner = _Runner(cfg, model, tokenizer, data, windows, trials, source, study, out, progress)

        sentence, map_r2 = _map_view(source.root)

        def publish(complete: bool = False) -> dict:
            result = runner.result(complete) | {"map_sentence": sentence, "map_r2": map_r2, "out_dir": str(out)}
            result["plots"] = write_outputs(result, out, sentence)
            return result

        runner.run(publish)
        if cfg.speed_runs:
            runner.speed(root, publish)
        result = publish(complete=True)
    logger.info(f"wrote {out}/replace.json and replace.md ({time.time() - t_start:.0f} s this run)")
    return result


def _map_view(root: Path) -> tuple[str | None, dict]:
    """The map's own sentence on how static the deep layers are, and its held-out R^2 per layer (numbered from
    1), when its static.json is there."""
    from hybrid_gpt.present.static import map_sentence

    if not (root / "static.json").is_file():
        return None, {}
    found = read_json(root / "static.json", "the staticness map")
    return map_sentence(found), {str(r["layer"]): r["r2"] for r in found.get("layers", [])}


class _Runner:
    """The study's steps over one loaded teacher; each step reads its record from the study or makes it."""

    def __init__(self, cfg: ReplaceConfig, full: GPT, tokenizer, data, windows: dict, trials: dict,
                 source: MapSource, study: RunState, out: Path, progress: bool):
        self.cfg, self.full, self.tokenizer, self.data = cfg, full, tokenizer, data
        self.source, self.study, self.out, self.progress = source, study, out, progress
        self.bytes = tokenizer.token_byte_lengths()
        self.windows, self.trials = windows, trials
        self.attention = attention_layers(full)

    # -- measurements --
    def scores(self, model: GPT, test: bool = True) -> dict:
        out = {"select": score_windows(model, self.data.val, self.bytes, self.windows["select"], self.cfg.eval_context)}
        if test:
            out["test"] = score_windows(model, self.data.val, self.bytes, self.windows["test"], self.cfg.eval_context)
        return out

    def _record(self, key: str, make):
        got = self.study.get(key)
        if got is None:
            t0 = time.time()
            got = make()
            got["seconds"] = time.time() - t0
            self.study.put(key, got, got["seconds"])
        return got

    def passkey_lengths(self) -> list[int]:
        full = self.study.get("passkey-full") or {}
        return [p["context"] for p in full.get("passkey", []) if p["accuracy"] >= self.cfg.passkey_floor]

    def run_passkey(self, model: GPT, lengths: list[int]) -> list[dict]:
        out = []
        for c in lengths:
            r = passkey.score_passkey(model, self.trials[c])
            out.append({"context": c, "accuracy": r["accuracy"], "correct": r["correct"], "n": r["n"]})
        return out

    def run(self, publish) -> None:
        cfg = self.cfg
        self._record("full", lambda: self.scores(self.full))
        self._record("passkey-full", lambda: {"passkey": self.run_passkey(self.full, cfg.passkey_contexts)})
        similarity = self._record("similarity", lambda: {"similarity": attention_stats(
            self.full, self.data.train, cfg.similarity_tokens, context=cfg.eval_context)[0]})["similarity"]
        publish()
        for k in sorted(cfg.ks):
            layers = {c: choose_layers(c, k, self.attention, similarity) for c in cfg.choices}
            candidates = {c: self._arm(k, c, "distil", layers[c], test=False) for c in cfg.choices}
            chosen = self._record(f"choice-k{k}", lambda: {
                "choice": select_choice({c: r["scores"]["select"] for c, r in candidates.items()},
                                        self.study.get("full")["select"]),
                "select_bpb": {c: r["scores"]["select"]["bpb"] for c, r in candidates.items()}})["choice"]
            for c in cfg.choices:
                self._arm(k, c, "distil", layers[c])  # its test windows, now that the choice is made
            for kind in ("drop", "constant", "linear", "matched"):
                self._arm(k, chosen, kind, layers[chosen])
            publish()
            for seed in cfg.seeds:
                self._arm(k, chosen, "distil+heal", layers[chosen], seed=seed)
                publish()
            self._arm(k, chosen, "drop+heal", layers[chosen], seed=cfg.seeds[0])
            publish()

    # -- one arm --
    def _arm(self, k: int, choice: str, kind: str, layers: list[int], seed: int | None = None,
             test: bool = True) -> dict:
        cfg = self.cfg
        name = arm_name(k, choice, kind, seed if kind == "distil+heal" else None)
        got = self.study.get(name)
        if got is not None and (not test or "test" in got["scores"]):
            return got
        logger.info(f"{name}: layers {', '.join(str(i + 1) for i in layers)}")
        t0 = time.time()
        model, context, extra = self._build(kind, layers, seed or cfg.seeds[0])
        with context:
            if kind.endswith("+heal"):
                steps = cfg.heal_steps()
                if kind == "drop+heal" and cfg.matched_compute:
                    steps = sorted({*steps, steps[-1] + self.capture_steps()})
                curve = heal(model, self.full, self.data, cfg, steps, seed, self.scores, self.progress, name)
                scores = {**curve[[p["step"] for p in curve].index(cfg.heal_steps()[-1])]}
                scores.pop("step")
                extra["curve"] = [{"step": p["step"], "tokens": p["step"] * cfg.heal_context * cfg.heal_rows,
                                   "select_bpb": p["select"]["bpb"], "test_bpb": p["test"]["bpb"],
                                   "test_window_bits": p["test"]["window_bits"]} for p in curve]
            else:
                scores = self.scores(model, test=test)
            record = {"name": name, "k": k, "choice": choice, "kind": kind, "layers": [i + 1 for i in layers],
                      "seed": seed or cfg.seeds[0], "scores": scores, **extra}
            chosen = (self.study.get(f"choice-k{k}") or {}).get("choice") == choice
            if test and chosen and kind in cfg.passkey_kinds and self.passkey_lengths():
                record["passkey"] = self.run_passkey(model, self.passkey_lengths())
        del model
        record["seconds"] = time.time() - t0 + (got or {}).get("seconds", 0.0)
        self.study.put(name, record, time.time() - t0)
        logger.info(f"{name}: bpb {scores['select']['bpb']:.4f} on the selection slice"
                    + (f", {scores['test']['bpb']:.4f} on the test windows" if "test" in scores else "")
                    + f" ({time.time() - t0:.0f} s)")
        return record

    def capture_steps(self) -> int:
        """Healing steps whose tokens equal the teacher forwards of the map's training captures."""
        r = self.source.recipe
        return math.ceil((r.train_tokens + r.stop_tokens) / (self.cfg.heal_context * self.cfg.heal_rows))

    def _build(self, kind: str, layers: list[int], seed: int):
        """(model, context manager to score it in, extra record fields) for an arm before any healing."""
        full, cfg = self.full, self.cfg
        if kind in ("constant", "linear"):
            mixers = {}
            for i in layers:
                mean, linear = closed_form(*self.source.fit(i), self.source.recipe.ridge)
                mixers[i] = ConstantMixer(mean) if kind == "constant" else LinearMixer(linear.weight, linear.bias)
            return full, swapped_mixers(full, mixers), {}
        if kind.startswith("drop"):
            pattern = "".join("N" if i in layers else c for i, c in enumerate(full.config.layers))
            return transplant(full, pattern, 0, seed), nullcontext(), {"pattern": pattern}
        width = cfg.width if kind != "matched" else matched_width(full.config, full.transformer.h[layers[0]].mixer)
        pattern = "".join("M" if i in layers else c for i, c in enumerate(full.config.layers))
        model = transplant(full, pattern, width, seed)
        for i in layers:
            mlp = _mlp(self.source, full.config, i, width, seed, self.out, self.progress)
            model.transformer.h[i].mixer.load_state_dict({k.removeprefix("mlp."): v for k, v in
                                                          mlp.state_dict().items()})
        params = sum(p.numel() for p in model.transformer.h[layers[0]].mixer.parameters())
        return model.eval(), nullcontext(), {"pattern": pattern, "width": width, "mixer_params": params}

    # -- speed, in separate processes --
    def speed(self, root: Path, publish) -> None:
        cfg = self.cfg
        # full-copy: the full pattern rebuilt like every other shape (an A/A control: its ratio should be 1.00x;
        # a baseline that is not built like the shapes it is compared with would show here)
        shapes = {FULL: self.full.config.layers, "full-copy": self.full.config.layers}
        for k in sorted(cfg.ks):
            deep = choose_layers("deepest", k, self.attention, [])
            layers = self.full.config.layers
            shapes[f"k{k}-M{cfg.width}"] = "".join("M" if i in deep else c for i, c in enumerate(layers))
        runs = self.study.get("speed") or {"shapes": {}, "runs": []}
        runs["shapes"] = {**runs["shapes"], **shapes}  # runs made before a shape was added lack it; the summary
        # pools each shape over the runs that have it
        for i in range(len(runs["runs"]), cfg.speed_runs):
            spec = self.out / "speed" / f"run-{i + 1}.json"
            spec.parent.mkdir(parents=True, exist_ok=True)
            write_json(spec.with_name(f"run-{i + 1}-request.json"), {
                "checkpoint": str(root), "shapes": shapes, "mlp_hidden": cfg.width, "contexts": [cfg.eval_context],
                "repeats": cfg.speed_repeats, "decode_tokens": cfg.decode_tokens, "seed": cfg.seed,
                "device": cfg.device})
            logger.info(f"speed run {i + 1} of {cfg.speed_runs} (a separate process)")
            t0 = time.time()
            done = subprocess.run([sys.executable, "-m", "hybrid_gpt.analysis.speed_worker",
                                   str(spec.with_name(f"run-{i + 1}-request.json")), str(spec)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise HybridGPTError(f"speed run {i + 1} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            runs["runs"].append({**read_json(spec, "a speed run's result"), "wall_s": time.time() - t0})
            self.study.put("speed", runs, time.time() - t0)
            publish()

    # -- the result --
    def result(self, complete: bool) -> dict:
        return summarise(self.study.data, self.cfg, self.windows, complete)


def summarise(state: dict, cfg: ReplaceConfig, windows: dict, complete: bool) -> dict:
    """What replace.json holds, from the study's records alone: every arm's test figures against the full
    model, the seeded arm over seeds, the verdict per k."""
    records = state["records"]
    full = records.get("full")
    out = {"options": state["options"], "complete": complete, "elapsed_s": state.get("elapsed_s", 0.0),
           "eval_context": cfg.eval_context, "windows": windows,
           "select_tokens": len(windows["select"]) * cfg.eval_context,
           "test_tokens": len(windows["test"]) * cfg.eval_context, "full": None, "arms": [], "ks": []}
    if full is None:
        return out
    out["full"] = {"select_bpb": full["select"]["bpb"], "test_bpb": full["test"]["bpb"],
                   "passkey": (records.get("passkey-full") or {}).get("passkey")}
    tol = QUALITY_TOLERANCE * full["test"]["bpb"]
    out["tolerance_bpb"] = tol
    for rec in records.values():
        if not isinstance(rec, dict) or "kind" not in rec or "test" not in rec["scores"]:
            continue
        diff = bpb_difference(rec["scores"]["test"], full["test"])
        row = {k: rec.get(k) for k in ("name", "k", "choice", "kind", "layers", "seed", "width", "mixer_params",
                                       "pattern", "passkey", "seconds")}
        row |= {"select_bpb": rec["scores"]["select"]["bpb"], "test_bpb": rec["scores"]["test"]["bpb"],
                "delta_bpb": diff, "quality": STATES[judge_interval(diff["ci95"], tol, False)]}
        if "curve" in rec:
            row["curve"] = [{"step": p["step"], "tokens": p["tokens"], "select_bpb": p["select_bpb"],
                             "test_bpb": p["test_bpb"],
                             "delta_bpb": mean_ci(window_differences({"window_bits": p["test_window_bits"]},
                                                                     full["test"]))}
                            for p in rec["curve"]]
        out["arms"].append(row)
    speed = records.get("speed")
    out["speed"] = speed_summary(speed) if speed and speed.get("runs") else None
    for k in sorted(cfg.ks):
        choice = (records.get(f"choice-k{k}") or {}).get("choice")
        seeded = [r for r in records.values() if isinstance(r, dict) and r.get("kind") == "distil+heal"
                  and r.get("k") == k and "test" in r["scores"]]
        entry = {"k": k, "choice": choice, "select_bpb": (records.get(f"choice-k{k}") or {}).get("select_bpb"),
                 "seeds": [r["seed"] for r in seeded]}
        if seeded:
            diffs = [window_differences(r["scores"]["test"], full["test"]) for r in seeded]
            ci = seed_window_ci(diffs) if len(diffs[0]) > 1 else None
            entry["distil_heal"] = ci
            entry["quality"] = STATES[judge_interval(ci["ci95"] if ci else None, tol, False)]
        shape = f"k{k}-M{cfg.width}"
        if out["speed"] and shape in out["speed"]["shapes"]:
            entry["speed"] = out["speed"]["shapes"][shape]
            entry["speed_state"] = STATES[judge_interval(entry["speed"]["pooled"]["ci95"], SPEED_GAIN, True)]
        out["ks"].append(entry)
    return out


def speed_summary(speed: dict) -> dict:
    """Per shape: each run's decode ratio against the full model with its within-run interval, the spread
    between runs, and the runs pooled (a t-interval over the per-run log ratios)."""
    shapes = {}
    for name in speed["shapes"]:
        if name == FULL:
            continue
        per_run = [r["shapes"][name] for r in speed["runs"] if name in r["shapes"]]
        ratios = [p["decode"]["ratio"] for p in per_run]
        pooled = mean_ci([math.log(x) for x in ratios])
        shapes[name] = {"layers": speed["shapes"][name], "runs": per_run,
                        "spread": [min(ratios), max(ratios)] if ratios else None,
                        "pooled": {"ratio": math.exp(pooled["mean"]),
                                   "ci95": [math.exp(v) for v in pooled["ci95"]] if pooled["ci95"] else None,
                                   "n": len(ratios)},
                        "predicted": per_run[0]["predicted"] if per_run else None}
    return {"shapes": shapes, "runs": len(speed["runs"]),
            "hardware": speed["runs"][0].get("hardware"), "environment": speed["runs"][0].get("environment")}

