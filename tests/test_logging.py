"""Messages go through the standard logging module: no library function takes a `log` callback, and every
command's -q/--quiet and -v/--verbose set what the `hybrid_gpt` logger shows (the command's answer is
printed either way)."""

import ast
import logging
import pathlib

import pytest

import hybrid_gpt
from hybrid_gpt.cli import COMMANDS, main

SRC = pathlib.Path(hybrid_gpt.__file__).parent


def test_no_library_function_takes_a_log_parameter():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                a = node.args
                names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x]
                if "log" in names:
                    found.append(f"{path.relative_to(SRC)}:{node.lineno} {getattr(node, 'name', 'lambda')}")
    assert not found, found


def test_the_library_configures_no_handler_but_a_null_one():
    handlers = logging.getLogger("hybrid_gpt").handlers
    assert [type(h) for h in handlers] == [logging.NullHandler]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_takes_quiet_and_verbose_but_not_both(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "-q, --quiet" in text and "-v, --verbose" in text
    with pytest.raises(SystemExit) as e:
        main([command, "--quiet", "--verbose"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def test_prepare_quiet_prints_only_its_answer_and_verbose_adds_debug(tmp_path, capsys):
    base = ["prepare", "--preset", "smoke"]
    out, _ = _run([*base, "--out", tmp_path / "normal"], capsys)
    lines = out.splitlines()
    assert lines[0].startswith("preparing ") and any(line.startswith("train: ") for line in lines)
    assert lines[-1] == f"wrote {tmp_path / 'normal'}/tokenizer.json, train.bin, val.bin, meta.json"
    assert "sha256" not in out  # a debug message

    out, err = _run([*base, "--out", tmp_path / "quiet", "--quiet"], capsys)
    assert out == f"wrote {tmp_path / 'quiet'}/tokenizer.json, train.bin, val.bin, meta.json\n" and err == ""
    out, _ = _run([*base, "--out", tmp_path / "quiet", "-q"], capsys)
    assert out.startswith(f"{tmp_path / 'quiet'} is already prepared")  # an answer too

    package = logging.getLogger("hybrid_gpt")
    before = package.level, list(package.handlers)
    out, _ = _run([*base, "--out", tmp_path / "verbose", "--verbose"], capsys)
    assert (package.level, package.handlers) == before  # main put logging back as it found it
    debug = [line for line in out.splitlines() if "sha256" in line]
    assert len(debug) == 1 and "35 training and 3 validation documents" in debug[0]

    def untimed(line):  # the BPE's training time differs from run to run
        return "trained a BPE" if line.startswith("trained a ") else line

    normal = [untimed(line.replace(str(tmp_path / "normal"), str(tmp_path / "verbose"))) for line in lines]
    assert [untimed(line) for line in out.splitlines() if line not in debug] == normal


def test_pretrain_quiet_and_verbose(smoke_run, tmp_path, capsys):
    base = ["pretrain", "--preset", "smoke", "--data", smoke_run / "data", "--model-type", "hybrid",
            "--max-steps", "2", "--eval-interval", "1"]
    out, _ = _run([*base, "--out", tmp_path / "normal", "--no-progress"], capsys)
    assert "pretrain: model AM (hybrid)" in out and "step 1: " in out and "checkpoint saved" not in out
    assert out.splitlines()[-1].startswith("done: 2 steps")

    out, err = _run([*base, "--out", tmp_path / "quiet", "--quiet"], capsys)  # no --no-progress: -q turns it off
    assert out.startswith("done: 2 steps") and out.count("\n") == 1 and err == ""

    out, _ = _run([*base, "--out", tmp_path / "verbose", "--verbose", "--no-progress"], capsys)
    assert "step 1: " in out and f"step 2: checkpoint saved to {tmp_path / 'verbose'}" in out


def test_library_messages_reach_a_callers_own_logging(tmp_path, corpus, caplog):
    from hybrid_gpt.data.tokens import prepare_data

    caplog.set_level(logging.DEBUG, logger="hybrid_gpt")
    prepare_data(corpus, tmp_path / "d", 300)
    by_level = {r.levelno for r in caplog.records if r.name == "hybrid_gpt.data.tokens"}
    assert by_level == {logging.DEBUG, logging.INFO}
    assert any(m.startswith("val: 3 documents") for m in caplog.messages)
