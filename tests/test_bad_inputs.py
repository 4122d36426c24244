"""The bad-input catalogue: the CLI driven as a user would, with one bad input per case, across
every command. Each must exit 2 (bad input; 1 is for runs that fail after starting), print one line
on stderr naming the problem and the fix, show no traceback, and leave existing files untouched."""

import shutil

import pytest
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
    "unknown device": lambda t, r: (["eval", r / "pretrain-hybrid", "--device", "tpu"], "unknown --device"),
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
                                                "tokenizer differs"),
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
}


def run_bad(argv, capsys):
    """Exit status and stderr of one CLI call; argparse's own errors arrive as SystemExit."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_and_exit_2(case, run_dir, tmp_path, capsys):
    argv, expected = BAD_INPUTS[case](tmp_path, run_dir)
    capsys.readouterr()
    before = _snapshot(run_dir)
    code, err = run_bad(argv, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
    assert _snapshot(run_dir) == before  # nothing already written was touched


BAD_FLAGS = [
    (["pretrain", "--preset", "huge"], "invalid choice"),
    (["pretrain", "--max-steps", "0"], "at least 1"),
    (["pretrain", "--batch-size", "-4"], "at least 1"),
    (["pretrain", "--n-embd", "-8"], "at least 1"),
    (["pretrain", "--lr", "nan"], "positive number"),
    (["pretrain", "--dropout", "1.5"], "must be in [0, 1)"),
    (["pretrain", "--model-type", "giant"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
    (["dpo", "--beta", "-0.1"], "positive number"),
    (["sft", "--sft-data"], "expected one argument"),
    (["pipeline", "--seeds", "1,x"], "comma-separated whole numbers"),
    (["bench"], "the following arguments are required"),
    (["bench", "ckpt", "--dtypes", "float32,float64"], "unknown precision float64"),
]


@pytest.mark.parametrize("argv, expected", BAD_FLAGS)
def test_bad_flags_give_one_line_and_exit_2(argv, expected, capsys):
    code, err = run_bad(argv, capsys)
    assert code == 2 and expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_the_catalogue_is_large():
    assert len(BAD_INPUTS) + len(BAD_FLAGS) >= 40
