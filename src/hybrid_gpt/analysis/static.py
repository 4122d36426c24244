"""The staticness map: how much of each attention layer's output is a function of the current token alone.

The Static Function Hypothesis says a deep attention layer can become a per-token MLP. Whatever any
healing budget does afterwards, no per-token function can explain more of a layer's output than
E[output | the token's own input] does, so the share of the output's variance that the best per-token
predictor explains on held-out text is the hypothesis' own quantity, and the ceiling of any replacement.

For every attention block, the block's mixer input u = ln_1(x) (x: the residual stream entering the block;
attention reads the current token only through u) and its output a = attention(u) are captured from the
model's own forward (model.gpt.mixer_activations), at one context, on windows spread over the training split
(to fit) and over the held-out split (to score), and stored as float16 memory-mapped arrays. Predictors of
a from u, each scored as R^2 = 1 - sum (a - prediction)^2 / sum (a - mean of the held-out a)^2 over every
output dimension of the held-out tokens:

- zero: what dropping the layer predicts;
- constant: the training mean of a (the constant-mean replacement);
- linear: ridge regression with an intercept, closed form from sufficient statistics;
- mlp<W>: the model family's own per-token MLP (an M block's TokenMLP) of hidden width W, trained by the
  shared training loop on mean squared error until the MSE on a stopping slice (training-split windows
  held apart from the fit) stops improving, its weights then those of its best evaluation.

The linear predictor is also fitted and scored at a shorter context, streamed (no capture kept), to show
whether staticness falls as the context grows. Every fit is recorded in ``state.json`` as it finishes, so
an interrupted map resumes where it stopped (``resume``); fitted MLPs are kept under ``fits/`` for the
replacement study to use.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hybrid_gpt.analysis.importance import attention_layers
from hybrid_gpt.analysis.runstate import RunState, resumable_dir
from hybrid_gpt.analysis.static_config import StaticConfig
from hybrid_gpt.checkpoint import checkpoint_data, load_checkpoint, weights_sha256
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import atomic_path, nested, read_json, write_json
from hybrid_gpt.model.gpt import GPT, GPTConfig, TokenMLP, mixer_activations
from hybrid_gpt.options import check_fields
from hybrid_gpt.runtime import ensure_fits, resolve_device
from hybrid_gpt.train.evaluate import windows
from hybrid_gpt.train.loop import TrainConfig, train

logger = logging.getLogger(__name__)

# What a staticness output directory may hold: anything else means it is not ours to resume or replace.
STATIC_FILES = ("static.json", "static.md", "static-*.png", "state.json", "fits/*.safetensors",
                *nested("captures/*", ("in-*.npy", "out-*.npy", "done.json")))
# Windows of a split captured together: one forward's activations of every layer must fit in memory.
CAPTURE_ROWS = 1
def predictor_names(widths: list[int]) -> list[str]:
    return ["zero", "constant", "linear", *(f"mlp{w}" for w in widths)]


# ---- held-out scores -------------------------------------------------------------------------------------------

class R2:
    """Accumulates 1 - SS_res / SS_tot over every output dimension, with SS_tot about the scored tokens' own
    mean (so the training mean scores about 0 and a perfect predictor 1), in float64, chunk by chunk."""

    def __init__(self):
        self.n, self.sum, self.sumsq, self.res = 0, 0.0, 0.0, 0.0

    def add(self, target: torch.Tensor, prediction: torch.Tensor) -> None:
        y = target.reshape(-1, target.shape[-1]).double()
        self.n += y.shape[0]
        self.sum = self.sum + y.sum(0)
        self.sumsq = self.sumsq + y.pow(2).sum(0)
        self.res += (y - prediction.reshape(y.shape).double()).pow(2).sum().item()

    @property
    def total(self) -> float:
        return (self.sumsq - self.sum.pow(2) / self.n).sum().item()

    @property
    def value(self) -> float:
        return 1.0 - self.res / self.total if self.total > 0 else float("nan")


class Linear:
    """Ridge regression of y on x with an intercept, from sufficient statistics accumulated in float64, so
    that it can be fitted from streamed activations as well as from stored ones."""

    def __init__(self, d_in: int, d_out: int):
        self.n = 0
        self.sx, self.sy = torch.zeros(d_in, dtype=torch.float64), torch.zeros(d_out, dtype=torch.float64)
        self.sxx = torch.zeros(d_in, d_in, dtype=torch.float64)
        self.sxy = torch.zeros(d_in, d_out, dtype=torch.float64)
        self.weight = self.bias = None

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.sxx += x.T @ x
        self.sxy += x.T @ y

    def solve(self, ridge: float) -> "Linear":
        """W = (Cxx + ridge * mean variance * I)^-1 Cxy on centred statistics; b = mean y - mean x W."""
        mx, my = self.sx / self.n, self.sy / self.n
        cxx = self.sxx - self.n * torch.outer(mx, mx)
        cxy = self.sxy - self.n * torch.outer(mx, my)
        scale = max(cxx.diagonal().mean().item(), 1e-12)
        eye = torch.eye(cxx.shape[0], dtype=torch.float64)
        self.weight = torch.linalg.solve(cxx + ridge * scale * eye, cxy)
        self.bias = my - mx @ self.weight
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.double() @ self.weight + self.bias).to(x.dtype if x.is_floating_point() else torch.float32)


class MLPPredictor(nn.Module):
    """An M block's per-token MLP (the model family's TokenMLP at hidden width ``width``), alone: what a
    replacement of that attention layer would compute from u = ln_1(x)."""

    def __init__(self, config: GPTConfig, width: int):
        super().__init__()
        self.mlp = TokenMLP(replace(config, mlp_hidden=width))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.mlp(u)

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        return [{"params": list(self.parameters()), "weight_decay": weight_decay}]


class Regression:
    """Per-token regression as a task of train.loop.train: a row is one token, each epoch a fresh
    permutation of the fit tokens (seeded by the epoch), the loss the MSE, and the evaluation the MSE on the
    stopping slice ("val_loss")."""

    tokens_per_row = 1

    def __init__(self, x, y, x_stop, y_stop, rows: int, seed: int):
        self.x, self.y, self.x_stop, self.y_stop = x, y, x_stop, y_stop
        self.per_epoch = max(1, len(x) // rows)
        self.batch, self.seed, self._epoch = rows, seed, (None, None)

    def rows(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if self._epoch[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch = (epoch, torch.randperm(len(self.x), generator=gen))
        return self._epoch[1][i * self.batch:(i + 1) * self.batch]

    def take(self, idx, lo: int, hi: int, device):
        idx = idx[lo:hi]
        return self.x[idx].to(device, torch.float32), self.y[idx].to(device, torch.float32)

    def loss(self, model, batch):
        x, y = batch
        return F.mse_loss(model(x), y), {}

    @torch.no_grad()
    def evaluate(self, model, final: bool, autocast=None) -> dict:
        return {"loss": mse(model, self.x_stop, self.y_stop)}


def closed_form(x: torch.Tensor, y: torch.Tensor, ridge: float, chunk: int = 8192) -> tuple[torch.Tensor, Linear]:
    """The closed-form predictors of y from x: the mean of y (float32) and the ridge fit (:class:`Linear`),
    accumulated chunk by chunk so that float16 captures are widened a piece at a time."""
    linear = Linear(x.shape[1], y.shape[1])
    for i in range(0, len(x), chunk):
        linear.add(x[i:i + chunk], y[i:i + chunk])
    return y.float().mean(0), linear.solve(ridge)


@torch.no_grad()
def mse(fn, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> float:
    total = sum(F.mse_loss(fn(x[i:i + chunk].float()), y[i:i + chunk].float(), reduction="sum").item()
                for i in range(0, len(x), chunk))
    return total / y.numel()


@torch.no_grad()
def score(fn, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> float:
    """R^2 of ``fn`` on (x, y), chunk by chunk."""
    acc = R2()
    for i in range(0, len(x), chunk):
        acc.add(y[i:i + chunk], fn(x[i:i + chunk].float()))
    return acc.value


def fit_mlp(config: GPTConfig, width: int, data: dict, cfg: StaticConfig, progress: bool = True,
            desc: str = "fit") -> tuple[MLPPredictor, dict]:
    """An MLPPredictor trained on data["fit"] until the stopping slice's MSE stops improving (the shared
    training loop's early stopping), holding its best evaluation's weights; and its learning curve."""
    (x, y), (xs, ys) = data["fit"], data["stop"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + width)
        model = MLPPredictor(config, width)
    task = Regression(x, y, xs, ys, cfg.batch_tokens, cfg.seed)
    per_epoch = task.per_epoch
    tcfg = TrainConfig(max_steps=cfg.max_epochs * per_epoch, batch_size=cfg.batch_tokens, lr=cfg.lr,
                       warmup_steps=min(100, per_epoch), min_lr_ratio=0.1, weight_decay=0.0, grad_clip=1.0,
                       eval_interval=max(1, per_epoch // 2), eval_at_start=True, seed=cfg.seed,
                       progress=progress, patience=cfg.patience)
    result = train(model, task, tcfg, info={"stage": desc})
    if result.interrupted:  # Ctrl-C or SIGTERM: a fit cut short is no result, so nothing is recorded
        raise KeyboardInterrupt
    model.eval()
    var = ys.float().var(0, unbiased=False).mean().item()
    curve = [{"step": m["step"], "epoch": m["step"] / per_epoch, "mse": m["val_loss"],
              "r2_stop": 1 - m["val_loss"] / var if var > 0 else None} for m in result.metrics if "val_loss" in m]
    train_loss = [m["loss"] for m in result.metrics if "loss" in m]
    tail = max(1, per_epoch // 2)  # the training loss, averaged over each half epoch
    return model, {"steps": result.step, "epochs": result.step / per_epoch, "best_step": result.best_step,
                   "best_epoch": (result.best_step or 0) / per_epoch, "stopped_early": result.stopped_early,
                   "params": sum(p.numel() for p in model.parameters()), "curve": curve,
                   "train_mse": [sum(train_loss[i:i + tail]) / len(train_loss[i:i + tail])
                                 for i in range(0, len(train_loss), tail)]}


# ---- captures --------------------------------------------------------------------------------------------------

@dataclass
class Split:
    """Where a split's windows come from: which token split, how many windows, and the stopping slice."""

    name: str  # "fit" (and "stop", taken from the same windows) or "eval"
    source: str  # "train" or "val"
    windows: int


def capture_plan(cfg: StaticConfig, context: int, n_train: int | None = None, n_val: int | None = None) -> dict:
    """The windows of one context: fit + stop windows spread over the training split (every few-th one goes to
    the stopping slice), eval windows spread over the held-out split. Checked against the splits' sizes where
    they are given (a reader of a finished map needs only which windows were which)."""
    def count(tokens: int) -> int:
        return max(1, math.ceil(tokens / context))

    fit, stop, held = count(cfg.train_tokens), count(cfg.stop_tokens), count(cfg.eval_tokens)
    for what, n, have, flag in (("training", fit + stop, n_train, "--train-tokens/--stop-tokens"),
                                ("held-out", held, n_val, "--eval-tokens")):
        if have is not None and n * context > have - 1:
            raise HybridGPTError(f"{n} windows of {context:,} tokens need {n * context + 1:,} {what} tokens but the "
                                 f"split has {have:,}; lower {flag} or --context")
    every = (fit + stop) // stop
    stop_rows = [i * every + every - 1 for i in range(stop)]
    return {"context": context, "train_windows": fit + stop, "stop_rows": stop_rows, "eval_windows": held}


def split_rows(plan: dict) -> tuple[list[int], list[int]]:
    """The captured training windows of the fit, and those of the stopping slice."""
    stop = set(plan["stop_rows"])
    return [i for i in range(plan["train_windows"]) if i not in stop], sorted(stop)


@torch.no_grad()
def capture(model: GPT, tokens: np.ndarray, n_windows: int, context: int, blocks: list[int], where: Path,
            progress: bool = True, desc: str = "capture") -> None:
    """Write, for each block, ``in-<b>.npy`` (u = ln_1(x)) and ``out-<b>.npy`` (attention(u)) over
    ``n_windows`` windows of ``context`` tokens spread over ``tokens``: [windows, context, n_embd] float16,
    memory-mapped. ``done.json`` is written last: a capture without it is incomplete and is redone."""
    from tqdm.auto import tqdm

    where.mkdir(parents=True, exist_ok=True)
    (where / "done.json").unlink(missing_ok=True)
    d = model.config.n_embd
    arrays = {(kind, b): np.lib.format.open_memmap(where / f"{kind}-{b + 1}.npy", mode="w+", dtype=np.float16,
                                                   shape=(n_windows, context, d))
              for b in blocks for kind in ("in", "out")}
    device = next(model.parameters()).device
    row = 0
    bar = tqdm(total=n_windows, disable=not progress, desc=desc, unit="window", dynamic_ncols=True)
    for chunk in windows(tokens, context, n_windows * context, CAPTURE_ROWS, spread=True):
        acts = mixer_activations(model, chunk[:, :-1].to(device), blocks, normed=True)
        n = chunk.shape[0]
        for b, (u, a) in acts.items():
            arrays[("in", b)][row:row + n] = u.float().cpu().numpy()
            arrays[("out", b)][row:row + n] = a.float().cpu().numpy()
        row += n
        bar.update(n)
    bar.close()
    for arr in arrays.values():
        arr.flush()
    write_json(where / "done.json", {"windows": n_windows, "context": context, "blocks": [b + 1 for b in blocks]})


def _captured(where: Path, n_windows: int, context: int, blocks: list[int]) -> bool:
    if not (where / "done.json").is_file():
        return False
    done = read_json(where / "done.json", "a capture's record")
    return done == {"windows": n_windows, "context": context, "blocks": [b + 1 for b in blocks]}


def load_layer(where: Path, block: int, rows: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One block's captured (u, a) as float16 tensors [tokens, n_embd], of the windows ``rows`` (default all)."""
    out = []
    for kind in ("in", "out"):
        arr = np.load(where / f"{kind}-{block + 1}.npy", mmap_mode="r", allow_pickle=False)
        arr = arr if rows is None else arr[rows]
        out.append(torch.from_numpy(np.array(arr).reshape(-1, arr.shape[-1])))  # a copy: the map is read-only
    return out[0], out[1]


@torch.no_grad()
def streamed_linear(model: GPT, data, blocks: list[int], cfg: StaticConfig, context: int,
                    progress: bool = True) -> dict[int, float]:
    """The linear predictor fitted and scored at ``context`` from streamed activations (nothing stored):
    fitted on the fit windows of the training split, scored on windows spread over the held-out split."""
    from tqdm.auto import tqdm

    plan = capture_plan(cfg, context, len(data.train), len(data.val))
    fit_rows, _ = split_rows(plan)
    d = model.config.n_embd
    fits = {b: Linear(d, d) for b in blocks}
    device = next(model.parameters()).device
    bar = tqdm(total=plan["train_windows"] + plan["eval_windows"], disable=not progress, unit="window",
               desc=f"linear at {context}", dynamic_ncols=True)
    n = plan["train_windows"]
    for row, chunk in enumerate(windows(data.train, context, n * context, 1, spread=True)):
        if row in fit_rows:
            for b, (u, a) in mixer_activations(model, chunk[:, :-1].to(device), blocks, normed=True).items():
                fits[b].add(u.float().cpu(), a.float().cpu())
        bar.update(1)
    for fit in fits.values():
        fit.solve(cfg.ridge)
    scores = {b: R2() for b in blocks}
    for chunk in windows(data.val, context, plan["eval_windows"] * context, 1, spread=True):
        for b, (u, a) in mixer_activations(model, chunk[:, :-1].to(device), blocks, normed=True).items():
            u, a = u.float().cpu(), a.float().cpu()
            scores[b].add(a, fits[b](u))
        bar.update(1)
    bar.close()
    return {b: s.value for b, s in scores.items()}


# ---- the map ---------------------------------------------------------------------------------------------------

def _blocks(model: GPT, wanted: list[int] | None) -> list[int]:
    layers = attention_layers(model)
    if not layers:
        raise HybridGPTError(f"the checkpoint's pattern {model.config.layers} has no attention layer (A): the "
                             "staticness map measures attention layers, so map a model that has some")
    if wanted is None:
        return layers
    for b in wanted:
        if b - 1 not in layers:
            raise HybridGPTError(f"block {b} of pattern {model.config.layers} is not an attention layer; give "
                                 f"--blocks among {', '.join(str(i + 1) for i in layers)}")
    return sorted(b - 1 for b in wanted)


class State(RunState):
    """The map's state.json (analysis/runstate.py), its records per layer: {"<block number>": {predictor: record}}."""

    def get(self, block: int, key: str):
        return self.records.get(str(block + 1), {}).get(key)

    def put(self, block: int, key: str, value, elapsed: float) -> None:
        entry = self.records.get(str(block + 1), {})
        super().put(str(block + 1), {**entry, key: value}, elapsed)


def run_static(checkpoint: str | Path, config: StaticConfig | None = None, *, progress: bool = True,
               **options) -> dict:
    """Map every attention layer of ``checkpoint`` (see the module's docstring) into ``config.out_dir``:
    captures/, fits/, state.json as the work goes, then static.json, static.md and static-*.png. Returns
    what static.json holds. ``options`` are StaticConfig's fields, for a caller without a config."""
    from hybrid_gpt.present.static import write_outputs

    config = config or StaticConfig(**options)
    check_fields(replace(config, out_dir=None if config.out_dir is None else str(config.out_dir),
                         data_dir=None if config.data_dir is None else str(config.data_dir)))
    t_start = time.time()
    dev = resolve_device(config.device)
    model, tokenizer, training = load_checkpoint(checkpoint, dev)
    ckpt = Path(checkpoint)
    ckpt = ckpt if ckpt.is_dir() else ckpt.parent
    blocks = _blocks(model, config.blocks)
    for name in ("context", "short_context"):
        if getattr(config, name) > model.config.block_size:
            raise HybridGPTError(f"{name} {getattr(config, name):,} exceeds the model's context of "
                                 f"{model.config.block_size:,}")
    data = checkpoint_data(ckpt, tokenizer, training, config.data_dir)
    plan = capture_plan(config, config.context, len(data.train), len(data.val))
    if config.short_context:
        capture_plan(config, config.short_context, len(data.train), len(data.val))
    d = model.config.n_embd
    ensure_fits(2 * 2 * d * (plan["train_windows"] + plan["eval_windows"]) * config.context * 4,
                "one layer's captured activations in float32", hint="lower --train-tokens or --eval-tokens")
    out = Path(config.out_dir) if config.out_dir else ckpt.parent / "static"
    fingerprint = {**config.fingerprint(), "checkpoint": str(ckpt.resolve()), "data": str(data.root.resolve()),
                   "checkpoint_sha256": weights_sha256(ckpt), "data_sha256": data.sha256()}
    with resumable_dir(out, allowed=STATIC_FILES, what="staticness map", fingerprint=fingerprint,
                       overwrite=config.overwrite, resume=config.resume, section="layers",
                       free=("widths", "checkpoint", "data"), adopted=("checkpoint_sha256", "data_sha256"),
                       kind=State) as state:

        def publish(complete: bool = False) -> dict:
            result = {"checkpoint": str(ckpt), "out_dir": str(out), "pattern": model.config.layers,
                      **plan_summary(plan, config, state),
                      "options": fingerprint, "layers": layer_rows(state, blocks, config),
                      "complete": complete, "elapsed_s": state.data["elapsed_s"]}
            result["plots"] = write_outputs(result, out)
            return result

        _map(model, data, blocks, plan, config, out, state, progress, publish)
        result = publish(complete=True)
    logger.info(f"wrote {out}/static.json, static.md, {', '.join(result['plots'])} "
                f"({time.time() - t_start:.0f} s this run)")
    return result


def all_widths(state: State, cfg: StaticConfig) -> list[int]:
    """The widths this run fits and those an earlier run of the same map fitted: --widths may change on resume."""
    done = {int(k[3:]) for entry in state.records.values() for k in entry if k.startswith("mlp")}
    return sorted(set(cfg.widths) | done)


def plan_summary(plan: dict, cfg: StaticConfig, state: State) -> dict:
    fit_rows, stop_rows = split_rows(plan)
    T = plan["context"]
    return {"context": T, "fit_tokens": len(fit_rows) * T, "stop_tokens": len(stop_rows) * T,
            "eval_tokens": plan["eval_windows"] * T, "short_context": cfg.short_context or None,
            "widths": all_widths(state, cfg)}


def layer_rows(state: State, blocks: list[int], cfg: StaticConfig) -> list[dict]:
    rows = []
    names = predictor_names(all_widths(state, cfg))
    for b in blocks:
        entry = state.data["layers"].get(str(b + 1), {})
        r2 = {name: entry[name]["r2"] for name in names if name in entry}
        row = {"layer": b + 1, "r2": r2, "var": entry.get("var")}
        if "short_linear" in entry:
            row["r2_short"] = {"linear": entry["short_linear"]["r2"]}
        row["fits"] = {name: {k: v for k, v in entry[name].items() if k != "r2"}
                       for name in r2 if name.startswith("mlp")}
        rows.append(row)
    return rows


def _map(model: GPT, data, blocks: list[int], plan: dict, cfg: StaticConfig, out: Path, state: State,
         progress: bool, publish) -> None:
    """The work, in the order that makes partial results useful: captures, then per layer the closed-form
    predictors, the short context's linear, then each MLP width over every layer, narrowest first; the
    outputs are published (``publish()``) after each stretch of work, marked unfinished."""
    T = plan["context"]
    cap = {"train": out / "captures" / f"{T}-train", "eval": out / "captures" / f"{T}-eval"}
    for split, tokens, n in (("train", data.train, plan["train_windows"]), ("eval", data.val, plan["eval_windows"])):
        if not _captured(cap[split], n, T, blocks):
            t0 = time.time()
            logger.info(f"capturing {n} windows of {T:,} tokens of the {split} split, {len(blocks)} layers")
            capture(model, tokens, n, T, blocks, cap[split], progress, desc=f"capture {split}")
            logger.info(f"captured {split} in {time.time() - t0:.0f} s")
    fit_rows, stop_rows = split_rows(plan)

    def layer_data(b: int) -> dict:
        return {"fit": load_layer(cap["train"], b, fit_rows), "stop": load_layer(cap["train"], b, stop_rows),
                "eval": load_layer(cap["eval"], b)}

    for b in blocks:
        if state.get(b, "linear") is not None:
            continue
        t0 = time.time()
        xe, ye = load_layer(cap["eval"], b)
        mean, linear = closed_form(*load_layer(cap["train"], b, fit_rows), cfg.ridge)
        r2 = {"zero": score(lambda u: torch.zeros(len(u), ye.shape[1]), xe, ye),
              "constant": score(lambda u: mean.expand(len(u), -1), xe, ye),
              "linear": score(linear, xe, ye)}
        state.put(b, "var", ye.float().var(0, unbiased=False).mean().item(), 0.0)
        for name in ("zero", "constant"):
            state.put(b, name, {"r2": r2[name]}, 0.0)
        state.put(b, "linear", {"r2": r2["linear"]}, time.time() - t0)
        logger.info(f"block {b + 1}: R^2 constant {r2['constant']:.3f}, linear {r2['linear']:.3f}")
    publish()
    if cfg.short_context and any(state.get(b, "short_linear") is None for b in blocks):
        t0 = time.time()
        short = streamed_linear(model, data, blocks, cfg, cfg.short_context, progress)
        elapsed = (time.time() - t0) / len(blocks)
        for b in blocks:
            state.put(b, "short_linear", {"r2": short[b], "context": cfg.short_context}, elapsed)
        logger.info(f"linear at context {cfg.short_context}: R^2 " + ", ".join(f"{short[b]:.3f}" for b in blocks))
        publish()
    (out / "fits").mkdir(exist_ok=True)
    for width in sorted(cfg.widths):
        name = f"mlp{width}"
        for b in blocks:
            if state.get(b, name) is not None:
                continue
            t0 = time.time()
            data_b = layer_data(b)
            mlp, record = fit_mlp(model.config, width, data_b, cfg, progress, desc=f"block {b + 1} {name}")
            record["r2"] = score(mlp, *data_b["eval"])
            record["seconds"] = time.time() - t0
            save_fit(mlp, out / "fits" / f"{name}-block{b + 1}.safetensors")
            state.put(b, name, record, record["seconds"])
            ending = "stopped early" if record["stopped_early"] else "hit --max-epochs"
            logger.info(f"block {b + 1}: R^2 {name} {record['r2']:.3f} ({record['epochs']:.1f} epochs, best at "
                        f"{record['best_epoch']:.1f}, {ending}, {record['seconds']:.0f} s)")
            publish()


def save_fit(module: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp))


def load_fit(config: GPTConfig, width: int, path: Path) -> MLPPredictor:
    """A fitted MLP predictor from fits/, as an MLPPredictor of ``config``'s family."""
    from safetensors.torch import load_file

    model = MLPPredictor(config, width)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


