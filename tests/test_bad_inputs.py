"""The bad-input catalogue: the CLI driven as a user would, with one bad input per case, across
every command. Each must exit 2 (bad input; 1 is for runs that fail after starting), print one line
on stderr naming the problem and the fix, show no traceback, and leave existing files untouched."""

import argparse
import os
import shutil

import pytest
from helpers import run_bad
from safetensors.torch import load_file, save_file

from hybrid_gpt.cli import main


@pytest.fixture(scope="module")
def run_dir(pretrained, tmp_path_factory):
    """A private copy of a run directory with prepared data and both smoke models pretrained."""
    rd = tmp_path_factory.mktemp("bad-inputs") / "run"
    shutil.copytree(pretrained, rd)
    return rd


def _bad_corpus(tmp_path, content):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    return path


def _text_file(tmp_path, text):
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    return path


def _damaged(tmp_path, run_dir, name, cut=False, text=None):
    """A copy of the hybrid checkpoint with one file damaged."""
    ckpt = tmp_path / "damaged"
    shutil.copytree(run_dir / "pretrain-hybrid", ckpt)
    if cut:
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[: len(data) // 3])
    else:
        (ckpt / name).write_text(text)
    return ckpt


def _swapped_weights(tmp_path, run_dir):
    """The hybrid's config with the standard model's weights."""
    ckpt = tmp_path / "swapped"
    shutil.copytree(run_dir / "pretrain-hybrid", ckpt)
    save_file(load_file(str(run_dir / "pretrain-standard" / "model.safetensors")), str(ckpt / "model.safetensors"))
    return ckpt


def _other_vocab_data(tmp_path):
    corpus = _bad_corpus(tmp_path, "".join(f"A{i % 5}:\nline {i} of it\n\n" for i in range(300)).encode())
    assert main(["prepare", "--corpus", str(corpus), "--run-dir", str(tmp_path / "other"), "--vocab-size", "280"]) == 0
    return tmp_path / "other" / "data"


def _snapshot(root):
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


BAD_INPUTS = {
    "missing corpus": lambda t, r: (["prepare", "--corpus", t / "none.txt", "--run-dir", t], "does not exist"),
    "empty corpus": lambda t, r: (["prepare", "--corpus", _bad_corpus(t, b""), "--run-dir", t], "empty"),
    "non-utf8 corpus": lambda t, r: (["prepare", "--corpus", _bad_corpus(t, b"\xff\xfe caf\xe9"), "--run-dir", t],
                                     "not UTF-8"),
    "pattern letters": lambda t, r: (["pretrain", "--run-dir", r, "--preset", "smoke", "--layers", "AAXM"],
                                     "only A (attention)"),
    "pattern length": lambda t, r: (["pretrain", "--run-dir", r, "--preset", "smoke", "--layers", "AAM",
                                     "--n-layer", "4"], "has 3 letters"),
    "missing checkpoint": lambda t, r: (["eval", t / "nope"], "does not exist"),
    "not a checkpoint": lambda t, r: (["sample", r / "data"], "is not a checkpoint"),
    "model-type and layers": lambda t, r: (["pretrain", "--run-dir", r, "--preset", "smoke", "--model-type",
                                            "hybrid", "--layers", "AM"], "not both"),
    "resume and overwrite": lambda t, r: (["pretrain", "--run-dir", r, "--preset", "smoke", "--resume",
                                           "--overwrite"], "contradict"),
    "vocab mismatch": lambda t, r: (["pretrain", "--run-dir", r, "--preset", "smoke", "--vocab-size", "999",
                                     "--out", t / "x"], "contradicts the prepared data"),
    "existing output": lambda t, r: (["pretrain", "--run-dir", r, "--preset", "smoke", "--model-type", "hybrid"],
                                     "already exists"),
    "nothing to resume": lambda t, r: (["pretrain", "--run-dir", r, "--preset", "smoke", "--resume",
                                        "--out", t / "fresh"], "nothing to resume"),
    "no prepared data": lambda t, r: (["pretrain", "--run-dir", t, "--preset", "smoke"], "hybrid-gpt prepare"),
    "cuda without gpu": lambda t, r: (["eval", r / "pretrain-hybrid", "--device", "cuda"], "no CUDA GPU"),
    "unknown device": lambda t, r: (["eval", r / "pretrain-hybrid", "--device", "tpu"], "unknown device"),
    "heads do not divide": lambda t, r: (["pretrain", "--run-dir", r, "--preset", "smoke", "--n-head", "3",
                                          "--out", t / "y"], "divisible"),
    "bad temperature": lambda t, r: (["sample", r / "pretrain-hybrid", "--temperature", "-1"], "temperature"),
    "sft without chat data": lambda t, r: (["sft", "--run-dir", r, "--preset", "smoke", "--model-type", "hybrid"],
                                           "hybrid-gpt prepare-chat"),
    "malformed sft jsonl": lambda t, r: (["sft", "--run-dir", r, "--preset", "smoke", "--sft-data",
                                          _bad_corpus(t, b'{"messages": [{"role": "user", "content": "hi"}]}\n{oops')],
                                         "corpus.txt:1: the conversation has no assistant turn"),
    "dpo without sft": lambda t, r: (["dpo", "--run-dir", r, "--preset", "smoke", "--model-type", "hybrid"],
                                     "run `hybrid-gpt sft --model-type hybrid` first"),
    "dpo init not a checkpoint": lambda t, r: (["dpo", "--run-dir", r, "--preset", "smoke", "--init", r / "data"],
                                               "is not a checkpoint"),
    "chat top-p": lambda t, r: (["chat", r / "pretrain-hybrid", "--top-p", "1.5"], "--top-p"),
    "chat missing checkpoint": lambda t, r: (["chat", t / "dpo-hybrid"], "does not exist"),
    # more commands, more kinds of damage
    "truncated weights": lambda t, r: (["eval", _damaged(t, r, "model.safetensors", cut=True)],
                                       "corrupt or truncated"),
    "corrupt config": lambda t, r: (["sample", _damaged(t, r, "config.json", text="{oops")], "not valid JSON"),
    "weights of another model": lambda t, r: (["eval", _swapped_weights(t, r)], "do not match its config.json"),
    "data of another vocabulary": lambda t, r: (["eval", r / "pretrain-hybrid", "--data", _other_vocab_data(t)],
                                                "differs from the one the data in"),
    "malformed dpo jsonl": lambda t, r: (["dpo", "--run-dir", r, "--preset", "smoke", "--init", r / "pretrain-hybrid",
                                          "--dpo-data", _text_file(t, '{"prompt": "p", "chosen": "c"}\n')],
                                         ":1: missing rejected"),
    "empty sft jsonl": lambda t, r: (["sft", "--run-dir", r, "--preset", "smoke", "--model-type", "hybrid",
                                      "--sft-data", _text_file(t, "\n\n")], "holds no examples"),
    "val data without data": lambda t, r: (["sft", "--run-dir", r, "--preset", "smoke", "--model-type", "hybrid",
                                            "--sft-val-data", _text_file(t, "{}")], "needs --sft-data too"),
    "bench context too long": lambda t, r: (["bench", r / "pretrain-standard", "--contexts", "64", "--no-peer"],
                                            "exceeds the models' maximum"),
    "bench too few new tokens": lambda t, r: (["bench", r / "pretrain-standard", "--new-tokens", "1"],
                                              "at least 2"),
    "pipeline repeated seed": lambda t, r: (["pipeline", "--run-dir", t, "--preset", "smoke", "--seeds", "3,3"],
                                            "repeats a seed"),
    "chat empty one-shot": lambda t, r: (["chat", r / "pretrain-hybrid", "-p", "\x07  "], "empty"),
    # values each valid alone, invalid together or against the model (checked before anything is allocated)
    "weight decay x lr": lambda t, r: (["pretrain", "--run-dir", r, "--preset", "smoke", "--weight-decay", "1e300",
                                        "--out", t / "wd"], "weight_decay 1e+300 x lr"),
    "rows per step": lambda t, r: (["pretrain", "--run-dir", r, "--preset", "smoke", "--batch-size", "65536",
                                    "--grad-accum", "65536", "--out", t / "rows"], "rows per step; the limit is"),
    "bench new tokens beyond the context": lambda t, r: (["bench", r / "pretrain-hybrid", "--new-tokens", "1000",
                                                          "--no-peer"], "leaves no context to measure"),
    "pipeline new tokens beyond the context": lambda t, r: (["pipeline", "--run-dir", t, "--preset", "smoke",
                                                             "--new-tokens", "32"], "leaves no context to measure"),
    # text: the 1.1M-character message (too long for a real command line, so in-process only)
    "chat one-shot too long": lambda t, r: (["chat", r / "pretrain-hybrid", "-p", "x" * 1_100_000],
                                            "is 1,100,000 characters long; the limit is 1,000,000"),
    # --out onto something that is not a directory, for commands that write one
    "prepare out is a file": lambda t, r: (["prepare", "--run-dir", t, "--out", _bad_corpus(t, b"x")],
                                           "exists and is not a directory"),
    "pretrain out is a file": lambda t, r: (["pretrain", "--run-dir", r, "--preset", "smoke", "--out",
                                             r / "data" / "meta.json"], "exists and is not a directory"),
    "prepare-chat out is a file": lambda t, r: (["prepare-chat", "--out", _bad_corpus(t, b"x")],
                                                "exists and is not a directory"),
    "out below a file": lambda t, r: (["importance", r / "pretrain-standard", "--out",
                                       r / "data" / "meta.json" / "sub"], "is not a directory"),
    "bench out is a directory": lambda t, r: (["bench", r / "pretrain-hybrid", "--no-peer", "--out", t],
                                              "exists and is not a regular file"),
    "run dir is a file": lambda t, r: (["verdict", "--run-dir", r / "data" / "meta.json"],
                                       "exists and is not a directory"),
    "corpus is a device": lambda t, r: (["prepare", "--run-dir", t, "--corpus", "/dev/zero"],
                                        "is not a regular file or a directory"),
    # a loop of symbolic links, as an output below it and as an input
    "out below a link loop": lambda t, r: (["importance", r / "pretrain-standard", "--out", _loop(t) / "x"],
                                           "--out: is or passes through a loop of symbolic links"),
    "data through a link loop": lambda t, r: (["eval", r / "pretrain-hybrid", "--data", _loop(t)],
                                              "--data: is or passes through a loop of symbolic links"),
    # a library message that would echo a huge value is cut to one short line
    "huge bad pattern": lambda t, r: (["pretrain", "--run-dir", r, "--preset", "smoke", "--layers", "X" * 1000,
                                       "--out", t / "p"], "only A (attention)"),
}


def _loop(t):
    os.symlink(t / "b", t / "a")
    os.symlink(t / "a", t / "b")
    return t / "a"


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_and_exit_2(case, run_dir, tmp_path, capsys):
    argv, expected = BAD_INPUTS[case](tmp_path, run_dir)
    capsys.readouterr()
    before = _snapshot(run_dir)
    code, err = run_bad(argv, capsys)
    assert code == 2, err[:2000]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], err[:2000]
    assert "Traceback" not in err and len(err) < 1000  # what it echoes of the input is cut short
    assert _snapshot(run_dir) == before  # nothing already written was touched


BAD_FLAGS = [
    (["pretrain", "--preset", "huge"], "invalid choice"),
    (["pretrain", "--max-steps", "0"], "at least 1"),
    (["pretrain", "--batch-size", "-4"], "at least 1"),
    (["pretrain", "--n-embd", "-8"], "at least 1"),
    (["pretrain", "--lr", "nan"], "finite number"),
    (["pretrain", "--dropout", "1.5"], "must be in [0, 1)"),
    (["pretrain", "--model-type", "giant"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
    (["dpo", "--beta", "-0.1"], "must be in (0, 100]"),
    (["sft", "--sft-data"], "expected one argument"),
    (["pipeline", "--seeds", "1,x"], "comma-separated whole numbers"),
    (["bench"], "give checkpoints to measure, or --shape"),
    (["bench", "ckpt", "--dtypes", "float32,float64"], "'float64', which must be one of float32, bfloat16"),
]


# Every command that takes these flags, with a value out of range: they are checked where options are parsed.
SEEDED = ["prepare", "pretrain", "prepare-chat", "sft", "dpo", "eval", "sample", "bench", "pipeline", "ablate",
          "importance", "probe", "distill", "verdict", "chat"]
BAD_FLAGS += [([cmd, "--seed", seed], "must be in [0, 4294967295]") for cmd in SEEDED
              for seed in ("-1", "18446744073709551616")]
BAD_FLAGS += [([cmd, "ckpt", "--temperature", "nan"], "--temperature: must be a finite number")
              for cmd in ("sample", "chat")]
BAD_FLAGS += [
    (["sample", "ckpt", "--temperature", "1e-30"], "must be 0 (greedy) or at least 0.001"),
    (["pretrain", "--weight-decay", "nan"], "--weight-decay: must be a finite number"),
    (["pretrain", "--weight-decay", "inf"], "--weight-decay: must be a finite number"),
    (["sft", "--grad-clip", "nan"], "--grad-clip: must be a finite number"),
    (["pretrain", "--lr", "inf"], "--lr: must be a finite number"),
    (["dpo", "--beta", "1e300"], "--beta: must be in (0, 100]"),
    (["pretrain", "--grad-accum", "1000000000000"], "--grad-accum: must be at most"),
    (["pretrain", "--batch-size", "100000000"], "--batch-size: must be at most"),
    (["pretrain", "--max-steps", "10000000000000"], "--max-steps: must be at most"),
    (["bench", "ckpt", "--new-tokens", "1000000000000"], "--new-tokens: must be at most"),
    (["sample", "ckpt", "--max-new-tokens", "1000000000000"], "--max-new-tokens: must be at most"),
    (["sample", "ckpt", "--num-samples", "1000000000"], "--num-samples: must be at most"),
    (["pretrain", "--n-embd", "10000000000"], "--n-embd: must be at most"),
    (["bench", "ckpt", "--batch-sizes", "1,100000000"], "--batch-sizes: has 100000000, which must be at most"),
    (["eval", "ckpt", "--eval-tokens", "9" * 5000], "expected a whole number"),  # beyond Python's int limit
    (["sample", "ckpt", "--prompt", "\udcff"], "--prompt: is not valid UTF-8 text"),  # the byte 0xff from a shell
    (["chat", "ckpt", "-p", "\udcff"], "--prompt: is not valid UTF-8 text"),
    (["chat", "ckpt", "-p", "hi \ud800"], "--prompt: is not valid UTF-8 text"),
    (["chat", "ckpt", "--system", "\ud800"], "--system: is not valid UTF-8 text"),
    (["pretrain", "--layers", ""], "--layers: must not be empty"),
    (["distill", "ckpt", "--layers", " "], "--layers: must not be empty"),
    (["prepare", "--corpus", ""], "--corpus: must not be empty"),
    (["pretrain", "--run-dir", ""], "--run-dir: must not be empty"),
    (["pretrain", "--data", ""], "--data: must not be empty"),
    (["sft", "--init", ""], "--init: must not be empty"),
    (["dpo", "--dpo-data", ""], "--dpo-data: must not be empty"),
    (["sft", "--chat-data", ""], "--chat-data: must not be empty"),
    (["eval", ""], "checkpoint: must not be empty"),
    (["bench", "ckpt", "--out", ""], "--out: must not be empty"),
    (["pretrain", "--device", ""], "--device: must not be empty"),
    (["pretrain", "--out", "a\x00b"], "--out/--output_path: contains a NUL character"),
    (["ablate", "--patterns", ","], "expected a comma-separated list"),
    (["pipeline", "--seeds", "1,1"], "repeats a seed"),
    (["pretrain", "--preset", "x" * 100_000], "is 100,000 characters long; the limit is 4,096"),
    (["pretrain", "--preset", "x" * 3000], "invalid choice: 'xxxx"),
    (["eval", "ckpt", "--data", "d" * 5000], "is 5,000 characters long; the limit is 4,096"),
]


@pytest.mark.parametrize("argv, expected", BAD_FLAGS)
def test_bad_flags_give_one_line_and_exit_2(argv, expected, capsys):
    code, err = run_bad(argv, capsys)
    assert code == 2 and expected in err and "Traceback" not in err, err[:2000]
    assert len(err.strip().splitlines()) == 1 and len(err) < 1000


def _flags():
    """(command, name, kind, action) for every option of every command that takes a value."""
    from hybrid_gpt.cli import build_parser
    from hybrid_gpt.options import KINDS

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for cmd, p in sub.choices.items():
        for action in p._actions:
            kind = getattr(action.type, "__name__", None)
            if kind in KINDS:
                yield cmd, (action.option_strings or [action.metavar or action.dest])[0], kind, action


# One bad value of each class for every option of its kind, found by walking the parser: not a list of spellings.
BAD_BY_KIND = {"int": ["-99999999999999999999", "99999999999999999999", "1.5", ""], "seed": ["-1", "2" * 30],
               "float": ["nan", "inf", "-inf", "1e999", ""], "ints": ["", "1,x", "1," + "9" * 30],
               "seeds": ["", "-1", "9" * 30], "strs": ["", ","], "text": ["\udcff"],
               "str": ["", "\ud800"], "input": ["", "\udcff", "a\x00"], "outdir": ["", "\udcff", "a\x00"],
               "outfile": ["", "\udcff", "a\x00"], "output": ["", "\udcff", "a\x00"]}
BY_CLASS = [(cmd, name, value) for cmd, name, kind, _ in _flags() for value in BAD_BY_KIND[kind]]


@pytest.mark.parametrize("command", sorted({cmd for cmd, _, _ in BY_CLASS}))
def test_every_option_refuses_bad_values_of_its_kind(command, capsys):
    wrong = []
    for cmd, name, value in BY_CLASS:
        if cmd == command:
            code, err = run_bad([cmd, name, value] if name.startswith("-") else [cmd, value], capsys)
            if not (code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
                    and f"argument {name}" in err):
                wrong.append(f"{cmd} {name} {value!r}: {code} {err[:300]}")
    assert not wrong, "\n".join(wrong)


def test_every_count_has_an_upper_bound():
    """A typo cannot ask for a trillion of anything: every whole-number option is bounded above."""
    from hybrid_gpt.options import MAX_SEED

    unbounded = []
    for cmd, flag, kind, action in _flags():
        if kind in ("int", "ints"):
            try:
                action.type(str(MAX_SEED * 10**9))
            except argparse.ArgumentTypeError:
                continue
            unbounded.append(f"{cmd} {flag}")
    assert not unbounded, unbounded


def test_the_catalogue_is_large():
    assert len(BAD_INPUTS) + len(BAD_FLAGS) >= 100 and len(BY_CLASS) >= 300
