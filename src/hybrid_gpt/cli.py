"""The `hybrid-gpt` command: thin argparse subcommands over the library.

Bad input raises HybridGPTError in the library; here it becomes one line on stderr and exit 2
(RunFailure: exit 1). Run it under torchrun for DDP: `torchrun --nproc_per_node 2 -m hybrid_gpt.cli pretrain`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.presets import PRESETS, default_preset

PROG = "hybrid-gpt"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, and a pointer to --help
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _checked(convert, ok, requirement: str):
    """An argparse type: ``convert`` the text, then require ``ok(value)`` or say ``requirement``."""
    expected = "a whole number" if convert is int else "a number"

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{requirement}, got {text}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "must be at least 1")
_nonneg_int = _checked(int, lambda v: v >= 0, "must not be negative")
_positive_float = _checked(float, lambda v: 0 < v < float("inf"), "must be a positive number")  # NaN fails too
_fraction = _checked(float, lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive whole numbers, got {text!r}")
    return values


def _dtype_list(text: str) -> list[str]:
    from hybrid_gpt.infer.bench import DTYPES

    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in DTYPES]
    if bad or not values:
        raise argparse.ArgumentTypeError(
            f"unknown precision {','.join(bad) or repr(text)}; choose from {', '.join(DTYPES)}")
    return list(dict.fromkeys(values))


def _str_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return values


def _bench_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument("--contexts", type=_int_list, help="context lengths, e.g. 64,128 (default: up to the model's)")
    g.add_argument("--batch-sizes", type=_int_list, default=[1, 8, 32], help="default: 1,8,32")
    g.add_argument("--new-tokens", type=_positive_int, default=24, help="tokens decoded per measurement")
    g.add_argument("--repeats", type=_positive_int, default=5, help="timed repeats (medians are reported)")
    g.add_argument("--warmup", type=_nonneg_int, default=1)
    g.add_argument("--no-naive", action="store_true", help="skip decoding without the KV cache")
    g.add_argument("--no-peer", action="store_true", help="skip the transformers GPT-2 peer")
    g.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--dtypes", type=_dtype_list, default=["float32"],
                   help="weight/KV precisions to measure side by side, e.g. float32,bfloat16 (default: float32); "
                        "bench also reports each one's bits per byte")


def _bench_config(args):
    import torch

    from hybrid_gpt.infer.bench import BenchConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    return BenchConfig(contexts=args.contexts, new_tokens=args.new_tokens, batch_sizes=args.batch_sizes,
                       repeats=args.repeats, warmup=args.warmup, naive=not args.no_naive, peer=not args.no_peer,
                       dtypes=args.dtypes, compile=getattr(args, "compile", False))


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="model and training sizes (default: seed with a GPU, cpu without)")
    g.add_argument("--run-dir", default=None, help="where data and checkpoints live (default: runs/<preset>)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: 1337)")


def _model_type_flags(g) -> None:
    g.add_argument("--model-type", "--model_type", dest="model_type", choices=["standard", "hybrid"],
                   help="standard: attention in every block; hybrid: attention in the first half, "
                        "per-token MLP in the second half")
    g.add_argument("--layers", help="any layer pattern, one letter per block: A attention, M per-token MLP, "
                                    "N no mixer (e.g. AAMM)")


def _model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (overrides the preset)")
    _model_type_flags(g)
    g.add_argument("--n-layer", type=_positive_int)
    g.add_argument("--n-head", type=_positive_int)
    g.add_argument("--n-embd", type=_positive_int)
    g.add_argument("--block-size", type=_positive_int, help="context length")
    g.add_argument("--mlp-hidden", type=_positive_int, help="hidden size of M mixers (default: n_embd / 4)")
    g.add_argument("--dropout", type=_fraction)
    g.add_argument("--vocab-size", type=_positive_int, help="must match the prepared tokenizer")


def _train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (overrides the preset)")
    g.add_argument("--max-steps", type=_positive_int)
    g.add_argument("--batch-size", type=_positive_int, help="rows per forward pass")
    g.add_argument("--grad-accum", type=_positive_int, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=_positive_float, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=_fraction)
    g.add_argument("--warmup-steps", type=_nonneg_int)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--grad-clip", type=float)
    g.add_argument("--eval-interval", type=_positive_int)
    g.add_argument("--eval-tokens", type=_positive_int, help="validation tokens per periodic evaluation")
    g.add_argument("--save-interval", type=_nonneg_int, help="steps between checkpoints (0: at each evaluation)")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    g.add_argument("--skip-nonfinite", action="store_true", default=None,
                   help="skip (and count) a batch whose loss or gradient is not finite, instead of stopping")
    g.add_argument("--stop-after-steps", dest="stop_after", type=_positive_int, default=None,
                   help=argparse.SUPPRESS)  # simulate an interruption (tests of --resume)
    g2 = p.add_argument_group("checkpoint")
    g2.add_argument("--out", "--output_path", dest="out",
                    help="checkpoint directory (default: <run-dir>/<stage>-<model-type>)")
    g2.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    g2.add_argument("--overwrite", action="store_true", help="start over, replacing an existing checkpoint")
    return g2


def _finetune_flags(p: argparse.ArgumentParser, stage: str, previous: str) -> None:
    g = p.add_argument_group("model")
    _model_type_flags(g)
    g.add_argument("--init", help=f"checkpoint to start from (default: <run-dir>/{previous}-<model-type>)")
    g2 = _train_flags(p)
    g2.add_argument(f"--{stage}-data", dest="stage_data", metavar="FILE.jsonl",
                    help="your own training data (default: <run-dir>/chat from `prepare-chat`)")
    g2.add_argument(f"--{stage}-val-data", dest="stage_val_data", metavar="FILE.jsonl",
                    help=f"validation data (default: the last 5%% of --{stage}-data)")
    g2.add_argument("--chat-data", help="directory written by `prepare-chat` (default: <run-dir>/chat)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Test the Static Function Hypothesis: GPTs whose deep attention "
                                           "is replaced by a tiny per-token MLP.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("prepare", help="corpus -> tokenizer -> token files (offline)")
    _common(p)
    p.add_argument("--corpus", help="a .txt file or a folder of .txt files (default: the embedded Shakespeare)")
    p.add_argument("--vocab-size", type=_positive_int, help="BPE vocabulary size (default: the preset's)")
    p.add_argument("--out", help="data directory (default: <run-dir>/data)")
    p.add_argument("--force", action="store_true", help="rebuild even if the data directory is complete")

    p = sub.add_parser("pretrain", help="pretrain a model on the prepared token files")
    _common(p)
    _model_flags(p)
    _train_flags(p).add_argument("--data", help="prepared data directory (default: <run-dir>/data)")

    p = sub.add_parser("prepare-chat", help="SFT conversations and DPO preference pairs from the plays (offline)")
    _common(p)
    p.add_argument("--out", help="chat data directory (default: <run-dir>/chat)")
    p.add_argument("--force", action="store_true", help="rebuild even if the directory is complete")

    p = sub.add_parser("sft", help="supervised fine-tuning on assistant turns")
    _common(p)
    _finetune_flags(p, "sft", "pretrain")

    p = sub.add_parser("dpo", help="Direct Preference Optimization against the frozen SFT model")
    _common(p)
    _finetune_flags(p, "dpo", "sft")
    p.add_argument("--beta", type=_positive_float, default=0.1, help="DPO temperature (default: 0.1)")

    p = sub.add_parser("eval", help="validation loss, perplexity and bits per byte of a checkpoint")
    _common(p)
    p.add_argument("checkpoint")
    p.add_argument("--data", help="prepared data directory (default: the one the checkpoint was trained on)")
    p.add_argument("--eval-tokens", type=_positive_int, default=None,
                   help="validation tokens to score (default: 131072, or the whole split if shorter)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("sample", help="generate text from a checkpoint")
    _common(p)
    p.add_argument("checkpoint")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    p.add_argument("--top-k", type=_nonneg_int, default=50, help="0 to disable")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--num-samples", type=_positive_int, default=1)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every token")

    p = sub.add_parser("bench", help="prefill, cached and naive decode, memory, and a transformers peer, side by side")
    _common(p)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT")
    _bench_flags(p)
    p.add_argument("--train", action="store_true", help="also measure training throughput (ours and the peer)")
    p.add_argument("--train-batch", type=_positive_int, default=16, help="rows per training step (default: 16)")
    p.add_argument("--compile", action="store_true",
                   help="also measure every model torch.compile'd (dynamic shapes) as '<name>+compile'")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--out", help="also write the JSON results to this file")

    p = sub.add_parser("pipeline", help="prepare -> pretrain -> SFT -> DPO -> eval -> bench -> report, both models")
    _common(p)
    p.add_argument("--seeds", type=_int_list, default=None, help="comma-separated seeds (default: 1337)")
    _bench_flags(p)
    p.add_argument("--progress", action="store_true", help="show a progress bar for each training stage")
    p.add_argument("--full", action="store_true",
                   help="also test the hypothesis: ablate --quick, importance, distill AAMM, probe, and the verdict")

    p = sub.add_parser("ablate", help="train layer patterns under one budget over seeds: bpb +- CI vs decode speed")
    _common(p)
    p.add_argument("--patterns", type=_str_list, default=None,
                   help="comma-separated variants: PATTERN, PATTERN:H (M hidden width) or PATTERN:matched "
                        "(default: AAAA,AAMM,AANN,MMAA,AA,AAMM:matched)")
    p.add_argument("--budget", choices=["steps", "time"], default="steps",
                   help="equal optimizer steps, or equal wall-clock time (cheaper patterns get more steps)")
    p.add_argument("--seeds", type=_int_list, default=[1, 2, 3], help="comma-separated seeds (default: 1,2,3)")
    p.add_argument("--steps", type=_positive_int, help="steps per run (default: the preset's; --quick: fewer)")
    p.add_argument("--quick", action="store_true", help="a short budget (150 steps on cpu) into <run-dir>/ablate-quick")
    p.add_argument("--out", help="output directory (default: <run-dir>/ablate or <run-dir>/ablate-quick)")
    p.add_argument("--progress", action="store_true", help="show a progress bar for each run")

    p = sub.add_parser("importance", help="per attention layer: residual similarity and loss when dropped/replaced")
    _common(p)
    p.add_argument("checkpoint")
    p.add_argument("--max-tokens", type=_positive_int, default=None, help="validation tokens (default: 131072)")
    p.add_argument("--replace", type=_positive_int, default=None,
                   help="attention layers the recommended pattern replaces (default: half of them)")
    p.add_argument("--data", help="prepared data directory (default: the one the checkpoint was trained on)")
    p.add_argument("--out", help="output directory (default: <run-dir>/importance/<checkpoint name>)")

    p = sub.add_parser("probe", help="token-mixing probe (associative recall) per pattern, and loss by position")
    _common(p)
    p.add_argument("--patterns", type=_str_list, default=None, help="default: AAAA,AAMM,AANN,MMAA,AA")
    p.add_argument("--seeds", type=_int_list, default=[1, 2, 3], help="comma-separated seeds (default: 1,2,3)")
    p.add_argument("--steps", type=_positive_int, help="training steps per pattern (default: the preset's)")
    p.add_argument("--task", choices=["recall", "two-hop"], help="probe task (default: the preset's)")
    p.add_argument("--checkpoints", nargs="*", metavar="CKPT",
                   help="models for the loss-by-position curves (default: <run-dir>/pretrain-{standard,hybrid})")
    p.add_argument("--out", help="output directory (default: <run-dir>/probe)")
    p.add_argument("--progress", action="store_true", help="show a progress bar per pattern")

    p = sub.add_parser("distill", help="distill a trained model's deep attention into per-token MLPs, then compare")
    _common(p)
    p.add_argument("checkpoint", help="the trained standard model (the teacher)")
    p.add_argument("--layers", required=True, help="target pattern, e.g. AAMM (A->M distilled, A->N dropped)")
    p.add_argument("--steps", type=_positive_int, help="distillation steps per layer (default: the preset's)")
    p.add_argument("--finetune-steps", type=_nonneg_int, help="whole-model fine-tune steps after the swap (0: none)")
    p.add_argument("--lr", type=_positive_float, help="distillation learning rate (default: the preset's)")
    p.add_argument("--finetune-lr", type=_positive_float, help="fine-tune learning rate (default: the preset's)")
    p.add_argument("--batch-size", type=_positive_int, help="rows per step (default: the preset's)")
    p.add_argument("--mlp-hidden", type=_positive_int, help="hidden width of the M blocks (default: n_embd / 4)")
    p.add_argument("--eval-tokens", type=_positive_int, help="validation tokens for bits per byte (default: 131072)")
    p.add_argument("--data", help="prepared data directory (default: the one the checkpoint was trained on)")
    p.add_argument("--out", help="output directory (default: <run-dir>/distill-<layers>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    p = sub.add_parser("verdict", help="'Does the hypothesis hold?': one table and sentences from the analyses")
    _common(p)

    p = sub.add_parser("chat", help="chat with an aligned checkpoint (interactive, streaming)")
    _common(p)
    p.add_argument("checkpoint")
    p.add_argument("-p", "--prompt", help="one message, one reply, then exit")
    p.add_argument("--system", help="a system message to start the conversation")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    p.add_argument("--top-k", type=_nonneg_int, default=50, help="0 to disable")
    p.add_argument("--top-p", type=float, default=None)
    return parser


def _run_dir(args) -> tuple[str, Path]:
    preset = args.preset or default_preset()
    return preset, Path(args.run_dir) if args.run_dir else Path("runs") / preset


def cmd_prepare(args) -> int:
    from hybrid_gpt.data.corpus import load_shakespeare, load_user_corpus
    from hybrid_gpt.data.tokens import is_prepared, prepare_data
    from hybrid_gpt.presets import get_preset

    preset, run_dir = _run_dir(args)
    out = Path(args.out) if args.out else run_dir / "data"
    vocab = args.vocab_size or get_preset(preset)["vocab_size"]
    corpus = load_user_corpus(args.corpus) if args.corpus else load_shakespeare()
    if not args.force and is_prepared(out, corpus, vocab):
        print(f"{out} is already prepared for this corpus and vocabulary; nothing to do (--force rebuilds)")
        return 0
    print(f"preparing {corpus.source} -> {out}")
    prepare_data(corpus, out, vocab)
    print(f"wrote {out}/tokenizer.json, train.bin, val.bin, meta.json")
    return 0


def cmd_pretrain(args) -> int:
    from hybrid_gpt.train.pretrain import MODEL_KEYS, TRAIN_KEYS, run_pretrain

    preset, run_dir = _run_dir(args)
    keys = set(MODEL_KEYS) | set(TRAIN_KEYS) | {"vocab_size"}
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    result = run_pretrain(run_dir=run_dir, preset=preset, model_type=args.model_type, layers=args.layers,
                          out=args.out, data_dir=args.data, overrides=overrides, device=args.device,
                          resume=args.resume, overwrite=args.overwrite)
    return _report(result)


def cmd_eval(args) -> int:
    from hybrid_gpt.checkpoint import checkpoint_data, load_checkpoint
    from hybrid_gpt.runtime import resolve_device
    from hybrid_gpt.train.evaluate import EVAL_TOKENS, evaluate_lm

    device = resolve_device(args.device)
    model, tok, training = load_checkpoint(args.checkpoint, device)
    ckpt = Path(args.checkpoint)
    data = checkpoint_data(ckpt if ckpt.is_dir() else ckpt.parent, tok, training, args.data)
    res = evaluate_lm(model, data.val, tok.token_byte_lengths(), args.eval_tokens or EVAL_TOKENS)
    res = {"checkpoint": str(ckpt), "layers": model.config.layers, "parameters": model.num_params(), **res}
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{ckpt} ({model.config.layers}, {model.num_params():,} parameters)")
        print(f"  val loss    {res['loss']:.4f} nats/token")
        print(f"  perplexity  {res['perplexity']:.2f}")
        print(f"  bits/byte   {res['bpb']:.4f}")
        print(f"  over {res['tokens']:,} tokens ({res['bytes']:,} bytes) of {data.meta['source']} validation text")
    return 0


def _check_sampling(args) -> None:
    if args.temperature < 0:
        raise HybridGPTError(f"--temperature must not be negative, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise HybridGPTError(f"--top-p must be in (0, 1], got {args.top_p}")


def cmd_sample(args) -> int:
    import torch

    from hybrid_gpt.checkpoint import load_checkpoint
    from hybrid_gpt.infer.engine import generate
    from hybrid_gpt.runtime import resolve_device

    _check_sampling(args)
    device = resolve_device(args.device)
    model, tok, _ = load_checkpoint(args.checkpoint, device)
    ids = [tok.bos_id] + tok.encode(args.prompt)
    block = model.config.block_size
    if len(ids) > block - 1:
        print(f"note: the prompt has {len(ids)} tokens; keeping its last {block - 1} to fit the context of {block}",
              file=sys.stderr)
        ids = ids[-(block - 1):]
    seed = args.seed if args.seed is not None else 1337
    for i in range(args.num_samples):
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        stream = generate(model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                          top_p=args.top_p, seed=seed + i, use_cache=not args.no_cache)
        for piece in tok.decode_stream(nxt[0, 0] for nxt in stream):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def cmd_prepare_chat(args) -> int:
    from hybrid_gpt.data.chat_data import prepare_chat_data
    from hybrid_gpt.data.corpus import load_shakespeare
    from hybrid_gpt.fsutil import read_json

    _, run_dir = _run_dir(args)
    out = Path(args.out) if args.out else run_dir / "chat"
    corpus = load_shakespeare()
    seed = args.seed if args.seed is not None else 1337
    if (out / "meta.json").is_file() and not args.force:
        meta = read_json(out / "meta.json", "chat data meta file")
        if meta.get("corpus_sha256") == corpus.sha256() and meta.get("seed") == seed:
            print(f"{out} is already prepared; nothing to do (--force rebuilds)")
            return 0
        raise HybridGPTError(f"{out} holds chat data built differently; pass --force to replace it")
    print(f"building chat data from {corpus.source} -> {out}")
    prepare_chat_data(corpus, out, seed=seed)
    return 0


def _finetune_overrides(args) -> dict:
    from hybrid_gpt.train.stage import TRAIN_KEYS

    return {k: getattr(args, k) for k in TRAIN_KEYS if getattr(args, k, None) is not None}


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


def cmd_sft(args) -> int:
    from hybrid_gpt.train.sft import run_sft

    preset, run_dir = _run_dir(args)
    return _report(run_sft(run_dir=run_dir, preset=preset, model_type=args.model_type, layers=args.layers,
                           init=args.init, out=args.out, sft_data=args.stage_data, sft_val_data=args.stage_val_data,
                           chat_dir=args.chat_data, overrides=_finetune_overrides(args), device=args.device,
                           resume=args.resume, overwrite=args.overwrite))


def cmd_dpo(args) -> int:
    from hybrid_gpt.train.dpo import run_dpo

    preset, run_dir = _run_dir(args)
    return _report(run_dpo(run_dir=run_dir, preset=preset, model_type=args.model_type, layers=args.layers,
                           init=args.init, out=args.out, dpo_data=args.stage_data, dpo_val_data=args.stage_val_data,
                           chat_dir=args.chat_data, beta=args.beta, overrides=_finetune_overrides(args),
                           device=args.device, resume=args.resume, overwrite=args.overwrite))


def cmd_chat(args) -> int:
    from hybrid_gpt.checkpoint import load_checkpoint
    from hybrid_gpt.infer.chat import MAX_INPUT_CHARS, ChatSession, clean_input
    from hybrid_gpt.runtime import resolve_device

    _check_sampling(args)
    model, tok, training = load_checkpoint(args.checkpoint, resolve_device(args.device))
    session = ChatSession(model, tok, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k or None, top_p=args.top_p, seed=args.seed,
                          system=clean_input(args.system) if args.system else None)

    def answer(text: str) -> None:
        if len(text) > MAX_INPUT_CHARS:
            print(f"(message of {len(text):,} characters refused: the limit is {MAX_INPUT_CHARS:,})",
                  file=sys.stderr)
            return
        try:
            for piece in session.reply(text):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            print("\n(reply interrupted; it is not kept in the history)", file=sys.stderr)
            return
        st = session.last
        notes = []
        if st.cropped_turns:
            notes.append(f"{st.cropped_turns} oldest turns dropped to fit the context of {model.config.block_size}")
        if st.cut_tokens:
            notes.append(f"the oldest {st.cut_tokens} tokens of your message dropped to fit the context")
        print()
        print(f"[{st.tokens} tokens, {st.tokens_per_sec:.1f} tokens/s" + "".join(f"; {n}" for n in notes) + "]",
              file=sys.stderr)

    if args.prompt is not None:
        text = clean_input(args.prompt)
        if not text:
            raise HybridGPTError("the --prompt message is empty")
        answer(text)
        return 0
    stage = training.get("stage", "?")
    print(f"chatting with {args.checkpoint} ({model.config.layers}, {stage}). "
          "/reset clears the history, /quit or Ctrl-D exits.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        text = clean_input(line)
        if not text:
            print("(empty message: type something, /reset or /quit)", file=sys.stderr)
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        sys.stdout.write("bot> ")
        answer(text)


def _validation_tokens(ckpt: Path, tokenizer, training: dict, log):
    """(validation tokens, bytes per token) of a checkpoint's prepared data, for the precision cost; None if absent."""
    from hybrid_gpt.checkpoint import checkpoint_data

    try:
        data = checkpoint_data(ckpt if ckpt.is_dir() else ckpt.parent, tokenizer, training)
    except HybridGPTError as e:
        log(f"quality: skipped ({e})")
        return None
    return data.val, tokenizer.token_byte_lengths()


def cmd_bench(args) -> int:
    from hybrid_gpt.checkpoint import load_checkpoint
    from hybrid_gpt.fsutil import write_json
    from hybrid_gpt.infer.bench import format_table, format_train_table, run_bench, run_train_bench
    from hybrid_gpt.runtime import resolve_device

    device = resolve_device(args.device)
    models, val = {}, None
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    for path in args.checkpoints:
        model, tokenizer, training = load_checkpoint(path, device)
        name = training.get("model_type") or Path(path).name
        if name in models:
            name = Path(path).name
        models[name] = model
        if val is None and args.dtypes != ["float32"]:
            val = _validation_tokens(Path(path), tokenizer, training, log)
    cfg = _bench_config(args)
    results = run_bench(models, cfg, log=log, val=val)
    if args.train:
        results["train"] = run_train_bench(models, batch_size=args.train_batch, repeats=cfg.repeats,
                                           warmup=cfg.warmup, peer=cfg.peer, log=log)
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
    from hybrid_gpt.presets import DEFAULT_SEED
    from hybrid_gpt.report import headline_table

    preset, run_dir = _run_dir(args)
    seeds = args.seeds or [args.seed if args.seed is not None else DEFAULT_SEED]
    if len(set(seeds)) != len(seeds):
        raise HybridGPTError(f"--seeds {','.join(map(str, seeds))} repeats a seed")
    opts = PipelineOptions(run_dir=run_dir, preset=preset, seeds=seeds, device=args.device,
                           bench=_bench_config(args), progress=args.progress,
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
    from hybrid_gpt.analysis.ablate import DEFAULT_VARIANTS, run_ablate

    preset, run_dir = _run_dir(args)
    if len(set(args.seeds)) != len(args.seeds):
        raise HybridGPTError(f"--seeds {','.join(map(str, args.seeds))} repeats a seed")
    result = run_ablate(run_dir=run_dir, preset=preset, patterns=args.patterns or DEFAULT_VARIANTS,
                        budget=args.budget, seeds=args.seeds, steps=args.steps, quick=args.quick, out_dir=args.out,
                        device=args.device, progress=args.progress)
    print()
    for s in result["sentences"]:
        print(f"- {s}")
    print(f"\nresults: {Path(result['out_dir']) / 'ablate.md'}")
    return 0


def cmd_importance(args) -> int:
    from hybrid_gpt.analysis.importance import run_importance
    from hybrid_gpt.runtime import resolve_device
    from hybrid_gpt.train.evaluate import EVAL_TOKENS

    result = run_importance(args.checkpoint, out_dir=args.out, max_tokens=args.max_tokens or EVAL_TOKENS,
                            replace=args.replace, data_dir=args.data, device=str(resolve_device(args.device)))
    rec = result["recommendation"]
    print(f"recommended pattern: {rec['pattern']} (replaces attention layers {rec['replace']}, 1-based)")
    print(f"results: {Path(result['out_dir']) / 'importance.md'}")
    return 0


def cmd_probe(args) -> int:
    from hybrid_gpt.analysis.probe import DEFAULT_PATTERNS, run_probe

    preset, run_dir = _run_dir(args)
    result = run_probe(run_dir=run_dir, out_dir=args.out, patterns=args.patterns or DEFAULT_PATTERNS, preset=preset,
                       seeds=args.seeds, steps=args.steps, task=args.task, checkpoints=args.checkpoints or None,
                       device=args.device, progress=args.progress)
    for r in result["patterns"]:
        print(f"{r['pattern']:<8} accuracy {r['accuracy']['mean']:.3f} (chance {result['chance']:.3f})")
    print(f"results: {Path(args.out or run_dir / 'probe') / 'probe.md'}")
    return 0


def cmd_distill(args) -> int:
    from hybrid_gpt.analysis.distill import DistillConfig, quality_sentences, run_distill

    options = dict(layers=args.layers, out_dir=args.out, steps=args.steps, finetune_steps=args.finetune_steps,
                   lr=args.lr, finetune_lr=args.finetune_lr, batch_size=args.batch_size, mlp_hidden=args.mlp_hidden,
                   eval_tokens=args.eval_tokens, data_dir=args.data, seed=args.seed, device=args.device,
                   overwrite=args.overwrite)
    result = run_distill(args.checkpoint, DistillConfig(**{k: v for k, v in options.items() if v is not None}),
                         progress=args.progress)
    print(quality_sentences(result))
    print(f"results: {Path(result['out_dir']) / 'distill.md'}")
    return 0


def cmd_verdict(args) -> int:
    from hybrid_gpt.analysis.verdict import write_verdict

    _, run_dir = _run_dir(args)
    result = write_verdict(run_dir)
    for line in result["sentences"]:
        print(f"- {line}")
    print(f"results: {run_dir / 'hypothesis.md'}")
    return 0


COMMANDS = {"prepare": cmd_prepare, "pretrain": cmd_pretrain, "eval": cmd_eval, "sample": cmd_sample,
            "prepare-chat": cmd_prepare_chat, "sft": cmd_sft, "dpo": cmd_dpo, "chat": cmd_chat,
            "bench": cmd_bench, "pipeline": cmd_pipeline, "ablate": cmd_ablate, "importance": cmd_importance,
            "probe": cmd_probe, "distill": cmd_distill, "verdict": cmd_verdict}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except HybridGPTError as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
