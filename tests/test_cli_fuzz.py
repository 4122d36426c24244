"""The CLI driven in-process with random flag values (hypothesis): whatever the values, no traceback, an exit
status in {0, 1, 2, 130}, and no file outside the run's output directory changes.

The flags and their kinds are read from the parser itself, so an option added later is fuzzed too. Each
example is one command with a fast base (tiny steps, few tokens) and one to three random flags; values mix
small valid ones with huge, negative and non-finite numbers, lone surrogates (undecodable bytes), NULs and
empty strings. Derandomized, so the suite is deterministic.
"""

import argparse
import shutil

import pytest
import torch
from helpers import run_bad
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid_gpt.cli import build_parser
from hybrid_gpt.options import KINDS

# Flags that change the process for the rest of the session, or take minutes when valid.
SKIPPED = {"--compile", "--threads", "-h", "--help"}
# Commands that take minutes when their values are valid: fuzzed with one invalid value always among them.
# serve, valid, runs until stopped.
SLOW = {"pipeline", "ablate", "probe", "distill", "retrofit", "dpo", "prepare-chat", "serve"}
# Examples per command: fewer where every valid run measures or analyses for a second.
EXAMPLES = {"bench": 12, "importance": 12} | {cmd: 15 for cmd in SLOW}


def _flags() -> dict[str, list[argparse.Action]]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {cmd: [a for a in p._actions if a.option_strings and not SKIPPED & set(a.option_strings)]
            for cmd, p in sub.choices.items()}


FLAGS = _flags()


@pytest.fixture(scope="module")
def arena(pretrained, tmp_path_factory):
    """(inputs, work): a copy of a pretrained run the commands read, and the directory they run in."""
    from data.chatml import chatml_hf
    from helpers import tiny_chat_files
    from interop.hf_models import VOCAB, tiny_llama, write_gguf

    base = tmp_path_factory.mktemp("cli-fuzz")
    inputs, work = base / "in", base / "work"
    shutil.copytree(pretrained, inputs)
    tiny_chat_files(inputs)
    (inputs / "corpus.txt").write_text("".join(f"WHO {i % 5}:\nline {i} of a small play\n\n" for i in range(200)))
    write_gguf(tiny_llama(), chatml_hf(VOCAB), inputs / "tiny.gguf")
    work.mkdir()
    return inputs, work


def _bases(inputs) -> dict[str, list[str]]:
    """Per command, arguments that make a valid run quick (random flags come after them and win)."""
    ckpt = str(inputs / "pretrain-hybrid")
    train = ["--preset", "smoke", "--run-dir", str(inputs), "--max-steps", "2", "--eval-interval", "2",
             "--eval-tokens", "64", "--no-progress"]
    return {
        "prepare": ["--run-dir", "prep", "--corpus", str(inputs / "corpus.txt"), "--vocab-size", "300"],
        "pretrain": train + ["--out", "pre"],
        "sft": train + ["--init", ckpt, "--sft-data", str(inputs / "sft.jsonl"), "--out", "sft"],
        "eval": [ckpt, "--eval-tokens", "64"],
        "sample": [ckpt, "--max-new-tokens", "3"],
        "chat": [ckpt, "-p", "Who goes there?", "--max-new-tokens", "3"],
        "bench": [ckpt, "--contexts", "16", "--new-tokens", "4", "--repeats", "1", "--warmup", "0",
                  "--batch-sizes", "1", "--no-peer", "--no-naive"],
        "importance": [str(inputs / "pretrain-standard"), "--max-tokens", "64", "--out", "imp"],
        "import": [str(inputs / "tiny.gguf"), "--out", "imp"],
        "export": [str(inputs / "pretrain-hybrid"), "--format", "hf", "--out", "exp"],
        "verdict": ["--run-dir", "verdict"],
        "costs": ["--preset", "smoke", "--contexts", "16", "--bandwidth", "10", "--flops", "10"],
        "pipeline": ["--preset", "smoke"], "ablate": ["--preset", "smoke"], "probe": ["--preset", "smoke"],
        "distill": [ckpt, "--layers", "AM"], "dpo": ["--preset", "smoke"], "prepare-chat": [],
        "retrofit": [str(inputs / "pretrain-standard"), "--quick", "--ks", "0,1", "--out", "retro"],
        "static": [str(inputs / "pretrain-standard"), "--context", "16", "--train-tokens", "4096", "--stop-tokens",
                   "1024", "--eval-tokens", "1024", "--widths", "4", "--short-context", "0", "--max-epochs", "1",
                   "--out", "static"],
        "replace": [str(inputs / "pretrain-standard"), "--ks", "1", "--out", "replace"],  # no map: refused early
        "serve": [ckpt, "--port", "0"],
    }


def _ints(valid):
    return st.one_of(st.sampled_from(valid), st.integers(-2**70, -1), st.integers(2**40, 2**80),
                     st.integers(0, 40)).map(str)


FLOATS = st.one_of(st.sampled_from(["nan", "inf", "-inf", "1e300", "-1", "0", "0.5", "1e-30", "1e-3", "1", ""]),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr))
# Text with lone surrogates (what bytes that are not UTF-8 become), NULs, nothing, or too much of it.
ANY_TEXT = st.one_of(st.text(st.characters(blacklist_categories=()), max_size=40),
                     st.sampled_from(["", " ", "\udcff", "caf\udce9", "\ud800", "a\x00b", "x" * 5000]))
# Output paths stay inside the work directory: relative names without separators or dot-only names.
NAMES = st.text(st.characters(blacklist_characters="/", blacklist_categories=("Cc",)), min_size=1, max_size=20
                ).filter(lambda s: s.strip(".") != "")
OUT_PATHS = st.one_of(st.sampled_from(["", "\udcff", "a\x00b", "out", "sub/dir", "a-file"]), NAMES)


def _value(action: argparse.Action, inputs):
    """A strategy of text for one flag, by the kind its parser checks."""
    kind = getattr(action.type, "__name__", None)
    if action.nargs == 0:
        return st.none()
    if action.choices:
        return st.sampled_from([c for c in action.choices if c not in ("cpu", "seed")] + ["bogus", "", "\udcff"])
    if kind in ("int", "seed"):
        return _ints(["1", "2", "3"])
    if kind == "float":
        return FLOATS
    if kind in ("ints", "seeds"):
        return st.lists(_ints(["1", "2"]), min_size=0, max_size=3).map(",".join)
    if kind == "strs":
        return st.one_of(st.lists(ANY_TEXT, max_size=3).map(",".join), st.sampled_from(["AM", "AA,AM", ","]))
    if kind == "input":
        return st.one_of(st.sampled_from([str(inputs / "data"), str(inputs / "pretrain-standard"),
                                          str(inputs / "sft.jsonl"), str(inputs / "corpus.txt"), "/dev/zero",
                                          "missing"]), OUT_PATHS)
    if kind in ("outdir", "outfile", "output"):
        return OUT_PATHS
    assert kind in KINDS, f"{action.option_strings}: no strategy for {kind}"
    return st.one_of(ANY_TEXT, st.sampled_from(["cpu", "AM"]))


@st.composite
def invocations(draw, inputs, cmd: str):
    argv = [cmd] + _bases(inputs)[cmd]
    for action in draw(st.lists(st.sampled_from(FLAGS[cmd]), min_size=1, max_size=3, unique_by=id)):
        value = draw(_value(action, inputs))
        argv += [action.option_strings[0]] + ([] if value is None else [value])
    if cmd in SLOW:  # keep it a parse error: these run for minutes when valid
        argv += ["--seed", "-1"]
    return argv


def _snapshot(root):
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_cli_with_random_flag_values(command, arena, monkeypatch, capsys):
    inputs, work = arena
    monkeypatch.chdir(work)  # a relative output path lands in the run's own directory
    before = _snapshot(inputs)
    threads = torch.get_num_threads()

    @settings(max_examples=EXAMPLES.get(command, 40), deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large])
    @given(argv=invocations(inputs, command))
    def run(argv):
        try:
            code, err = run_bad(argv, capsys)
        finally:
            torch.set_num_threads(threads)
        assert code in (0, 1, 2, 130), (argv, code, err[-2000:])
        assert "Traceback" not in err, (argv, err[-2000:])
        if code:
            assert err.strip() and len(err.strip().splitlines()[-1]) < 1000, (argv, err[-2000:])
        assert _snapshot(inputs) == before, argv  # nothing read was changed
        assert sorted(p.name for p in work.parent.iterdir()) == ["in", "work"], argv  # nothing written outside

    run()
