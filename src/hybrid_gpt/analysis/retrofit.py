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
import logging
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from hybrid_gpt.analysis import passkey
from hybrid_gpt.analysis.distill import Teacher, distill_layers, finetune, phase, total_compute, transplant
from hybrid_gpt.analysis.importance import attention_layers, attention_stats
from hybrid_gpt.analysis.retrofit_config import RetrofitConfig
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
from hybrid_gpt.fsutil import check_replaceable, nested, output_dir
from hybrid_gpt.infer.bench import BenchConfig, run_bench
from hybrid_gpt.infer.costs import predicted_speedup
from hybrid_gpt.infer.entries import entry_name
from hybrid_gpt.model.gpt import GPT
from hybrid_gpt.options import spec_of
from hybrid_gpt.present.retrofit import FULL, answer_sentence, group_sentence, rule_sentence, write_outputs, write_plots
from hybrid_gpt.runtime import resolve_device
from hybrid_gpt.stats import judge_interval
from hybrid_gpt.train.evaluate import bpb_difference, check_budget, evaluate_lm

logger = logging.getLogger(__name__)

KINDS = ("drop", "distil", "drop+heal", "distil+heal")  # an arm's treatment, in the tables' order
# Below this accuracy of the full model, a passkey length tests nothing: an arm cannot lose what is not there.
PASSKEY_FLOOR = 0.5
# What a retrofit output directory may hold: anything else means it is not ours to replace.
RETROFIT_FILES = ("retrofit.json", "retrofit.md", "retrofit-*.png", *nested("arms/*", CHECKPOINT_FILES))


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


def score(model: GPT, teacher: Teacher, cfg: RetrofitConfig, probes: Probes, answers: bool) -> dict:
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
    logger.info(f"  bpb {out['eval']['bpb']:.4f}, top-1 agreement {out['agreement']['top1_agreement']:.3f}, KL "
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


def measure_speed(teacher: GPT, shapes: dict[str, str], cfg: RetrofitConfig, mlp_hidden: int) -> dict:
    """bench's estimator on one model per shape (the teacher's weights, untrained M mixers), every ratio against
    the full model with its interval, beside the cost model's prediction on the hardware bench measured."""
    models = {name: teacher if name == FULL else transplant(teacher, p, mlp_hidden, cfg.seed)
              for name, p in shapes.items()}
    bench_cfg = BenchConfig(contexts=list(cfg.speed_contexts), new_tokens=cfg.decode_tokens,
                            batch_sizes=list(cfg.batch_sizes), repeats=cfg.speed_repeats, warmup=1, naive=False,
                            prefill=True, peer=False, seed=cfg.seed, dtypes=list(cfg.dtypes))
    t0 = time.time()
    bench = run_bench(models, bench_cfg)
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


def run_retrofit(checkpoint: str | Path, config: RetrofitConfig | None = None, *, progress: bool = True,
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
        result = _retrofit(cfg, teacher, inputs, chat_file, tmp, out, progress)
        result["elapsed_s"] = time.time() - t_start
        result["command"] = command_line(checkpoint, cfg)
        write_outputs(result, tmp)
    logger.info(f"wrote {out}/retrofit.md, retrofit.json and the plots in {result['elapsed_s']:.0f} s")
    return result


def shared_distillation(cfg: RetrofitConfig, teacher: Teacher, union: list[int], mlp_hidden: int,
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
                          context=cfg.tokens_per_row, progress=progress)
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


@dataclass
class Study:
    """What every arm of one study is built, scored and saved from."""

    cfg: RetrofitConfig
    teacher: Teacher
    probes: Probes
    students: dict[int, dict]  # the shared distillation's students by block (0-based)
    distillation: dict | None  # its record
    union: int  # how many layers it distilled together
    first_heal: int  # healing continues the data stream from this step
    tmp: Path
    out: Path
    progress: bool

    @property
    def mlp_hidden(self) -> int:
        return self.cfg.mlp_hidden or 0


def _retrofit(cfg: RetrofitConfig, teacher: Teacher, inputs: tuple, chat_file: Path, tmp: Path, out: Path,
              progress: bool) -> dict:
    """The work of run_retrofit, with the plots and the arms written into ``tmp`` (named by its final place)."""
    full = teacher.model
    attention = attention_layers(full)
    timings = {}
    t0 = time.time()
    similarity = attention_stats(full, teacher.data.train, cfg.similarity_tokens, context=cfg.eval_context)[0]
    timings["similarity_s"] = time.time() - t0
    arms = plan_arms(cfg, attention, similarity)
    logger.info(f"retrofit: {teacher.path} ({len(attention)} attention layers), {len(arms)} arms")
    study = _prepare(cfg, teacher, arms, inputs, timings, (tmp, out), progress)
    results = measure_arms(study, arms)

    t0 = time.time()
    shapes = speed_shapes(full.config.layers, arms, attention)
    logger.info(f"speed: {len(shapes)} pattern shapes, contexts {','.join(map(str, cfg.speed_contexts))}")
    speed = measure_speed(full, shapes, cfg, study.mlp_hidden)
    timings["speed_s"] = time.time() - t0

    result = {
        "checkpoint": str(teacher.path), "teacher_layers": full.config.layers, "attention_layers": len(attention),
        "out_dir": str(out), "settings": _settings(cfg, teacher, chat_file),
        "similarity": [{"block": i + 1, "similarity": similarity[i]} for i in attention],
        "choices": {c: {str(k): [i + 1 for i in choose_layers(c, k, attention, similarity)] for k in cfg.ks if k}
                    for c in cfg.choices},
        "distillation": study.distillation, "arms": results, "speed": speed,
        "passkey": _passkey_summary(results, cfg), "answers": _answers(results, passkey.QUESTIONS),
        "timings": timings,
    }
    for row in results.values():
        row["speed"] = [{"context": c, **(decode_ratio(result, row["shape"], c) or {})} for c in cfg.speed_contexts]
    result["verdict"] = verdict(result)
    result["plots"] = write_plots(result, tmp)
    return result


def _prepare(cfg: RetrofitConfig, teacher: Teacher, arms: list[Arm], inputs: tuple, timings: dict,
             where: tuple[Path, Path], progress: bool) -> Study:
    """The shared distillation of every layer an arm distils, and the probes every arm is scored on."""
    union = sorted({i for a in arms if a.letter == "M" and a.kind != FULL for i in a.layers})
    students, distillation = shared_distillation(cfg, teacher, union, cfg.mlp_hidden or 0, progress)
    timings["distillation_s"] = distillation["elapsed_s"] if distillation else 0.0
    t0 = time.time()
    sequences, trials = inputs
    probes = Probes(passkey.Reference(teacher.model, sequences), trials, teacher.tokenizer,
                    teacher.tokenizer.chat_template(), cfg.answer_tokens)
    timings["probes_s"] = time.time() - t0
    first_heal = teacher.steps + (cfg.distil_steps if union else 0)  # healing continues the data stream
    return Study(cfg, teacher, probes, students, distillation, len(union), first_heal, *where, progress)


def measure_arms(study: Study, arms: list[Arm]) -> dict[str, dict]:
    """Every arm's row of retrofit.json, by name, the full model's first; an arm whose treatment and layers an
    earlier arm already had (the other choice picked the same layers) is that model, measured once."""
    from tqdm.auto import tqdm

    results: dict[str, dict] = {}
    done: dict[tuple, str] = {}  # (kind, layers) -> the arm that already measured it
    bar = tqdm(total=len(arms), desc="arms", unit="arm", disable=not study.progress, dynamic_ncols=True)
    for arm in arms:
        key = (arm.kind, tuple(arm.layers))
        if key in done:
            results[arm.name] = dict(results[done[key]], **_identity(arm, study.teacher.model.config.layers),
                                     same_as=done[key])
        else:
            results[arm.name] = _measure_arm(study, arm, results[FULL]["eval"] if FULL in results else None)
            done[key] = arm.name
        bar.update(1)
    bar.close()
    return results


def _identity(arm: Arm, teacher_layers: str) -> dict:
    """What names an arm in its row: its choice, k, treatment, replaced blocks (1-based) and pattern."""
    return {"name": arm.name, "choice": arm.choice, "k": arm.k, "kind": arm.kind,
            "replaced": [i + 1 for i in arm.layers], "layers": arm.pattern(teacher_layers), "shape": arm.shape}


def _measure_arm(study: Study, arm: Arm, full_eval: dict | None) -> dict:
    """Build (and heal) one arm, score it against the full model's windows (``full_eval``; None: it is the full
    model), and save it when asked to."""
    cfg, full = study.cfg, study.teacher.model
    row = _identity(arm, full.config.layers)
    logger.info(f"arm {arm.name}: {arm.kind}, blocks {row['replaced'] or 'none'}")
    t0 = time.time()
    model, heal_curve = _build(study, arm)
    build_s = time.time() - t0
    scores = score(model, study.teacher, cfg, study.probes, arm.kind == FULL or arm.k in cfg.answering)
    row |= {"parameters": model.num_params(), "kv_bytes_per_token": model.config.kv_bytes_per_token(),
            "bpb": scores["eval"]["bpb"], "loss": scores["eval"]["loss"], "eval": scores["eval"],
            "agreement": scores["agreement"], "passkey": scores["passkey"], "build_s": build_s,
            "score_s": scores["score_s"], "compute": _compute(arm, cfg, model, full, study.distillation, study.union)}
    if heal_curve is not None:
        row["heal_loss"] = heal_curve
    if "answers" in scores:
        row["answers"] = scores["answers"]
    row["delta_bpb"] = bpb_difference(scores["eval"], full_eval or scores["eval"])
    if cfg.save_arms and arm.kind != FULL:
        _save_arm(study, arm, model, row)
    if model is not full:
        del model
        gc.collect()
    return row


def _build(study: Study, arm: Arm) -> tuple[GPT, list[float] | None]:
    """The arm's model (the full model itself for the full arm), healed if its treatment heals, and the healing's
    losses."""
    cfg, full = study.cfg, study.teacher.model
    if arm.kind == FULL:
        return full, None
    model = build_arm(full, arm, study.students, study.mlp_hidden, cfg.seed)
    if not arm.healed:
        return model, None
    curve = finetune(model, study.teacher.data, steps=cfg.heal_steps, lr=cfg.heal_lr, batch_size=cfg.rows,
                     seed=cfg.seed, first_step=study.first_heal, desc=f"heal {arm.name}", progress=study.progress,
                     teacher=full, context=cfg.tokens_per_row)
    return model, curve


def _save_arm(study: Study, arm: Arm, model: GPT, row: dict) -> None:
    """The arm's checkpoint into the output directory's arms/<name>/, with what it is and what it cost."""
    teacher = study.teacher
    info = {"stage": "retrofit", "teacher": str(teacher.path.resolve()),
            "data_dir": str(Path(teacher.data.root).resolve()),
            "data_tokenizer_sha256": teacher.data.meta["tokenizer_sha256"], "seed": study.cfg.seed}
    save_checkpoint(study.tmp / "arms" / arm.name, model, teacher.tokenizer,
                    dict(info, arm=arm.name, kind=arm.kind, replaced_blocks=row["replaced"], compute=row["compute"],
                         last_eval={"val_loss": row["loss"], "val_bpb": row["bpb"]}))
    row["checkpoint"] = str(study.out / "arms" / arm.name)


def _settings(cfg: RetrofitConfig, teacher: Teacher, chat_file: Path) -> dict:
    """retrofit.json's settings: the configuration, resolved, and what the study read and ran on."""
    full = teacher.model
    settings = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("out_dir", "overwrite")}
    mlp_hidden = replace(full.config, mlp_hidden=cfg.mlp_hidden or 0).m_hidden
    return settings | {
        "mode": cfg.mode, "answer_ks": cfg.answering, "data_dir": str(teacher.data.root), "chat_file": str(chat_file),
        "chat_dir": str(chat_file.parent), "device": str(next(full.parameters()).device),
        "threads": torch.get_num_threads(), "mlp_hidden": mlp_hidden, "teacher_steps": teacher.steps,
        "data_note": "distillation and healing batches are random windows of the training split; healing "
                     "continues the stream after the distillation's steps, the same batches for every healed arm",
        "optimizer": "the shared training loop's AdamW (betas 0.9, 0.95), no weight decay, warmup then "
                     "cosine decay to a tenth; healing clips gradients at 1"}


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
    groups = [g for choice in result["settings"]["choices"] for kind in KINDS
              if (g := _group(arms, choice, kind)) is not None]
    top = max((g["largest_k"] for g in groups if g["largest_k"] is not None), default=None)
    return {"tolerance_bpb": tol, "quality_tolerance": QUALITY_TOLERANCE, "speed_gain": SPEED_GAIN,
            "rule": rule_sentence(arms[FULL]["eval"]["windows"], tol, QUALITY_TOLERANCE, SPEED_GAIN),
            "groups": groups, "largest_k": top, "answer": answer_sentence(groups, top, result["attention_layers"])}


def _group(arms: dict, choice: str, kind: str) -> dict | None:
    """One choice and treatment over its ks (None: no arm has both): each k's state, the largest k that holds and
    the largest that cannot be told, and the decode speed of the largest that holds."""
    members = sorted((a for a in arms.values() if a["choice"] == choice and a["kind"] == kind), key=lambda a: a["k"])
    if not members:
        return None
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
    group["text"] = group_sentence(group)
    return group
