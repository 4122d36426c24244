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
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from hybrid_gpt.analysis.ablate import decode_speeds
from hybrid_gpt.analysis.distill_config import DEFAULTS, DistillConfig
from hybrid_gpt.analysis.verdict import gap_sentence, quality_kept
from hybrid_gpt.checkpoint import (
    CHECKPOINT_FILES,
    checkpoint_data,
    is_checkpoint,
    load_checkpoint,
    read_config,
    save_checkpoint,
)
from hybrid_gpt.data.tokenizer import Tokenizer, load_tokenizer
from hybrid_gpt.data.tokens import TokenData
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import nested, output_dir
from hybrid_gpt.model.gpt import GPT, GPTConfig, mixer_activations, parse_layers
from hybrid_gpt.present import distill as page
from hybrid_gpt.present.distill import ARMS, QUALITY_KEPT, QualityKept
from hybrid_gpt.present.numbers import pct
from hybrid_gpt.runtime import resolve_device
from hybrid_gpt.stats import ratio_over_difference
from hybrid_gpt.train.evaluate import bpb_difference, check_budget, evaluate_lm, windows
from hybrid_gpt.train.loop import TrainConfig, train
from hybrid_gpt.train.pretrain import PretrainTask

logger = logging.getLogger(__name__)

# What a distill output directory may hold: anything else means it is not ours to replace.
DISTILL_FILES = ("distill.json", "distill.md", "distill-*.png", *nested("distilled", CHECKPOINT_FILES),
                 *nested("distilled-finetuned", CHECKPOINT_FILES), *nested("drop-finetuned", CHECKPOINT_FILES))
KIND = {"A": "attention (A)", "M": "a per-token MLP (M)", "N": "no mixer (N)"}


@dataclass
class Teacher:
    """The trained model distilled from, with what came with it."""

    model: GPT
    tokenizer: Tokenizer
    training: dict  # config.json's "training"
    path: Path  # its checkpoint directory
    data: TokenData

    @property
    def preset(self) -> str | None:
        return self.training.get("preset")

    @property
    def steps(self) -> int:
        """Its training steps: later phases continue its data stream from here."""
        return int(self.training.get("step") or 0)


def plan_layers(teacher: str, target: str) -> tuple[str, list[int]]:
    """Check the target pattern against the teacher's; return it normalised and the blocks to distill."""
    target = parse_layers(target)
    if len(target) != len(teacher):
        raise HybridGPTError(f"target pattern {target} has {len(target)} letters but the teacher's pattern {teacher} "
                             f"has {len(teacher)}; give one letter per block")
    for i, (t, g) in enumerate(zip(teacher, target)):
        if g != t and g != "N" and not (t == "A" and g == "M"):
            raise HybridGPTError(
                f"target pattern {target}: block {i + 1} has {KIND[t]} in the teacher ({teacher}) and cannot "
                f"become {KIND[g]}; distillation only turns A into M, or drops a mixer with N"
            )
    distilled = [i for i, (t, g) in enumerate(zip(teacher, target)) if t == "A" and g == "M"]
    if not distilled:
        raise HybridGPTError(f"target pattern {target} turns none of the teacher's attention blocks ({teacher}) "
                             "into M; nothing to distill (put an M where the teacher has an A)")
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
        raise HybridGPTError(f"mlp_hidden {config.m_hidden} differs from the teacher's M blocks "
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


def _student(block):
    return lambda x: block.mixer(block.ln_1(x))


@torch.no_grad()
def _held_out(teacher: GPT, val_tokens, layers: list[int], max_tokens: int, batch_size: int,
              context: int) -> dict[int, tuple]:
    """{block: (x, target)} over the windows evaluate_lm reads at ``context``, ``max_tokens`` of them."""
    device = next(teacher.parameters()).device
    parts = [mixer_activations(teacher, chunk[:, :-1].to(device), layers)
             for chunk in windows(val_tokens, context, max_tokens, batch_size)]
    return {i: tuple(torch.cat([p[i][j] for p in parts]) for j in (0, 1)) for i in layers}


@torch.no_grad()
def _mse(fn, x: torch.Tensor, target: torch.Tensor, chunk: int = 64) -> float:
    return sum(F.mse_loss(fn(x[i:i + chunk]), target[i:i + chunk], reduction="sum").item()
               for i in range(0, len(x), chunk)) / target.numel()


class TeacherStream(PretrainTask):
    """Next-token prediction on the teacher's training data from step ``first_step`` on, so that each later
    phase continues its data stream; a task of train.loop.train, not evaluated by the loop (the arms are
    evaluated together afterwards)."""

    evaluate = None

    def __init__(self, data: TokenData, block_size: int, seed: int, rows: int, first_step: int):
        super().__init__(data, block_size, seed, rows, eval_tokens=1)
        self.first_step = first_step

    def rows(self, step: int):
        return super().rows(self.first_step + step)


class TeacherTargets(TeacherStream):
    """A TeacherStream whose batches are inputs only: the targets come from a teacher's forward on them."""

    def take(self, offsets, lo: int, hi: int, device):
        return super().take(offsets, lo, hi, device)[0]


class Imitation(TeacherTargets):
    """Distillation as a task of train.loop.train: per step, one teacher forward on the batch gives every
    block's target, and the loss is the sum of each student's MSE to its block's target; evaluation is
    the held-out MSE of each student ("val_mse_<block>")."""

    def __init__(self, teacher: GPT, layers: list[int], held_out: dict[int, tuple], *args):
        super().__init__(*args)
        self.teacher, self.layers, self.held_out = teacher, layers, held_out

    def loss(self, model, idx):
        acts = mixer_activations(self.teacher, idx, self.layers)
        losses = {i: F.mse_loss(_student(model.transformer.h[i])(x), target) for i, (x, target) in acts.items()}
        return sum(losses.values()), {f"mse_{i}": loss.item() for i, loss in losses.items()}

    def evaluate(self, model, final: bool, autocast=nullcontext) -> dict:
        return {f"mse_{i}": _mse(_student(model.transformer.h[i]), *self.held_out[i]) for i in self.layers}


def distill_layers(teacher: GPT, student: GPT, layers: list[int], data: TokenData, *, steps: int, lr: float,
                   batch_size: int, seed: int, mse_tokens: int, first_step: int = 0, context: int | None = None,
                   progress: bool = True) -> list[dict]:
    """Train each of ``student``'s blocks ``layers`` (ln_1 + mixer) on MSE to the teacher's mixer output there.

    The shared training loop, in memory (AdamW without weight decay, warmup then cosine decay). The summed
    loss gives each student exactly its own gradient and AdamW is per-parameter, so the layers train
    independently (hence no clipping, which would couple them). Batches are windows of the training split
    drawn at steps ``first_step + s``, ``context`` tokens long (default: the teacher's context), and so are
    the held-out windows of the MSE. Returns per layer the held-out MSE of predicting zero
    (attention-drop), before and after, the fraction of variance explained, the training curve and the
    held-out curve.
    """
    teacher.eval()
    context = context or teacher.config.block_size
    val = _held_out(teacher, data.val, layers, mse_tokens, batch_size, context)
    stats = {}
    for i, (_, target) in val.items():
        flat = target.reshape(-1, target.size(-1))
        stats[i] = {"var_target": flat.var(dim=0, unbiased=False).mean().item(), "mse_zero": flat.pow(2).mean().item()}
    task = Imitation(teacher, layers, val, data, context, seed, batch_size, first_step)
    cfg = TrainConfig(max_steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(50, steps // 10),
                      min_lr_ratio=0.1, weight_decay=0.0, grad_clip=0.0, eval_interval=max(1, steps // 10),
                      eval_at_start=True, seed=seed, progress=progress)
    metrics = train(student, task, cfg, info={"stage": "distill"}).metrics
    student.eval()
    evals = [m for m in metrics if "loss" not in m]
    out = []
    for i in layers:
        val_curve = [{"step": m["step"], "mse": m[f"val_mse_{i}"]} for m in evals]
        before, after = val_curve[0]["mse"], val_curve[-1]["mse"]
        var = stats[i]["var_target"]
        row = {"index": i, "block": i + 1, **stats[i], "mse_before": before, "mse_after": after,
               "fve_zero": 1 - stats[i]["mse_zero"] / var if var > 0 else None,
               "fve_before": 1 - before / var if var > 0 else None,
               "fve_after": 1 - after / var if var > 0 else None,
               "held_out_tokens": int(val[i][1].shape[0] * val[i][1].shape[1]),
               "train_mse": [m[f"mse_{i}"] for m in metrics if "loss" in m], "val_curve": val_curve}
        logger.info(f"block {i + 1}: held-out MSE {before:.5f} -> {after:.5f} (predicting zero: "
                    f"{stats[i]['mse_zero']:.5f}); variance explained {pct(row['fve_after'])}")
        out.append(row)
    return out


class LogitMatching(TeacherTargets):
    """Healing toward a teacher as a task of train.loop.train: the loss is the mean per-token
    KL(teacher || model) between the next-token distributions on the batch's inputs (one gradient-free
    teacher forward per step), so the model is pulled back to the teacher's whole output distribution
    rather than to the batch's next tokens."""

    def __init__(self, teacher: GPT, *args):
        super().__init__(*args)
        self.teacher = teacher.eval()

    def loss(self, model, idx):
        with torch.no_grad():
            target = F.log_softmax(self.teacher(idx).float(), dim=-1).flatten(0, 1)
        logp = F.log_softmax(model(idx).float(), dim=-1).flatten(0, 1)
        return F.kl_div(logp, target, log_target=True, reduction="batchmean"), {}


def finetune(model: GPT, data: TokenData, *, steps: int, lr: float, batch_size: int, seed: int,
             first_step: int = 0, desc: str = "fine-tune", progress: bool = True, teacher: GPT | None = None,
             context: int | None = None) -> list[float]:
    """A brief whole-model fine-tune on the shared training loop, in memory (AdamW without weight decay, warmup
    then cosine decay, clipping at 1); returns the losses. Its loss is next-token cross-entropy, or with a
    ``teacher`` the KL to the teacher's logits (:class:`LogitMatching`). Rows are ``context`` tokens long
    (default: the model's context).

    Batches depend only on (seed, first_step + step), so two models given the same arguments see the same data.
    """
    cfg = TrainConfig(max_steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(20, steps // 10),
                      min_lr_ratio=0.1, weight_decay=0.0, grad_clip=1.0, eval_interval=steps, seed=seed,
                      progress=progress)
    stream = (data, context or model.config.block_size, seed, batch_size, first_step)
    task = TeacherStream(*stream) if teacher is None else LogitMatching(teacher, *stream)
    result = train(model, task, cfg, info={"stage": desc})
    model.eval()
    return [m["loss"] for m in result.metrics]


def phase(name: str, steps: int | None, tokens_per_step: int | None, flops_per_token: float | None) -> dict:
    tokens = steps * tokens_per_step if steps is not None and tokens_per_step is not None else None
    return {"phase": name, "steps": steps, "tokens_per_step": tokens_per_step, "tokens": tokens,
            "approx_flops": tokens * flops_per_token if tokens is not None and flops_per_token else None}


def _pretrain_phase(training: dict, params: int, name: str) -> dict:
    steps, seen = training.get("step"), training.get("tokens_seen")
    per_step = seen // steps if steps and seen is not None else None
    return phase(f"{name} ({training.get('stage', 'pretrain')})", steps, per_step, 6 * params)


def total_compute(phases: list[dict]) -> dict:
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
        config, _ = read_config(path)
        if config.layers != target:
            notes.append(f"{path} has pattern {config.layers}, not {target}")
        elif load_tokenizer(path).sha256() != tokenizer_sha:  # its own tokenizer: a record may be missing
            notes.append(f"{path} has another tokenizer than the teacher's data")
        else:
            return path, f"{path}"
    return None, "; ".join(notes) or f"no {run_dir}/pretrain-hybrid or pretrain-{target} checkpoint"


def run_distill(checkpoint: str | Path, config: DistillConfig | None = None, *, progress: bool = True,
                **options) -> dict:
    """Distill the teacher's attention in the blocks ``config.layers`` turns from A into M, swap the students
    in, fine-tune (optionally), compare, and write distill.json, distill.md, distill-*.png and checkpoints
    (distilled/, and with a fine-tune distilled-finetuned/ and drop-finetuned/) into the output directory
    (``config.out_dir``, default ``<checkpoint's parent>/distill-<layers>``). Returns what distill.json holds.

    ``options`` are DistillConfig's fields, for a caller without a config (``layers="AAMM"``).
    """
    if config is None:
        config = DistillConfig(**options)
    elif options:
        raise TypeError("run_distill takes a DistillConfig or its fields as keywords, not both")
    t_start = time.time()
    dev = resolve_device(config.device)
    model, tokenizer, training = load_checkpoint(checkpoint, dev)
    ckpt = Path(checkpoint)
    ckpt = ckpt if ckpt.is_dir() else ckpt.parent
    target, distilled = plan_layers(model.config.layers, config.layers)
    cfg = replace(config, layers=target).resolved(training.get("preset"))
    out = Path(cfg.out_dir) if cfg.out_dir else ckpt.parent / f"distill-{target}"
    teacher = Teacher(model, tokenizer, training, ckpt, checkpoint_data(ckpt, tokenizer, training, cfg.data_dir))
    for name in ("eval_tokens", "mse_tokens"):  # before the work: a figure from a token or two means nothing
        check_budget(name, getattr(cfg, name), len(teacher.data.val), model.config.block_size)
    # Locked, recovered, and swapped in whole on success; a directory that is not a distill output is refused.
    with output_dir(out, allowed=DISTILL_FILES, what="distill output", overwrite=cfg.overwrite) as tmp:
        result = _distill(cfg, teacher, distilled, dev, tmp, out, progress)
        result["elapsed_s"] = time.time() - t_start
        page.write_outputs(result, tmp, judge_quality_kept(result))
    logger.info(f"wrote {out}/distill.md, distill.json, distill-mse.png, distill-bpb.png in {result['elapsed_s']:.0f}s")
    return result


def _distill(cfg: DistillConfig, teacher: Teacher, distilled: list[int], dev: torch.device, tmp: Path, out: Path,
             progress: bool) -> dict:
    """The work of run_distill, with the output written into ``tmp`` (named by its final place ``out``)."""
    data, T, target = teacher.data, teacher.model.config.block_size, cfg.layers
    logger.info(f"distill: teacher {teacher.path} ({teacher.model.config.layers}) -> {target}, blocks "
                f"{', '.join(str(i + 1) for i in distilled)}; {cfg.steps} steps x {cfg.batch_size} x {T} tokens")

    t0 = time.time()
    mlp_hidden = cfg.mlp_hidden or teacher.model.config.mlp_hidden
    student = transplant(teacher.model, target, mlp_hidden, cfg.seed)
    rows = distill_layers(teacher.model, student, distilled, data, steps=cfg.steps, lr=cfg.lr,
                          batch_size=cfg.batch_size, seed=cfg.seed, mse_tokens=cfg.mse_tokens,
                          first_step=teacher.steps, progress=progress)
    distill_s = time.time() - t0
    drop = transplant(teacher.model, drop_pattern(target, distilled), teacher.model.config.mlp_hidden, cfg.seed)
    models = {"teacher": teacher.model, "distilled": student, "drop": drop}
    finetune_curves, finetune_s = _finetune_arms(models, cfg, teacher, progress)
    scratch_path, scratch_note = _find_scratch(teacher.path.parent, target, data.meta["tokenizer_sha256"])
    scratch_training = None
    if scratch_path is not None:
        models["scratch"], _, scratch_training = load_checkpoint(scratch_path, dev)

    arms, gap = _score_arms(models, teacher, cfg)
    _charge_compute(arms, models, teacher, cfg, distilled, scratch_training)
    logger.info("decode speed (KV cache, batch 1): measuring teacher, distilled, attention-drop")
    # The teacher first: decode_speeds' ratios are against the first model, paired repeat by repeat.
    decode = decode_speeds({k: models[k] for k in ("teacher", "distilled", "drop")}, cfg.decode_repeats)
    decode["speedup_vs_teacher"] = {k: r["ratio"] for k, r in decode["ratios"].items()}
    checkpoints = _save_arms(arms, models, teacher, cfg, distilled, tmp, out)

    preset_settings = {k: getattr(cfg, k) for k in DEFAULTS["cpu"]}
    return {
        "checkpoint": str(teacher.path), "teacher_layers": teacher.model.config.layers, "layers": target,
        "drop_layers": models["drop"].config.layers, "distilled_blocks": [i + 1 for i in distilled],
        "out_dir": str(out),
        "settings": {"preset": teacher.preset, **preset_settings, "mlp_hidden": student.config.m_hidden,
                     "seed": cfg.seed, "block_size": T, "device": str(dev), "threads": torch.get_num_threads(),
                     "data_dir": str(data.root), "teacher_steps": teacher.steps,
                     "data_note": "distillation and fine-tune batches continue the teacher's data stream: step s "
                     "draws the windows of step teacher_steps + s (fine-tune: + steps)",
                     "optimizer": "the shared training loop's AdamW (betas 0.9, 0.95), no weight decay; warmup "
                     "then cosine decay to a tenth; the fine-tune clips gradients at 1"},
        "distillation": {"layers": rows, "elapsed_s": distill_s},
        "finetune": {"steps": cfg.finetune_steps, "lr": cfg.finetune_lr, "elapsed_s": finetune_s,
                     "loss_curves": finetune_curves},
        "arms": arms, "quality_kept_definition": QUALITY_KEPT, "quality_gap": gap,
        "scratch": {"checkpoint": str(scratch_path) if scratch_path else None, "note": scratch_note},
        "decode": decode, "checkpoints": checkpoints,
        "plots": {"mse": "distill-mse.png", "bpb": "distill-bpb.png"},
    }


def _finetune_arms(models: dict[str, GPT], cfg: DistillConfig, teacher: Teacher,
                   progress: bool) -> tuple[dict, float]:
    """With a fine-tune budget, a fine-tuned copy of the distilled model and of attention-drop (the same steps and
    batches, continuing the data stream after the distillation) into ``models``; their losses and the time."""
    curves = {}
    if not cfg.finetune_steps:
        return curves, 0.0
    t0 = time.time()
    for name in ("distilled", "drop"):
        tuned = copy.deepcopy(models[name])
        curves[name] = finetune(tuned, teacher.data, steps=cfg.finetune_steps, lr=cfg.finetune_lr,
                                batch_size=cfg.batch_size, seed=cfg.seed, first_step=teacher.steps + cfg.steps,
                                desc=f"fine-tune {name}", progress=progress)
        models[f"{name}_finetuned"] = tuned
    return curves, time.time() - t0


def _score_arms(models: dict[str, GPT], teacher: Teacher, cfg: DistillConfig) -> tuple[dict, dict]:
    """Every arm's held-out loss and bits per byte and its quality kept; and attention-drop - teacher, the
    difference the quality kept is a share of."""
    byte_lengths = teacher.tokenizer.token_byte_lengths()
    arms, evals = {}, {}
    for name, model in models.items():
        ev = evals[name] = evaluate_lm(model, teacher.data.val, byte_lengths, cfg.eval_tokens, per_window=True)
        arms[name] = {"label": ARMS[name], "layers": model.config.layers, "parameters": model.num_params(),
                      "kv_bytes_per_token": model.config.kv_bytes_per_token(), "loss": ev["loss"], "bpb": ev["bpb"],
                      "eval_tokens": ev["tokens"], "eval_bytes": ev["bytes"]}
        logger.info(f"{ARMS[name]:<28} {model.config.layers}  val loss {ev['loss']:.4f}  bpb {ev['bpb']:.4f}")
    gap = _interval(bpb_difference(evals["drop"], evals["teacher"]))
    for name, arm in arms.items():
        arm["quality_kept"] = ratio_over_difference(bpb_difference(evals["drop"], evals[name])["mean"], gap)
    return arms, gap


def _charge_compute(arms: dict, models: dict[str, GPT], teacher: Teacher, cfg: DistillConfig, distilled: list[int],
                    scratch_training: dict | None) -> None:
    """Each arm's ``compute``: what it cost, phase by phase.

    Optimizer steps x tokens per step, with ~6 x parameters FLOPs per trained token; a distillation step runs the
    frozen teacher forward (2 x its blocks' parameters per token) up to the last replaced block and trains only the
    small students."""
    tokens_per_step = cfg.batch_size * teacher.model.config.block_size
    teacher_phase = _pretrain_phase(teacher.training, teacher.model.num_params(), "teacher")
    prefix = sum(p.numel() for p in teacher.model.transformer.h[: max(distilled) + 1].parameters())
    blocks = [models["distilled"].transformer.h[i] for i in distilled]
    student_params = sum(p.numel() for b in blocks for m in (b.ln_1, b.mixer) for p in m.parameters())
    distill_phase = phase("distillation", cfg.steps, tokens_per_step, 2 * prefix + 6 * student_params)
    phases = {"teacher": [teacher_phase], "drop": [teacher_phase], "distilled": [teacher_phase, distill_phase]}
    for name in ("distilled", "drop"):
        if f"{name}_finetuned" in models:
            ft = phase("fine-tune", cfg.finetune_steps, tokens_per_step, 6 * models[name].num_params())
            phases[f"{name}_finetuned"] = phases[name] + [ft]
    if scratch_training is not None:
        phases["scratch"] = [_pretrain_phase(scratch_training, models["scratch"].num_params(), "from scratch")]
    for name, arm in arms.items():
        arm["compute"] = total_compute(phases[name])


def _save_arms(arms: dict, models: dict[str, GPT], teacher: Teacher, cfg: DistillConfig, distilled: list[int],
               tmp: Path, out: Path) -> dict[str, str]:
    """The trained arms' checkpoints into ``tmp`` (distilled/, distilled-finetuned/, drop-finetuned/); each arm
    is told its final place under ``out``."""
    data = teacher.data
    info = {"stage": "distill", "model_type": cfg.layers, "preset": teacher.preset,
            "teacher": str(teacher.path.resolve()), "data_dir": str(Path(data.root).resolve()),
            "data_tokenizer_sha256": data.meta["tokenizer_sha256"], "data_source": data.meta["source"],
            "distilled_blocks": [i + 1 for i in distilled], "seed": cfg.seed}
    checkpoints = {}
    for name in ("distilled", "distilled_finetuned", "drop_finetuned"):
        if name in models:
            folder = name.replace("_", "-")
            extra = {"finetune_steps": cfg.finetune_steps, "finetune_lr": cfg.finetune_lr} if "_" in name else {}
            save_checkpoint(tmp / folder, models[name], teacher.tokenizer,
                            dict(info, **extra, arm=ARMS[name], compute=arms[name]["compute"],
                                 last_eval={"val_loss": arms[name]["loss"], "val_bpb": arms[name]["bpb"]}))
            checkpoints[name] = str(out / folder)
            arms[name]["checkpoint"] = str(out / folder)
    return checkpoints


def _interval(d: dict) -> dict:
    """A mean_ci without its values: what a result keeps of a difference."""
    return {k: d[k] for k in ("mean", "ci95", "n")}


def judge_quality_kept(result: dict) -> QualityKept:
    """The verdict's reading of a distill result's quality kept, which its page repeats (verdict.quality_kept and
    verdict.gap_sentence)."""
    return QualityKept({arm: quality_kept(result, arm) for arm in result["arms"]}, gap_sentence(result))


def quality_summary(result: dict) -> str:
    """What distillation kept of the teacher's quality, in sentences (present/distill.py's, with the verdict's
    reading)."""
    return page.quality_sentences(result, judge_quality_kept(result))
