"""Retrofit: the hypothesis on a real pretrained model. Replace some of a trained model's attention layers
(SmolLM2-135M-Instruct's, imported) by nothing or by tiny per-token MLPs, and measure what that costs in
quality and buys in speed, up to its long contexts.

The arms: for each k (attention layers replaced) and each choice of layers (the k deepest, or the k least
important by importance.py's residual similarity on the TRAINING split, never the held-out text scored
here), four treatments:

- drop: those blocks become N (no mixer, nothing trained);
- distil: those blocks become M, each MLP (with its block's norm) trained by distill.distill_layers on the
  teacher's attention output given the teacher's residual stream (layer-wise MSE, teacher-forced);
- drop + heal, distil + heal: the arm, then a short whole-model fine-tune toward the teacher's logits (KL,
  distill.LogitMatching), the same budget and the same batches for both, so drop + heal is the fair control.
  Healing uses the teacher's logits rather than next-token loss on the plays because the model is
  instruction-tuned: next-token loss on Shakespeare would pull it toward the plays and away from the chat
  behaviour that the agreement, passkey and answer measurements look at; the KL keeps the target what the
  full model does.

Distillation is teacher-forced and each layer's student trains on its own loss alone (distill_layers), so a
student does not depend on which other layers are replaced: the union of every layer any arm needs is
distilled once (one teacher forward per step serves them all) and each arm receives bit-identical copies of
its layers' students. The compute table says so: the shared run's steps, tokens and teacher forwards, and
the share of it each arm uses.

Quality, on held-out text only: bits per byte on the held-out plays (windows of eval_context tokens, each
scored by evaluate_lm, so the difference to the full model pairs window by window and gets a t-interval over
the windows); top-1 agreement and KL against the full model on held-out chat transcripts in the model's
template; passkey retrieval at long contexts; greedy answers to fixed questions, for people to read.
Speed: infer/bench.py's estimator on one model per distinct pattern shape (full; for each k, its M and N
patterns), with the cost model's prediction beside each measured ratio. The verdict uses the from-scratch
study's three-valued rule (stats.judge_interval, verdict.QUALITY_TOLERANCE, verdict.SPEED_GAIN).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from hybrid_gpt.analysis import passkey
from hybrid_gpt.analysis.distill import Teacher, distill_layers, finetune, phase, total_compute, transplant
from hybrid_gpt.analysis.importance import attention_layers, attention_stats
from hybrid_gpt.analysis.retrofit_config import TREATMENTS, RetrofitConfig
from hybrid_gpt.analysis.verdict import QUALITY_TOLERANCE, SPEED_GAIN, STATES
from hybrid_gpt.checkpoint import (
    CHECKPOINT_FILES,
    load_checkpoint,
    open_checkpoint_data,
    read_config,
    resolve,
    save_checkpoint,
)
from hybrid_gpt.data.chat_data import load_sft
from hybrid_gpt.data.tokens import TokenData
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import check_replaceable, nested, output_dir, write_json, write_text
from hybrid_gpt.infer.bench import BenchConfig, run_bench
from hybrid_gpt.infer.costs import predicted_speedup
from hybrid_gpt.infer.entries import entry_name
from hybrid_gpt.model.gpt import GPT
from hybrid_gpt.options import (
    spec_of,
)
from hybrid_gpt.present.numbers import pct, sci
from hybrid_gpt.present.plots import save_plot
from hybrid_gpt.runtime import resolve_device
from hybrid_gpt.stats import format_ratio, judge_interval
from hybrid_gpt.train.evaluate import bpb_difference, check_budget, evaluate_lm

KINDS = ("drop", "distil", "drop+heal", "distil+heal")  # an arm's treatment, in the tables' order
# Below this accuracy of the full model, a passkey length tests nothing: an arm cannot lose what is not there.
PASSKEY_FLOOR = 0.5
# What a retrofit output directory may hold: anything else means it is not ours to replace.
RETROFIT_FILES = ("retrofit.json", "retrofit.md", "retrofit-*.png", *nested("arms/*", CHECKPOINT_FILES))
FULL = "full"


@dataclass
class Arm:
    """One model of the study: ``layers`` (0-based blocks) of the full model replaced by ``kind``."""

    choice: str | None
    k: int
    kind: str  # FULL or one of KINDS
    layers: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return FULL if self.kind == FULL else f"{self.choice}-k{self.k}-{self.kind.replace('+', '-')}"

    @property
    def letter(self) -> str:
        return "M" if self.kind.startswith("distil") else "N"

    @property
    def healed(self) -> bool:
        return self.kind.endswith("+heal")

    @property
    def shape(self) -> str:
        """The speed measurement this arm's pattern shares (speed depends on the counts, not the positions)."""
        return FULL if self.kind == FULL else f"k{self.k}-{self.letter}"

    def pattern(self, teacher: str) -> str:
        return "".join(self.letter if i in self.layers else c for i, c in enumerate(teacher))


def choose_layers(choice: str, k: int, attention: list[int], similarity: list[float | None]) -> list[int]:
    """The k attention blocks (0-based, sorted) of ``choice``: the deepest, or the least important, i.e. those
    whose output turns the residual stream least (highest cosine; ties go to the earlier layer)."""
    if choice == "deepest":
        return sorted(attention[len(attention) - k:]) if k else []
    ranked = sorted(attention, key=lambda i: -similarity[i])  # stable: ties keep layer order
    return sorted(ranked[:k])


def plan_arms(cfg: RetrofitConfig, attention: list[int], similarity: list[float | None]) -> list[Arm]:
    """The full model, then per k (ascending), choice and treatment, one arm each."""
    kinds = [t for t in ("drop", "distil") if t in cfg.treatments]
    if "heal" in cfg.treatments:
        kinds += [f"{t}+heal" for t in ("drop", "distil") if t in cfg.treatments]
    arms = [Arm(None, 0, FULL)]
    for k in sorted(k for k in cfg.ks if k > 0):
        for choice in cfg.choices:
            layers = choose_layers(choice, k, attention, similarity)
            arms += [Arm(choice, k, kind, layers) for kind in KINDS if kind in kinds]
    return arms


# -- measurements ---------------------------------------------------------------------------------------------

def window_bpb(model: GPT, tokens, byte_lengths, max_tokens: int, context: int) -> dict:
    """Bits per byte over the windows of ``context`` tokens that tile ``tokens`` from its start (``max_tokens``
    targets at most), with every window's bits and bytes (evaluate_lm's ``per_window``), which pair window by
    window with another model's (:func:`bpb_difference`)."""
    n = min(max_tokens, len(tokens) - 1) // context
    if n < 1:
        raise HybridGPTError(f"the held-out split has {len(tokens):,} tokens: not one window of {context:,}")
    return {**evaluate_lm(model, tokens, byte_lengths, n * context, context=context, per_window=True), "windows": n}


@dataclass
class Probes:
    """What every arm is scored on, built once: the agreement reference, the passkey trials, the questions."""

    reference: object
    trials: dict[int, list]
    tokenizer: object
    template: object
    answer_tokens: int


def score(model: GPT, teacher: Teacher, cfg: RetrofitConfig, probes: Probes, answers: bool, log) -> dict:
    """Every quality figure of one model."""
    t0 = time.time()
    byte_lengths = teacher.tokenizer.token_byte_lengths()
    out = {"eval": window_bpb(model, teacher.data.val, byte_lengths, cfg.eval_tokens, cfg.eval_context)}
    out["agreement"] = probes.reference.compare(model)
    out["passkey"] = []
    for c, trials in probes.trials.items():
        r = passkey.score_passkey(model, trials)
        out["passkey"].append({"context": c, **{k: r[k] for k in ("accuracy", "correct", "n")},
                               "answers": r["answers"]})
    if answers:
        out["answers"] = passkey.greedy_answers(model, probes.tokenizer, probes.template,
                                                questions=passkey.QUESTIONS, max_new_tokens=probes.answer_tokens)
    out["score_s"] = time.time() - t0
    keys = ", ".join(f"{p['correct']}/{p['n']} at {p['context']:,}" for p in out["passkey"])
    log(f"  bpb {out['eval']['bpb']:.4f}, top-1 agreement {out['agreement']['top1_agreement']:.3f}, KL "
        f"{out['agreement']['kl']:.4f}; passkey {keys} ({out['score_s']:.0f} s)")
    return out


def _students(model: GPT, layers: list[int]) -> dict[int, dict]:
    """The trained blocks' norm and mixer tensors, copied (so the union model can be freed)."""
    return {i: {part: {k: v.detach().clone() for k, v in getattr(model.transformer.h[i], part).state_dict().items()}
                for part in ("ln_1", "mixer")} for i in layers}


def build_arm(teacher: GPT, arm: Arm, students: dict[int, dict], mlp_hidden: int, seed: int) -> GPT:
    """The arm before any healing: the teacher's tensors bit for bit, and in its M blocks the shared students'."""
    model = transplant(teacher, arm.pattern(teacher.config.layers), mlp_hidden, seed)
    if arm.letter == "M":
        for i in arm.layers:
            for part, state in students[i].items():
                getattr(model.transformer.h[i], part).load_state_dict(state)
    return model.eval()


def speed_shapes(teacher_layers: str, arms: list[Arm], attention: list[int]) -> dict[str, str]:
    """{shape name: pattern}: the full model, and per k and letter the deepest layout of that shape."""
    shapes = {FULL: teacher_layers}
    for arm in arms:
        if arm.kind != FULL and arm.shape not in shapes:
            deep = Arm("deepest", arm.k, arm.kind, choose_layers("deepest", arm.k, attention, []))
            shapes[arm.shape] = deep.pattern(teacher_layers)
    return shapes


def measure_speed(teacher: GPT, shapes: dict[str, str], cfg: RetrofitConfig, mlp_hidden: int, log) -> dict:
    """bench's estimator on one model per shape (the teacher's weights, untrained M mixers), every ratio against
    the full model with its interval, beside the cost model's prediction on the hardware bench measured."""
    models = {name: teacher if name == FULL else transplant(teacher, p, mlp_hidden, cfg.seed)
              for name, p in shapes.items()}
    bench_cfg = BenchConfig(contexts=list(cfg.speed_contexts), new_tokens=cfg.decode_tokens,
                            batch_sizes=list(cfg.batch_sizes), repeats=cfg.speed_repeats, warmup=1, naive=False,
                            prefill=True, peer=False, seed=cfg.seed, dtypes=list(cfg.dtypes))
    t0 = time.time()
    bench = run_bench(models, bench_cfg, log=log)
    hw = bench["hardware"]
    out = {}
    for name, pattern in shapes.items():
        rows = []
        for dtype in cfg.dtypes:
            entry = bench["models"][entry_name(name, dtype)]
            ratios = bench["ratios"].get(f"{entry_name(name, dtype)}/{entry_name(FULL, dtype)}")
            for i, r in enumerate(entry["rows"]):
                row = {"dtype": dtype, "context": r["context"], "batch": r["batch"],
                       "kv_cache_bytes": r["kv_cache_bytes"], "prefill_ms": r["prefill_ms"]["median"],
                       "decode_tok_s": r["decode_tok_s"]["median"]}
                if ratios is None:  # the full model against itself
                    row |= {"decode": {"ratio": 1.0, "ci95": None}, "prefill": {"ratio": 1.0, "ci95": None}}
                else:
                    q = ratios[i]
                    row["decode"] = {"ratio": q.get("decode_speedup"), "ci95": q.get("decode_speedup_ci95")}
                    row["prefill"] = {"ratio": q.get("prefill_speedup"), "ci95": q.get("prefill_speedup_ci95")}
                for kind in ("decode", "prefill"):
                    row[f"predicted_{kind}"] = predicted_speedup(
                        models[FULL].config, models[name].config, context=r["context"], batch=r["batch"],
                        dtype=dtype, hardware=hw, phase=kind)
                rows.append(row)
        out[name] = {"layers": pattern, "attention_layers": pattern.count("A"),
                     "kv_bytes_per_token": models[name].config.kv_bytes_per_token(), "rows": rows}
    del models
    return {"shapes": out, "weights": "the full model's own weights, with untrained M mixers where the pattern has "
                                      "M: a step costs what the shape makes it cost, whatever the weights learned",
            "layout": "each shape is measured in its deepest layout; the importance choice's arms of the same k and "
                      "treatment share its figures",
            "environment": bench["environment"], "hardware": hw, "config": bench["config"],
            "elapsed_s": time.time() - t0}


def decode_ratio(result: dict, shape: str, context: int) -> dict | None:
    """The shape's cached decode speedup over the full model at ``context``, batch 1 (else the smallest batch),
    in the first precision measured."""
    rows = [r for r in result["speed"]["shapes"][shape]["rows"]
            if r["context"] == context and r["dtype"] == result["settings"]["dtypes"][0]]
    if not rows:
        return None
    row = min(rows, key=lambda r: r["batch"])
    return row["decode"] | {"predicted": row["predicted_decode"], "batch": row["batch"]}


# -- the study ------------------------------------------------------------------------------------------------

def command_line(checkpoint: str | Path, cfg: RetrofitConfig) -> str:
    """The `hybrid-gpt retrofit` command that runs ``cfg``: the flags whose values differ from the mode's."""
    base = RetrofitConfig(quick=cfg.quick).resolved()
    parts = ["hybrid-gpt retrofit", str(checkpoint)] + ["--quick"] * cfg.quick
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "quick" or value == getattr(base, f.name):
            continue
        flag = (spec_of(f).flags or (f"--{f.name.replace('_', '-')}",))[0]
        if isinstance(value, bool):
            parts.append(flag)
        else:
            shown = ",".join(map(str, value)) if isinstance(value, list) else f"{value:g}" if isinstance(
                value, float) else str(value)
            parts += [flag, shown]
    return " ".join(parts)


def default_out_dir(checkpoint: Path, quick: bool) -> Path:
    return checkpoint.parent / ("retrofit-quick" if quick else "retrofit")


def run_retrofit(checkpoint: str | Path, config: RetrofitConfig | None = None, *, log=print, progress: bool = True,
                 **options) -> dict:
    """The whole study on ``checkpoint``; writes retrofit.json, retrofit.md, retrofit-*.png and (save_arms) each
    arm's checkpoint under arms/<name>/ into the output directory, which is swapped in whole at the end.
    Returns what retrofit.json holds. ``options``: RetrofitConfig's fields, for a caller without a config."""
    if config is None:
        config = RetrofitConfig(**options)
    elif options:
        raise TypeError("run_retrofit takes a RetrofitConfig or its fields as keywords, not both")
    t_start = time.time()
    cfg = config.resolved()
    root, _ = resolve(checkpoint)
    model_config, _ = read_config(root)
    cfg.check(model_config.layers, model_config.block_size)  # before anything is loaded
    out = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(root, cfg.quick)
    if out.resolve() == root.resolve() or root.resolve() in out.resolve().parents:
        raise HybridGPTError(f"the output directory {out} is inside the checkpoint {root}; choose another")
    check_replaceable(out, RETROFIT_FILES, "retrofit output")
    chat_file = Path(cfg.chat_dir or root.parent / "chat") / "sft_val.jsonl"
    if not chat_file.is_file():
        raise HybridGPTError(f"no held-out chat transcripts at {chat_file}: run `hybrid-gpt prepare-chat` for this "
                             "run, or pass --chat-data with a directory it wrote")

    # Everything that can fail on the inputs is built now, before the model loads and minutes of work start:
    # the data (of the model's tokenizer), the budgets against it, the passkey prompts and the chat sequences.
    data = open_checkpoint_data(root, cfg.data_dir)
    for name, split, window in (("eval_tokens", data.val, cfg.eval_context),
                                ("similarity_tokens", data.train, cfg.eval_context),
                                ("mse_tokens", data.val, cfg.tokens_per_row)):
        check_budget(name, getattr(cfg, name), len(split), window)
    inputs = probe_inputs(cfg, data, load_sft(chat_file))

    dev = resolve_device(cfg.device)
    with output_dir(out, allowed=RETROFIT_FILES, what="retrofit output", overwrite=cfg.overwrite) as tmp:
        model, tokenizer, training = load_checkpoint(root, dev)
        teacher = Teacher(model, tokenizer, training, root, data)
        result = _retrofit(cfg, teacher, inputs, chat_file, tmp, out, log, progress)
        result["elapsed_s"] = time.time() - t_start
        result["command"] = command_line(checkpoint, cfg)
        write_json(tmp / "retrofit.json", result)
        write_text(tmp / "retrofit.md", render_retrofit_markdown(result))
    log(f"wrote {out}/retrofit.md, retrofit.json and the plots in {result['elapsed_s']:.0f} s")
    return result


def shared_distillation(cfg: RetrofitConfig, teacher: Teacher, union: list[int], mlp_hidden: int, log,
                        progress: bool) -> tuple[dict[int, dict], dict | None]:
    """Distil every block of ``union`` (0-based) once, together (one teacher forward per step serves them all;
    each student trains on its own MSE alone): the students' tensors by block, and the run's record."""
    if not union:
        return {}, None
    t0 = time.time()
    full = teacher.model
    student = transplant(full, "".join("M" if i in union else c for i, c in enumerate(full.config.layers)),
                         mlp_hidden, cfg.seed)
    rows = distill_layers(full, student, union, teacher.data, steps=cfg.distil_steps, lr=cfg.distil_lr,
                          batch_size=cfg.rows, seed=cfg.seed, mse_tokens=cfg.mse_tokens, first_step=teacher.steps,
                          context=cfg.tokens_per_row, log=log, progress=progress)
    students = _students(student, union)
    return students, {
        "blocks": [i + 1 for i in union], "steps": cfg.distil_steps, "rows": cfg.rows,
        "tokens_per_row": cfg.tokens_per_row, "tokens": cfg.distil_steps * cfg.rows * cfg.tokens_per_row,
        "teacher_forwards": cfg.distil_steps, "teacher_forward_blocks": max(union) + 1,
        "teacher_forward_params": sum(p.numel() for p in full.transformer.h[: max(union) + 1].parameters()),
        "lr": cfg.distil_lr, "mlp_hidden": student.config.m_hidden,
        "layers": [{k: v for k, v in r.items() if k != "index"} for r in rows], "elapsed_s": time.time() - t0}


def probe_inputs(cfg: RetrofitConfig, data: TokenData, conversations: list) -> tuple[list, dict[int, list]]:
    """(the held-out chat sequences of the agreement, the passkey trials per context), built from the data's
    tokenizer alone: a prompt that cannot be built (a passkey context that leaves no room for the filler) is a
    one-line error before any work."""
    template = data.tokenizer.chat_template()
    sequences = passkey.chat_sequences(data.tokenizer, template, conversations, max_tokens=cfg.agreement_tokens,
                                       block_size=cfg.eval_context)
    trials = {c: passkey.passkey_trials(data.tokenizer, data.val, context=c, trials=cfg.passkey_trials,
                                        seed=cfg.seed, template=template) for c in cfg.passkey_contexts}
    return sequences, trials


def _retrofit(cfg: RetrofitConfig, teacher: Teacher, inputs: tuple, chat_file: Path, tmp: Path, out: Path,
              log, progress: bool) -> dict:
    from tqdm.auto import tqdm

    full = teacher.model
    template = teacher.tokenizer.chat_template()
    attention = attention_layers(full)
    mlp_hidden = cfg.mlp_hidden or 0
    timings = {}

    t0 = time.time()
    similarity = attention_stats(full, teacher.data.train, cfg.similarity_tokens, context=cfg.eval_context)[0]
    timings["similarity_s"] = time.time() - t0
    arms = plan_arms(cfg, attention, similarity)
    log(f"retrofit: {teacher.path} ({len(attention)} attention layers), {len(arms)} arms")

    union = sorted({i for a in arms if a.letter == "M" and a.kind != FULL for i in a.layers})
    students, distillation = shared_distillation(cfg, teacher, union, mlp_hidden, log, progress)
    first_heal = teacher.steps + (cfg.distil_steps if union else 0)  # healing continues the data stream
    timings["distillation_s"] = distillation["elapsed_s"] if distillation else 0.0

    t0 = time.time()
    sequences, trials = inputs
    probes = Probes(passkey.Reference(full, sequences), trials, teacher.tokenizer, template, cfg.answer_tokens)
    timings["probes_s"] = time.time() - t0

    info = {"stage": "retrofit", "teacher": str(teacher.path.resolve()),
            "data_dir": str(Path(teacher.data.root).resolve()),
            "data_tokenizer_sha256": teacher.data.meta["tokenizer_sha256"], "seed": cfg.seed}
    results: dict[str, dict] = {}
    done: dict[tuple, str] = {}  # (kind, layers) -> the arm that already measured it
    bar = tqdm(total=len(arms), desc="arms", unit="arm", disable=not progress, dynamic_ncols=True)
    scores_full = None
    for arm in arms:
        key = (arm.kind, tuple(arm.layers))
        row = {"name": arm.name, "choice": arm.choice, "k": arm.k, "kind": arm.kind,
               "replaced": [i + 1 for i in arm.layers], "layers": arm.pattern(full.config.layers),
               "shape": arm.shape}
        if key in done:  # the other choice picked the same layers: the same model, measured once
            results[arm.name] = dict(results[done[key]], **row, same_as=done[key])
            bar.update(1)
            continue
        log(f"arm {arm.name}: {arm.kind}, blocks {row['replaced'] or 'none'}")
        t0 = time.time()
        heal_curve = None
        if arm.kind == FULL:
            model = full
        else:
            model = build_arm(full, arm, students, mlp_hidden, cfg.seed)
            if arm.healed:
                heal_curve = finetune(model, teacher.data, steps=cfg.heal_steps, lr=cfg.heal_lr, batch_size=cfg.rows,
                                      seed=cfg.seed, first_step=first_heal, desc=f"heal {arm.name}",
                                      progress=progress, teacher=full, context=cfg.tokens_per_row)
        build_s = time.time() - t0
        scores = score(model, teacher, cfg, probes, arm.kind == FULL or arm.k in cfg.answering, log)
        if arm.kind == FULL:
            scores_full = scores
        row |= {"parameters": model.num_params(), "kv_bytes_per_token": model.config.kv_bytes_per_token(),
                "bpb": scores["eval"]["bpb"], "loss": scores["eval"]["loss"], "eval": scores["eval"],
                "agreement": scores["agreement"], "passkey": scores["passkey"], "build_s": build_s,
                "score_s": scores["score_s"], "compute": _compute(arm, cfg, model, full, distillation, len(union))}
        if heal_curve is not None:
            row["heal_loss"] = heal_curve
        if "answers" in scores:
            row["answers"] = scores["answers"]
        row["delta_bpb"] = bpb_difference(scores["eval"], scores_full["eval"])
        if cfg.save_arms and arm.kind != FULL:
            save_checkpoint(tmp / "arms" / arm.name, model, teacher.tokenizer,
                            dict(info, arm=arm.name, kind=arm.kind, replaced_blocks=row["replaced"],
                                 compute=row["compute"], last_eval={"val_loss": row["loss"], "val_bpb": row["bpb"]}))
            row["checkpoint"] = str(out / "arms" / arm.name)
        results[arm.name] = row
        done[key] = arm.name
        if model is not full:
            del model
            gc.collect()
        bar.update(1)
    bar.close()

    t0 = time.time()
    shapes = speed_shapes(full.config.layers, arms, attention)
    log(f"speed: {len(shapes)} pattern shapes, contexts {','.join(map(str, cfg.speed_contexts))}")
    speed = measure_speed(full, shapes, cfg, mlp_hidden, log)
    timings["speed_s"] = time.time() - t0

    settings = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("out_dir", "overwrite")}
    settings |= {"mode": cfg.mode, "answer_ks": cfg.answering, "data_dir": str(teacher.data.root),
                 "chat_file": str(chat_file),
                 "chat_dir": str(chat_file.parent), "device": str(next(full.parameters()).device),
                 "threads": torch.get_num_threads(), "mlp_hidden": replace(full.config, mlp_hidden=mlp_hidden).m_hidden,
                 "teacher_steps": teacher.steps,
                 "data_note": "distillation and healing batches are random windows of the training split; healing "
                              "continues the stream after the distillation's steps, the same batches for every "
                              "healed arm",
                 "optimizer": "the shared training loop's AdamW (betas 0.9, 0.95), no weight decay, warmup then "
                              "cosine decay to a tenth; healing clips gradients at 1"}
    result = {
        "checkpoint": str(teacher.path), "teacher_layers": full.config.layers, "attention_layers": len(attention),
        "out_dir": str(out), "settings": settings,
        "similarity": [{"block": i + 1, "similarity": similarity[i]} for i in attention],
        "choices": {c: {str(k): [i + 1 for i in choose_layers(c, k, attention, similarity)] for k in cfg.ks if k}
                    for c in cfg.choices},
        "distillation": distillation, "arms": results, "speed": speed,
        "passkey": _passkey_summary(results, cfg), "answers": _answers(results, passkey.QUESTIONS),
        "timings": timings,
    }
    for row in results.values():
        row["speed"] = [{"context": c, **(decode_ratio(result, row["shape"], c) or {})} for c in cfg.speed_contexts]
    result["verdict"] = verdict(result)
    result["plots"] = {str(c): plot_pareto(result, c, tmp / f"retrofit-pareto-{c}.png") for c in cfg.speed_contexts}
    return result


def _compute(arm: Arm, cfg: RetrofitConfig, model: GPT, full: GPT, distillation: dict | None, union: int) -> dict:
    """Steps, tokens, teacher forwards and approximate FLOPs beyond the pretrained model (not counted)."""
    phases = []
    per_step = cfg.rows * cfg.tokens_per_row
    if arm.letter == "M" and arm.kind != FULL:
        share = len(arm.layers) / union
        own = sum(p.numel() for i in arm.layers for part in ("ln_1", "mixer")
                  for p in getattr(model.transformer.h[i], part).parameters())
        p = phase("distillation (shared)", distillation["steps"], per_step,
                   share * 2 * distillation["teacher_forward_params"] + 6 * own)
        phases.append(p | {"teacher_forwards": distillation["steps"], "share": share,
                           "note": f"{len(arm.layers)} of the {union} layers distilled together"})
    if arm.healed:
        p = phase("heal (KL to the teacher)", cfg.heal_steps, per_step, 6 * model.num_params() + 2 * full.num_params())
        phases.append(p | {"teacher_forwards": cfg.heal_steps})
    total = total_compute(phases) if phases else {"phases": [], "steps": 0, "tokens": 0, "approx_flops": 0}
    total["teacher_forwards"] = sum(p["teacher_forwards"] for p in phases)
    return total


def _passkey_summary(arms: dict, cfg: RetrofitConfig) -> dict:
    """Per context: the full model's accuracy, whether the length tests anything, every arm's accuracy."""
    out = []
    for i, c in enumerate(cfg.passkey_contexts):
        base = arms[FULL]["passkey"][i]["accuracy"]
        out.append({"context": c, "full_accuracy": base, "tests_something": base >= PASSKEY_FLOOR,
                    "accuracy": {name: a["passkey"][i]["accuracy"] for name, a in arms.items()}})
    return {"floor": PASSKEY_FLOOR, "trials": cfg.passkey_trials, "contexts": out}


def _answers(arms: dict, questions) -> dict:
    return {"questions": list(questions),
            "by_arm": {name: a["answers"] for name, a in arms.items() if "answers" in a}}


# -- the answer -----------------------------------------------------------------------------------------------

def verdict(result: dict) -> dict:
    """Per choice and treatment, each k's quality state (the per-window interval of the bpb difference against
    the tolerance), the largest k where it holds, and the decode speed that k's pattern buys at each context;
    then the overall largest k."""
    arms = result["arms"]
    tol = QUALITY_TOLERANCE * arms[FULL]["bpb"]
    for a in arms.values():
        a["quality"] = None if a["kind"] == FULL else judge_interval(a["delta_bpb"]["ci95"], tol, False)
    groups = []
    for choice in result["settings"]["choices"]:
        for kind in KINDS:
            members = sorted((a for a in arms.values() if a["choice"] == choice and a["kind"] == kind),
                             key=lambda a: a["k"])
            if not members:
                continue
            holding = [a for a in members if a["quality"] is True]
            best = holding[-1] if holding else None
            open_ = [a for a in members if a["quality"] is None]
            group = {"choice": choice, "kind": kind,
                     "states": [{"k": a["k"], "arm": a["name"], "delta_bpb": a["delta_bpb"]["mean"],
                                 "ci95": a["delta_bpb"]["ci95"], "quality": STATES[a["quality"]]} for a in members],
                     "largest_k": best["k"] if best else None, "arm": best["name"] if best else None,
                     "largest_k_undecided": open_[-1]["k"] if open_ else None}
            if best:
                group["speed"] = [dict(s, speed=STATES[judge_interval(s.get("ci95"), SPEED_GAIN, True)])
                                  for s in best["speed"]]
            group["text"] = _group_sentence(group, result)
            groups.append(group)
    top = max((g["largest_k"] for g in groups if g["largest_k"] is not None), default=None)
    winners = [g for g in groups if top is not None and g["largest_k"] == top]
    if not groups:
        answer = "no k above 0 was measured: there is nothing to judge"
    elif top is None:
        answer = ("no arm keeps its quality cost within the tolerance at any k measured"
                  + (" (some cannot be told at this noise)" if any(g["largest_k_undecided"] for g in groups) else ""))
    else:
        answer = (f"the largest k whose quality cost stays within the tolerance is {top} of "
                  f"{result['attention_layers']} attention layers, by " + "; ".join(
                      f"{g['choice']} {g['kind']} (decode speedup {_speed_text(g['speed']) or 'not measured'})"
                      for g in winners))
    return {"tolerance_bpb": tol, "quality_tolerance": QUALITY_TOLERANCE, "speed_gain": SPEED_GAIN,
            "rule": f"quality holds when the whole 95% interval (t over the "
                    f"{_count(arms[FULL]['eval']['windows'], 'held-out window')}, paired by window) of arm - full "
                    f"bits per byte lies at or below {100 * QUALITY_TOLERANCE:.0f}% of the full model's ({tol:.4f}); "
                    "it does not hold when the whole "
                    "interval lies above; between, it cannot be told. A large speed gain: the decode speedup's "
                    f"interval (paired repeats) above {SPEED_GAIN:.2f}x.",
            "groups": groups, "largest_k": top, "answer": answer}


def _speed_text(speed: list[dict]) -> str:
    return ", ".join(f"{format_ratio(s)} at {s['context']:,}" for s in speed if s.get("ratio") is not None)


def _group_sentence(g: dict, result: dict) -> str:
    head = f"{g['choice']}, {g['kind']}: "
    if g["largest_k"] is None:
        states = ", ".join(f"k = {s['k']} {s['quality']}" for s in g["states"])
        return head + f"quality holds at no k measured ({states})"
    text = head + f"quality holds up to k = {g['largest_k']}"
    undecided = g["largest_k_undecided"]
    if undecided is not None and undecided > g["largest_k"]:
        text += f" (k = {undecided} cannot be told)"
    return text + "; its decode speed against the full model: " + (_speed_text(g["speed"]) or "not measured")


# -- plots and report ----------------------------------------------------------------------------------------

MARKERS = {FULL: "*", "drop": "v", "distil": "o", "drop+heal": "^", "distil+heal": "s"}


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
        tol = result["verdict"]["tolerance_bpb"]
        left.axhline(result["arms"][FULL]["bpb"] + tol, color="gray", ls=":", lw=1,
                     label=f"full + {100 * QUALITY_TOLERANCE:.0f}% tolerance")
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


def _treatments(s: dict) -> str:
    """The treatments of a study's settings, in words."""
    parts = {"drop": "drop (N blocks)",
             "distil": f"distil (M blocks, hidden width {s['mlp_hidden']}, trained together for {s['distil_steps']} "
                       f"steps of {s['rows']} x {s['tokens_per_row']} tokens, lr {s['distil_lr']:g})",
             "heal": f"heal (each of those arms again after {s['heal_steps']} steps of KL to the full model's logits, "
                     f"{s['rows']} x {s['tokens_per_row']} tokens a step, lr {s['heal_lr']:g}; the same batches for "
                     "every healed arm)"}
    return ", ".join(parts[t] for t in TREATMENTS if t in s["treatments"])


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}{'s' * (n != 1)}"


def _delta(d: dict) -> str:
    text = f"{d['mean']:+.4f}"
    return text + (f" [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" if d.get("ci95") else "")


def render_retrofit_markdown(result: dict) -> str:
    """retrofit.md, from retrofit.json's contents alone."""
    s, arms, v = result["settings"], result["arms"], result["verdict"]
    full = arms[FULL]
    ev = full["eval"]
    lines = [f"## Retrofit: {Path(result['checkpoint']).name} ({result['attention_layers']} attention layers)", "",
             f"Checkpoint `{result['checkpoint']}`, {s['mode']} study: `{result['command']}`, "
             f"{result['elapsed_s'] / 60:.1f} min on {s['device']} with {s['threads']} "
             f"thread{'s' * (s['threads'] != 1)}. For k in {', '.join(map(str, s['ks']))} attention layers, chosen as "
             + " and as ".join({"deepest": "the k deepest", "importance": "the k least important by residual "
                                "similarity on the training split"}[c] for c in s["choices"])
             + ": " + _treatments(s) + ".", "",
             "### Verdict", "", f"**{v['answer'][0].upper()}{v['answer'][1:]}.** {v['rule']}", ""]
    lines += [f"- {g['text']}" for g in v["groups"]]
    lines += ["", "### Every arm", "",
              f"Bits per byte over {ev['tokens']:,} held-out play tokens ({_count(ev['windows'], 'window')} of "
              f"{s['eval_context']:,}); Δ = arm - full, mean of the per-window differences [95% t-interval over the "
              f"windows]. Agreement and KL(full || arm) in nats per token on "
              f"{full['agreement']['tokens']:,} tokens of held-out chat transcripts. Passkey: accuracy over "
              f"{_count(s['passkey_trials'], 'trial')}. Decode: the pattern's cached decode speedup over the full "
              f"model, batch 1, {s['dtypes'][0]}. Compute beyond the pretrained model: training tokens and teacher "
              "forwards.", ""]
    head = ["arm", "k", "blocks", "bpb", "Δ bpb [95% CI]", "quality", "top-1 agr.", "KL"]
    head += [f"passkey {c:,}" for c in s["passkey_contexts"]] + [f"decode {c:,}" for c in s["speed_contexts"]]
    head += ["tokens", "teacher fwd"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, a in arms.items():
        cells = [name + (f" (= {a['same_as']})" if a.get("same_as") else ""), str(a["k"]),
                 ", ".join(map(str, a["replaced"])) or "-", f"{a['bpb']:.4f}",
                 "-" if a["kind"] == FULL else _delta(a["delta_bpb"]),
                 "reference" if a["kind"] == FULL else STATES[a["quality"]],
                 f"{a['agreement']['top1_agreement']:.3f}", f"{a['agreement']['kl']:.4f}"]
        cells += [pct(p["accuracy"]) for p in a["passkey"]]
        cells += [format_ratio(x) for x in a["speed"]]
        cells += [f"{a['compute']['tokens']:,}", f"{a['compute']['teacher_forwards']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *[f"![quality against speed at context {c}]({p})" for c, p in result["plots"].items()], ""]

    pk = result["passkey"]
    lines += ["### Passkey retrieval", "",
              "A random 5-digit key stated once in held-out play text, asked for at the end; "
              f"{_count(pk['trials'], 'trial')} per length, greedy, exact match. A length where the full model "
              f"scores below {pct(pk['floor'])} "
              "tests nothing: an arm cannot lose what the model does not have.", ""]
    for c in pk["contexts"]:
        if not c["tests_something"]:
            lines.append(f"- At {c['context']:,} tokens the full model gets {pct(c['full_accuracy'])}: this length "
                         "tests nothing.")
    lines += ["", "| arm | " + " | ".join(f"{c['context']:,}" for c in pk["contexts"]) + " |",
              "|" + " --- |" * (len(pk["contexts"]) + 1)]
    for name in arms:
        lines.append(f"| {name} | " + " | ".join(pct(c["accuracy"][name]) for c in pk["contexts"]) + " |")

    ans = result["answers"]
    lines += ["", "### Greedy answers", "", "For people to read, not a metric: the full model and the arms at k = "
              + " and ".join(map(str, s["answer_ks"])) + ".", ""]
    for q, question in enumerate(ans["questions"]):
        lines += [f"**{question}**", ""]
        for name, answers in ans["by_arm"].items():
            text = " ".join(answers[q].split())
            lines.append(f"- *{name}*: {text or '(empty)'}")
        lines.append("")

    sp = result["speed"]
    lines += ["### Speed", "",
              f"infer/bench.py's estimator ({sp['config']['repeats']} interleaved repeats after a warm-up, "
              f"{sp['config']['new_tokens']} cached greedy steps from a primed cache; prefill: one forward over the "
              f"context), on {sp['environment']['device']}. Weights: {sp['weights']}; {sp['layout']}. Ratios are "
              "paired per repeat against the full model [95% interval]; predicted: the cost model's roofline "
              "(infer/costs.py) on the memory bandwidth and matmul rate measured in the same run.", "",
              "| shape | attention layers | dtype | context | batch | KV cache MB | prefill ms | prefill speedup | "
              "predicted | decode tok/s | decode speedup | predicted |", "|" + " --- |" * 12]
    for name, shape in sp["shapes"].items():
        for r in shape["rows"]:
            lines.append(f"| {name} | {shape['attention_layers']} | {r['dtype']} | {r['context']:,} | {r['batch']} | "
                         f"{r['kv_cache_bytes'] / 2**20:.1f} | {r['prefill_ms']:.1f} | {format_ratio(r['prefill'])} | "
                         f"{r['predicted_prefill']:.2f}x | {r['decode_tok_s']:.1f} | {format_ratio(r['decode'])} | "
                         f"{r['predicted_decode']:.2f}x |")

    lines += ["", "### Compute", ""]
    d = result["distillation"]
    if d:
        lines += [f"Shared distillation: blocks {', '.join(map(str, d['blocks']))} (1-based) trained together for "
                  f"{d['steps']} steps of {d['rows']} x {d['tokens_per_row']} tokens ({d['tokens']:,} tokens), one "
                  f"teacher forward per step through its first {d['teacher_forward_blocks']} blocks serving every "
                  "layer; each layer's student trains on its own MSE alone, so each distil arm holds bit-identical "
                  "copies of its layers' students and is charged its share of the teacher forwards.", "",
                  "| block | MSE of predicting zero | MSE before | MSE after | variance explained after |",
                  "| --- | --- | --- | --- | --- |"]
        for r in d["layers"]:
            lines.append(f"| {r['block']} | {r['mse_zero']:.4g} | {r['mse_before']:.4g} | {r['mse_after']:.4g} | "
                         f"{pct(r['fve_after'])} |")
        lines.append("")
    lines += ["| arm | phases | steps | tokens | teacher forwards | approx. FLOPs |", "|" + " --- |" * 6]
    for name, a in arms.items():
        c = a["compute"]
        phases = "; ".join(p["phase"] + (f" ({pct(p['share'])} share)" if "share" in p else "")
                           for p in c["phases"]) or "none"
        lines.append(f"| {name} | {phases} | {c['steps']:,} | {c['tokens']:,} | {c['teacher_forwards']:,} | "
                     f"{sci(c['approx_flops'])} |")

    lines += ["", "### Layer choices", "",
              "Residual similarity (cosine before/after the attention sub-layer; high = least important) over "
              f"{s['similarity_tokens']:,} tokens of the training split:", "",
              "| block | similarity |", "| --- | --- |"]
    lines += [f"| {r['block']} | {r['similarity']:.4f} |" for r in result["similarity"]]
    lines += ["", *[f"- {c}, k = {k}: blocks {', '.join(map(str, b))}" for c, ks in result["choices"].items()
                    for k, b in ks.items()], ""]
    t = result["timings"]
    lines += ["### Time", "", f"Whole study {result['elapsed_s'] / 60:.1f} min: similarity {t['similarity_s']:.0f} s, "
              f"distillation {t['distillation_s']:.0f} s, probes {t['probes_s']:.0f} s, arms "
              f"{sum(a.get('build_s', 0) + a.get('score_s', 0) for a in arms.values() if not a.get('same_as')):.0f} s, "
              f"speed {t['speed_s']:.0f} s.", ""]
    saved = [a["checkpoint"] for a in arms.values() if a.get("checkpoint") and not a.get("same_as")]
    if saved:
        lines += [f"Each arm's checkpoint is under `{result['out_dir']}/arms/`; talk to one with "
                  f"`hybrid-gpt chat {saved[0]}`.", ""]
    return "\n".join(lines)
