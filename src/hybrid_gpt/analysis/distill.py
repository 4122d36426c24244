"""Attention distillation ("approximating deep attention"): replace a trained model's attention
sub-layers with static per-token MLPs trained to imitate them, then measure what survives.

For every block that the target pattern turns from A into M, a student (the block's ln_1, initialised
from the teacher's, and a TokenMLP) learns by mean squared error to reproduce the teacher's sub-layer
output mixer(ln_1(x)) from the residual stream x that the frozen teacher itself feeds that block:
layer-wise and teacher-forced, as in Bozic et al. (2023), "Rethinking Attention". The students are then
swapped into a copy of the teacher whose every other parameter is bit-identical, and compared with
attention-drop (the same blocks with no mixer at all, no retraining), with both after the same brief
whole-model fine-tune, with the from-scratch hybrid when the run has one, and in cached decode speed.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hybrid_gpt.analysis.plots import save_plot, smooth
from hybrid_gpt.checkpoint import checkpoint_data, is_checkpoint, load_checkpoint, read_config, save_checkpoint
from hybrid_gpt.data.tokens import batch_offsets, get_batch
from hybrid_gpt.errors import HybridGPTError, RunFailure
from hybrid_gpt.fsutil import exclusive_writer, recover_dir, replace_dir, write_json, write_text
from hybrid_gpt.infer.bench import summary
from hybrid_gpt.infer.engine import generate
from hybrid_gpt.model.gpt import GPT, GPTConfig
from hybrid_gpt.runtime import resolve_device
from hybrid_gpt.train.evaluate import EVAL_TOKENS, evaluate_lm
from hybrid_gpt.train.loop import TrainConfig, lr_at

# Per preset (read from the teacher's config.json): distillation and fine-tune steps, learning rates,
# rows per batch, and the held-out tokens for the MSE (mse_tokens) and for bits per byte (eval_tokens).
DEFAULTS = {
    "smoke": dict(steps=60, finetune_steps=10, lr=1e-2, finetune_lr=3e-4, batch_size=8, mse_tokens=2048,
                  eval_tokens=4096),
    "cpu": dict(steps=300, finetune_steps=200, lr=1e-2, finetune_lr=3e-4, batch_size=32, mse_tokens=16384,
                eval_tokens=EVAL_TOKENS),
    "seed": dict(steps=1000, finetune_steps=500, lr=3e-3, finetune_lr=1e-4, batch_size=64, mse_tokens=32768,
                 eval_tokens=EVAL_TOKENS),
}
DECODE_NEW_TOKENS = 24
DECODE_REPEATS = 5
ARMS = {  # result key -> label, in the order of the tables
    "teacher": "teacher",
    "distilled": "distilled",
    "distilled_finetuned": "distilled + fine-tune",
    "drop": "attention-drop",
    "drop_finetuned": "attention-drop + fine-tune",
    "scratch": "hybrid from scratch",
}
KIND = {"A": "attention (A)", "M": "a per-token MLP (M)", "N": "no mixer (N)"}
QUALITY_KEPT = ("quality kept = (bpb of attention-drop - bpb of the model) / (bpb of attention-drop - bpb of the "
                "teacher), with attention-drop before any fine-tune: 1 is the teacher's quality, 0 is no better "
                "than deleting those attention layers, above 1 better than the teacher")


def plan_layers(teacher: str, target: str) -> tuple[str, list[int]]:
    """Check the target pattern against the teacher's; return it normalised and the blocks to distill."""
    target = (target or "").strip().upper()
    if not target or set(target) - set(KIND):
        raise HybridGPTError(f"--layers {target!r} must use only A (attention), M (per-token MLP) and N (no mixer)")
    if len(target) != len(teacher):
        raise HybridGPTError(f"--layers {target} has {len(target)} letters but the teacher's pattern {teacher} has "
                             f"{len(teacher)}; give one letter per block")
    for i, (t, g) in enumerate(zip(teacher, target)):
        if g != t and g != "N" and not (t == "A" and g == "M"):
            raise HybridGPTError(
                f"--layers {target}: block {i + 1} has {KIND[t]} in the teacher ({teacher}) and cannot become "
                f"{KIND[g]}; distillation only turns A into M, or drops a mixer with N"
            )
    distilled = [i for i, (t, g) in enumerate(zip(teacher, target)) if t == "A" and g == "M"]
    if not distilled:
        raise HybridGPTError(f"--layers {target} turns none of the teacher's attention blocks ({teacher}) into M; "
                             "nothing to distill (put an M where the teacher has an A)")
    return target, distilled


def drop_pattern(target: str, distilled: list[int]) -> str:
    """The attention-drop control: the distilled blocks with no mixer at all."""
    return "".join("N" if i in distilled else c for i, c in enumerate(target))


def transplant(teacher: GPT, layers: str, mlp_hidden: int = 0, seed: int = 0) -> GPT:
    """A new GPT with pattern ``layers`` holding a bit-identical copy of every teacher tensor it shares.

    A block that changes from A to M keeps the teacher's ln_1 and gets a freshly initialised TokenMLP
    (GPT's own initialisation, seeded); an N block simply has no mixer parameters.
    """
    config = GPTConfig(**{**teacher.config.to_dict(), "layers": layers, "mlp_hidden": mlp_hidden}).validate()
    if "M" in teacher.config.layers and config.m_hidden != teacher.config.m_hidden:
        raise HybridGPTError(f"--mlp-hidden {config.m_hidden} differs from the teacher's M blocks "
                             f"({teacher.config.m_hidden}); leave it out to keep theirs")
    with torch.random.fork_rng(devices=[]):  # seed the new mixers without touching the caller's RNG
        torch.manual_seed(seed)
        model = GPT(config)
    changed = tuple(f"transformer.h.{i}.mixer." for i, (a, b) in enumerate(zip(teacher.config.layers, layers))
                    if a != b)
    ours = model.state_dict()
    state = {k: v for k, v in teacher.state_dict().items() if k in ours and not k.startswith(changed)}
    missing, _ = model.load_state_dict(state, strict=False)
    assert all(k.startswith(changed) for k in missing), missing  # only the new mixers are left to learn
    return model.to(next(teacher.parameters()).device).eval()


@torch.no_grad()
def teacher_activations(teacher: GPT, idx: torch.Tensor, layers: list[int]) -> dict[int, tuple]:
    """{block: (residual stream entering it, its mixer output mixer(ln_1(x)))} from the frozen teacher.

    Mirrors GPT.forward in eval mode (no dropout, no cache) but stops after the last block needed.
    """
    h = teacher.transformer
    x = h.wte(idx) + h.wpe(torch.arange(idx.size(1), device=idx.device))
    out = {}
    for i, block in enumerate(h.h[: max(layers) + 1]):
        if i in layers:
            out[i] = (x, block.mixer(block.ln_1(x)))
            if i == max(layers):
                break
        x = block(x)
    return out


def _student(block):
    return lambda x: block.mixer(block.ln_1(x))


def _val_windows(tokens: np.ndarray, block_size: int, max_tokens: int) -> torch.Tensor:
    """The first ``max_tokens`` of the split, tiled in windows of the context (as evaluate_lm does)."""
    n = max(1, min(max_tokens, len(tokens) - 1) // block_size)
    return torch.from_numpy(np.asarray(tokens[: n * block_size], dtype=np.int64).reshape(n, block_size))


@torch.no_grad()
def _held_out(teacher: GPT, windows: torch.Tensor, layers: list[int], batch_size: int) -> dict[int, tuple]:
    device = next(teacher.parameters()).device
    parts = [teacher_activations(teacher, windows[i:i + batch_size].to(device), layers)
             for i in range(0, len(windows), batch_size)]
    return {i: tuple(torch.cat([p[i][j] for p in parts]) for j in (0, 1)) for i in layers}


@torch.no_grad()
def _mse(fn, x: torch.Tensor, target: torch.Tensor, chunk: int = 64) -> float:
    return sum(F.mse_loss(fn(x[i:i + chunk]), target[i:i + chunk], reduction="sum").item()
               for i in range(0, len(x), chunk)) / target.numel()


def distill_layers(teacher: GPT, student: GPT, layers: list[int], train_tokens: np.ndarray,
                   val_tokens: np.ndarray, *, steps: int, lr: float, batch_size: int, seed: int,
                   mse_tokens: int, first_step: int = 0, log=print, progress: bool = True) -> list[dict]:
    """Train each of ``student``'s blocks ``layers`` (ln_1 + mixer) on MSE to the teacher's mixer output there.

    One teacher forward per step serves every layer; the summed loss gives each student exactly its own
    gradient and AdamW is per-parameter, so the layers train independently (hence no global clipping).
    Batches are windows of the training split drawn at steps ``first_step + s``. Returns per layer the
    held-out MSE of predicting zero (attention-drop), before and after, the fraction of variance
    explained, the training curve and the held-out curve.
    """
    from tqdm.auto import tqdm

    T = teacher.config.block_size
    device = next(teacher.parameters()).device
    teacher.eval()
    blocks = {i: student.transformer.h[i] for i in layers}
    val = _held_out(teacher, _val_windows(val_tokens, T, mse_tokens), layers, batch_size)

    def held_out_mse() -> dict[int, float]:
        return {i: _mse(_student(blocks[i]), *val[i]) for i in layers}

    stats = {}
    for i, (_, target) in val.items():
        flat = target.reshape(-1, target.size(-1))
        stats[i] = {"var_target": flat.var(dim=0, unbiased=False).mean().item(), "mse_zero": flat.pow(2).mean().item()}
    before = held_out_mse()
    params = [p for b in blocks.values() for m in (b.ln_1, b.mixer) for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = TrainConfig(max_steps=steps, lr=lr, warmup_steps=min(50, steps // 10), min_lr_ratio=0.1)
    eval_every = max(1, steps // 10)
    train_curve = {i: [] for i in layers}
    val_curve = {i: [{"step": 0, "mse": before[i]}] for i in layers}
    for b in blocks.values():
        b.train()
    for step in tqdm(range(steps), disable=not progress, unit="step", dynamic_ncols=True, desc="distill"):
        offsets = batch_offsets(len(train_tokens), T, batch_size, seed, first_step + step)
        acts = teacher_activations(teacher, get_batch(train_tokens, offsets, T)[0].to(device), layers)
        losses = {i: F.mse_loss(_student(blocks[i])(x), target) for i, (x, target) in acts.items()}
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, schedule)
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for i, loss in losses.items():
            train_curve[i].append(loss.item())
            if not math.isfinite(train_curve[i][-1]):
                raise RunFailure(f"distillation of block {i + 1} became non-finite at step {step + 1}; "
                                 "try a lower --lr")
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            for i, mse in held_out_mse().items():
                val_curve[i].append({"step": step + 1, "mse": mse})
    for b in blocks.values():
        b.eval()
    after = held_out_mse()
    out = []
    for i in layers:
        var = stats[i]["var_target"]
        row = {"index": i, "block": i + 1, **stats[i], "mse_before": before[i], "mse_after": after[i],
               "fve_zero": 1 - stats[i]["mse_zero"] / var if var > 0 else None,
               "fve_before": 1 - before[i] / var if var > 0 else None,
               "fve_after": 1 - after[i] / var if var > 0 else None,
               "held_out_tokens": int(val[i][1].shape[0] * val[i][1].shape[1]),
               "train_mse": train_curve[i], "val_curve": val_curve[i]}
        log(f"block {i + 1}: held-out MSE {before[i]:.5f} -> {after[i]:.5f} (predicting zero: "
            f"{stats[i]['mse_zero']:.5f}); variance explained {_pct(row['fve_after'])}")
        out.append(row)
    return out


def finetune(model: GPT, train_tokens: np.ndarray, *, steps: int, lr: float, batch_size: int, seed: int,
             first_step: int = 0, desc: str = "fine-tune", progress: bool = True) -> list[float]:
    """A brief whole-model next-token fine-tune (AdamW, warmup + cosine, clipping 1.0); returns the losses.

    Batches depend only on (seed, first_step + step), so two models given the same arguments see the same data.
    """
    from tqdm.auto import tqdm

    T = model.config.block_size
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = TrainConfig(max_steps=steps, lr=lr, warmup_steps=min(20, steps // 10), min_lr_ratio=0.1)
    losses = []
    model.train()
    for step in tqdm(range(steps), disable=not progress, unit="step", dynamic_ncols=True, desc=desc):
        x, y = get_batch(train_tokens, batch_offsets(len(train_tokens), T, batch_size, seed, first_step + step), T)
        _, loss = model(x.to(device), y.to(device))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not (math.isfinite(loss.item()) and torch.isfinite(grad_norm)):
            raise RunFailure(f"{desc}: loss or gradient became non-finite at step {step + 1}; "
                             "try a lower --finetune-lr")
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, schedule)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def _step_times(model: GPT, prompt: torch.Tensor, new_tokens: int) -> list[float]:
    """Seconds between consecutive tokens of the engine's cached greedy decoding: one decode step each,
    prefill excluded (it precedes the first token)."""
    device = prompt.device
    stamps = []
    for _ in generate(model, prompt, new_tokens, temperature=0, use_cache=True):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def decode_speed(models: dict[str, GPT], *, new_tokens: int = DECODE_NEW_TOKENS, repeats: int = DECODE_REPEATS,
                 seed: int = 0) -> dict:
    """Cached greedy decode tokens/s at batch 1: per repeat, one over the median time of a decode step, so
    that a moment of preemption on a shared machine moves no figure; models interleaved, one warm-up round
    discarded; the prompt fills the context up to ``new_tokens`` before its end."""
    first = next(iter(models.values()))
    device = next(first.parameters()).device
    block = first.config.block_size
    new_tokens = max(2, min(new_tokens, block // 2))
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, first.config.vocab_size, (1, block - new_tokens), generator=gen).to(device)
    samples = {name: [] for name in models}
    for rep in range(1 + repeats):
        for name, model in models.items():
            rate = 1 / max(statistics.median(_step_times(model, prompt, new_tokens)), 1e-9)
            if rep:
                samples[name].append(rate)
    return {"context": block, "new_tokens": new_tokens, "batch": 1, "repeats": repeats,
            "tok_s": {name: summary(v) for name, v in samples.items()}}


def _phase(name: str, steps: int | None, tokens_per_step: int | None, flops_per_token: float | None) -> dict:
    tokens = steps * tokens_per_step if steps is not None and tokens_per_step is not None else None
    return {"phase": name, "steps": steps, "tokens_per_step": tokens_per_step, "tokens": tokens,
            "approx_flops": tokens * flops_per_token if tokens is not None and flops_per_token else None}


def _pretrain_phase(training: dict, params: int, name: str) -> dict:
    steps, seen = training.get("step"), training.get("tokens_seen")
    per_step = seen // steps if steps and seen is not None else None
    return _phase(f"{name} ({training.get('stage', 'pretrain')})", steps, per_step, 6 * params)


def _total(phases: list[dict]) -> dict:
    def add(key):
        values = [p[key] for p in phases]
        return None if any(v is None for v in values) else sum(values)

    return {"phases": phases, "steps": add("steps"), "tokens": add("tokens"), "approx_flops": add("approx_flops")}


def _find_scratch(run_dir: Path, target: str, tokenizer_sha: str) -> tuple[Path | None, str]:
    """The run's from-scratch model with the target pattern, if there is one, and a note on what was found."""
    notes = []
    for name in dict.fromkeys(("pretrain-hybrid", f"pretrain-{target}")):
        path = run_dir / name
        if not is_checkpoint(path):
            continue
        config, training = read_config(path)
        if config.layers != target:
            notes.append(f"{path} has pattern {config.layers}, not {target}")
        elif training.get("data_tokenizer_sha256") not in (None, tokenizer_sha):
            notes.append(f"{path} was trained on other data")
        else:
            return path, f"{path}"
    return None, "; ".join(notes) or f"no {run_dir}/pretrain-hybrid or pretrain-{target} checkpoint"


def _settings(training: dict, overrides: dict, log) -> tuple[str, dict]:
    preset = training.get("preset")
    if preset not in DEFAULTS:
        log(f"the teacher records no known preset ({preset!r}); using the cpu preset's distillation defaults")
    values = dict(DEFAULTS.get(preset, DEFAULTS["cpu"]))
    values.update({k: v for k, v in overrides.items() if v is not None})
    for name in ("steps", "batch_size", "mse_tokens", "eval_tokens"):
        if not isinstance(values[name], int) or values[name] < 1:
            raise HybridGPTError(f"--{name.replace('_', '-')} must be a positive integer, got {values[name]!r}")
    if not isinstance(values["finetune_steps"], int) or values["finetune_steps"] < 0:
        raise HybridGPTError(f"--finetune-steps must be 0 (skip) or more, got {values['finetune_steps']!r}")
    for name in ("lr", "finetune_lr"):
        if not (isinstance(values[name], (int, float)) and values[name] > 0 and math.isfinite(values[name])):
            raise HybridGPTError(f"--{name.replace('_', '-')} must be a positive number, got {values[name]!r}")
    return preset, values


def run_distill(checkpoint: str | Path, *, layers: str, out_dir: str | Path | None = None, steps: int | None = None,
                finetune_steps: int | None = None, lr: float | None = None, finetune_lr: float | None = None,
                batch_size: int | None = None, mlp_hidden: int | None = None, mse_tokens: int | None = None,
                eval_tokens: int | None = None, decode_repeats: int = DECODE_REPEATS, seed: int = 1337,
                data_dir: str | Path | None = None, device: str = "auto", overwrite: bool = False,
                log=print, progress: bool = True) -> dict:
    """Distill the teacher's attention in the blocks ``layers`` turns from A into M, swap the students in,
    fine-tune (optionally), compare, and write distill.json, distill.md, distill-*.png and checkpoints
    (distilled/, and with a fine-tune distilled-finetuned/ and drop-finetuned/) into ``out_dir``
    (default ``<checkpoint's parent>/distill-<layers>``). Returns what distill.json holds."""
    t_start = time.time()
    dev = resolve_device(device)
    teacher, tokenizer, training = load_checkpoint(checkpoint, dev)
    ckpt = Path(checkpoint)
    ckpt = ckpt if ckpt.is_dir() else ckpt.parent
    target, distilled = plan_layers(teacher.config.layers, layers)
    preset, s = _settings(training, dict(steps=steps, finetune_steps=finetune_steps, lr=lr, finetune_lr=finetune_lr,
                                         batch_size=batch_size, mse_tokens=mse_tokens, eval_tokens=eval_tokens), log)
    if mlp_hidden is not None and (not isinstance(mlp_hidden, int) or mlp_hidden < 1):
        raise HybridGPTError(f"--mlp-hidden must be a positive integer, got {mlp_hidden!r}")
    out = Path(out_dir) if out_dir else ckpt.parent / f"distill-{target}"
    recover_dir(out)
    if out.exists() and not overwrite:
        raise HybridGPTError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not (out / "distill.json").is_file():  # never replace a run dir or a checkpoint
        raise HybridGPTError(f"{out} exists and holds no distill.json, so it is not a distill output; "
                             "choose another output directory")
    data = checkpoint_data(ckpt, tokenizer, training, data_dir)
    with exclusive_writer(out):
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed run; the lock makes them ours
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            result = _distill(teacher, tokenizer, training, ckpt, data, target, distilled, preset, s,
                              mlp_hidden or teacher.config.mlp_hidden, decode_repeats, seed, dev, tmp, out,
                              log, progress)
            result["elapsed_s"] = time.time() - t_start
            write_json(tmp / "distill.json", result)
            write_text(tmp / "distill.md", render_distill_markdown(result))
            replace_dir(tmp, out)  # the whole output appears at once, or the previous one stays
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"wrote {out}/distill.md, distill.json, distill-mse.png, distill-bpb.png in {result['elapsed_s']:.0f}s")
    return result


def _distill(teacher, tokenizer, training, ckpt, data, target, distilled, preset, s, mlp_hidden, decode_repeats,
             seed, dev, tmp, out, log, progress) -> dict:
    byte_lengths = tokenizer.token_byte_lengths()
    T = teacher.config.block_size
    teacher_steps = int(training.get("step") or 0)  # later phases continue the teacher's data stream from here
    log(f"distill: teacher {ckpt} ({teacher.config.layers}) -> {target}, blocks "
        f"{', '.join(str(i + 1) for i in distilled)}; {s['steps']} steps x {s['batch_size']} x {T} tokens")

    t0 = time.time()
    student = transplant(teacher, target, mlp_hidden, seed)
    rows = distill_layers(teacher, student, distilled, data.train, data.val, steps=s["steps"], lr=s["lr"],
                          batch_size=s["batch_size"], seed=seed, mse_tokens=s["mse_tokens"],
                          first_step=teacher_steps, log=log, progress=progress)
    distill_s = time.time() - t0
    drop = transplant(teacher, drop_pattern(target, distilled), teacher.config.mlp_hidden, seed)
    models = {"teacher": teacher, "distilled": student, "drop": drop}

    finetune_curves, finetune_s = {}, 0.0
    if s["finetune_steps"]:
        t0 = time.time()
        for name in ("distilled", "drop"):
            tuned = copy.deepcopy(models[name])
            finetune_curves[name] = finetune(tuned, data.train, steps=s["finetune_steps"], lr=s["finetune_lr"],
                                             batch_size=s["batch_size"], seed=seed,
                                             first_step=teacher_steps + s["steps"], desc=f"fine-tune {name}",
                                             progress=progress)
            models[f"{name}_finetuned"] = tuned
        finetune_s = time.time() - t0
    scratch_path, scratch_note = _find_scratch(ckpt.parent, target, data.meta["tokenizer_sha256"])
    scratch_training = None
    if scratch_path is not None:
        models["scratch"], _, scratch_training = load_checkpoint(scratch_path, dev)

    arms = {}
    for name, model in models.items():
        ev = evaluate_lm(model, data.val, byte_lengths, s["eval_tokens"])
        arms[name] = {"label": ARMS[name], "layers": model.config.layers, "parameters": model.num_params(),
                      "kv_bytes_per_token": model.config.kv_bytes_per_token(), "loss": ev["loss"], "bpb": ev["bpb"],
                      "eval_tokens": ev["tokens"], "eval_bytes": ev["bytes"]}
        log(f"{ARMS[name]:<28} {model.config.layers}  val loss {ev['loss']:.4f}  bpb {ev['bpb']:.4f}")
    gap = arms["drop"]["bpb"] - arms["teacher"]["bpb"]
    for arm in arms.values():
        arm["quality_kept"] = (arms["drop"]["bpb"] - arm["bpb"]) / gap if abs(gap) > 1e-12 else None

    # What each arm cost: optimizer steps x tokens per step, with ~6 x parameters FLOPs per trained token;
    # a distillation step runs the frozen teacher forward (2 x its blocks' parameters per token) up to the
    # last replaced block and trains only the small students.
    tokens_per_step = s["batch_size"] * T
    teacher_phase = _pretrain_phase(training, teacher.num_params(), "teacher")
    prefix = sum(p.numel() for p in teacher.transformer.h[: max(distilled) + 1].parameters())
    blocks = [student.transformer.h[i] for i in distilled]
    student_params = sum(p.numel() for b in blocks for m in (b.ln_1, b.mixer) for p in m.parameters())
    distill_phase = _phase("distillation", s["steps"], tokens_per_step, 2 * prefix + 6 * student_params)
    phases = {"teacher": [teacher_phase], "drop": [teacher_phase], "distilled": [teacher_phase, distill_phase]}
    for name in ("distilled", "drop"):
        if f"{name}_finetuned" in models:
            ft = _phase("fine-tune", s["finetune_steps"], tokens_per_step, 6 * models[name].num_params())
            phases[f"{name}_finetuned"] = phases[name] + [ft]
    if scratch_training is not None:
        phases["scratch"] = [_pretrain_phase(scratch_training, models["scratch"].num_params(), "from scratch")]
    for name, arm in arms.items():
        arm["compute"] = _total(phases[name])

    log("decode speed (KV cache, batch 1): measuring teacher, distilled, attention-drop")
    decode = decode_speed({k: models[k] for k in ("teacher", "distilled", "drop")}, repeats=decode_repeats, seed=seed)
    base = decode["tok_s"]["teacher"]["median"]
    decode["speedup_vs_teacher"] = {k: v["median"] / base for k, v in decode["tok_s"].items()}

    info = {"stage": "distill", "model_type": target, "preset": preset, "teacher": str(ckpt.resolve()),
            "data_dir": str(Path(data.root).resolve()), "data_tokenizer_sha256": data.meta["tokenizer_sha256"],
            "data_source": data.meta["source"], "distilled_blocks": [i + 1 for i in distilled], "seed": seed}
    checkpoints = {}
    for name in ("distilled", "distilled_finetuned", "drop_finetuned"):
        if name in models:
            folder = name.replace("_", "-")
            extra = {"finetune_steps": s["finetune_steps"], "finetune_lr": s["finetune_lr"]} if "_" in name else {}
            save_checkpoint(tmp / folder, models[name], tokenizer,
                            dict(info, **extra, arm=ARMS[name], compute=arms[name]["compute"],
                                 last_eval={"val_loss": arms[name]["loss"], "val_bpb": arms[name]["bpb"]}))
            checkpoints[name] = str(out / folder)
            arms[name]["checkpoint"] = str(out / folder)

    result = {
        "checkpoint": str(ckpt), "teacher_layers": teacher.config.layers, "layers": target,
        "drop_layers": models["drop"].config.layers, "distilled_blocks": [i + 1 for i in distilled],
        "settings": {"preset": preset, **s, "mlp_hidden": student.config.m_hidden, "seed": seed, "block_size": T,
                     "device": str(dev), "threads": torch.get_num_threads(), "data_dir": str(data.root),
                     "teacher_steps": teacher_steps, "data_note": "distillation and fine-tune batches continue the "
                     "teacher's data stream: step s draws the windows of step teacher_steps + s (fine-tune: + steps)"},
        "distillation": {"layers": rows, "elapsed_s": distill_s},
        "finetune": {"steps": s["finetune_steps"], "lr": s["finetune_lr"], "elapsed_s": finetune_s,
                     "loss_curves": finetune_curves},
        "arms": arms, "quality_kept_definition": QUALITY_KEPT,
        "scratch": {"checkpoint": str(scratch_path) if scratch_path else None, "note": scratch_note},
        "decode": decode, "checkpoints": checkpoints,
        "plots": {"mse": "distill-mse.png", "bpb": "distill-bpb.png"},
    }
    plot_mse(result, tmp / "distill-mse.png")
    plot_bpb(result, tmp / "distill-bpb.png")
    return result


def plot_mse(result: dict, path: Path) -> str:

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


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: int | None) -> str:
    return "n/a" if x is None else f"{x:,}"


def _sci(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2e}"


def render_distill_markdown(result: dict) -> str:
    """The distill section of a report, from distill.json's contents alone."""
    s, arms, dec = result["settings"], result["arms"], result["decode"]
    rows = result["distillation"]["layers"]
    blocks = ", ".join(str(b) for b in result["distilled_blocks"])
    lines = [f"## Attention distillation: {result['teacher_layers']} -> {result['layers']}", "",
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
             "| block | variance of the target | MSE of predicting zero | MSE before | MSE after "
             "| variance explained before | after |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['block']} | {r['var_target']:.4g} | {r['mse_zero']:.4g} | {r['mse_before']:.4g} | "
                     f"{r['mse_after']:.4g} | {_pct(r['fve_before'])} | {_pct(r['fve_after'])} |")
    lower = [r for r in rows if r["mse_after"] < r["mse_before"]]
    lines += ["", f"Distillation lowered the held-out MSE in {len(lower)} of {len(rows)} block(s); after it the "
              "MLP explains " + ", ".join(f"{_pct(r['fve_after'])} (block {r['block']})" for r in rows)
              + " of the variance of the attention output. Variance explained is 1 - MSE / variance, the variance "
              "taken around the target's mean in each dimension: predicting that mean scores 0%, and predicting zero "
              "(attention-drop) scores " + ", ".join(f"{_pct(r['fve_zero'])} (block {r['block']})" for r in rows)
              + ", below 0% because the attention output's mean is not zero.", ""]

    lines += ["### Quality and compute", "",
              f"Validation bits per byte over {arms['teacher']['eval_tokens']:,} held-out tokens. "
              f"{QUALITY_KEPT[0].upper()}{QUALITY_KEPT[1:]}. Compute counts every optimizer step that led to the "
              "model (tokens = steps x tokens per step, the teacher's pretraining included); FLOPs are "
              "approximate: 6 x parameters per trained token, and for distillation 2 x the teacher's parameters "
              "up to the last replaced block (forward only) plus 6 x the students' parameters.", "",
              "| model | pattern | bpb | loss (nats/token) | quality kept | training tokens | approx. FLOPs "
              "| parameters |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k in ARMS:
        if k in arms:
            a = arms[k]
            lines.append(f"| {a['label']} | {a['layers']} | {a['bpb']:.4f} | {a['loss']:.4f} | "
                         f"{_pct(a['quality_kept'])} | {_num(a['compute']['tokens'])} | "
                         f"{_sci(a['compute']['approx_flops'])} | {a['parameters']:,} |")
    lines += ["", "Compute by phase:", ""]
    for k in ARMS:
        if k in arms:
            phases = "; ".join(f"{p['phase']}: {_num(p['steps'])} steps x {_num(p['tokens_per_step'])} tokens"
                               for p in arms[k]["compute"]["phases"])
            lines.append(f"- {arms[k]['label']}: {phases}")
    lines += ["", quality_sentences(result), ""]

    lines += ["### Cached decode speed", "",
              f"Greedy decoding with the KV cache, batch 1, {dec['new_tokens']} new tokens ending at context "
              f"{dec['context']}, prefill excluded. Each repeat's figure is one over its median decode-step time (the "
              f"time between two tokens); median (min-max) of {dec['repeats']} interleaved repeats after a warm-up, "
              f"on {s['device']} with {s['threads']} threads. Fine-tuned models share their architecture's speed.", "",
              "| model | pattern | tokens/s | vs teacher |", "| --- | --- | --- | --- |"]
    for k, v in dec["tok_s"].items():
        lines.append(f"| {ARMS[k]} | {arms[k]['layers']} | {v['median']:,.0f} ({v['min']:,.0f}-{v['max']:,.0f}) | "
                     f"{dec['speedup_vs_teacher'][k]:.2f}x |")
    lines += ["", f"![held-out MSE during distillation]({result['plots']['mse']})",
              f"![validation bits per byte]({result['plots']['bpb']})", ""]
    if result["checkpoints"]:
        lines += ["Checkpoints: " + ", ".join(f"`{p}`" for p in result["checkpoints"].values()) + ".", ""]
    return "\n".join(lines)


def quality_sentences(result: dict) -> str:
    arms = result["arms"]

    def compare(a: str, b: str) -> str:
        d = arms[a]["bpb"] - arms[b]["bpb"]
        word = "lower" if d < 0 else "higher"
        return f"{abs(d):.4f} bits per byte {word} than the {arms[b]['label']}"

    out = [f"Before any fine-tune the distilled model keeps {_pct(arms['distilled']['quality_kept'])} of the "
           f"teacher's quality ({compare('distilled', 'teacher')}; {compare('distilled', 'drop')})."]
    if "distilled_finetuned" in arms:
        out.append(f"After the same {result['finetune']['steps']}-step fine-tune it keeps "
                   f"{_pct(arms['distilled_finetuned']['quality_kept'])} and attention-drop "
                   f"{_pct(arms['drop_finetuned']['quality_kept'])}: the distilled model ends "
                   f"{compare('distilled_finetuned', 'drop_finetuned')}, with the same fine-tune budget.")
    else:
        out.append("No fine-tune was run (finetune_steps 0).")
    if "scratch" in arms:
        best = "distilled_finetuned" if "distilled_finetuned" in arms else "distilled"
        out.append(f"The {arms[best]['label']} model is {compare(best, 'scratch')} "
                   f"(`{result['scratch']['checkpoint']}`, quality kept {_pct(arms['scratch']['quality_kept'])}).")
    else:
        out.append(f"No from-scratch model to compare: {result['scratch']['note']}.")
    return " ".join(out)
