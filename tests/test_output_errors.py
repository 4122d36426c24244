"""Writing the CLI's output never ends in a traceback (issue 27, class 5): a standard output or error that refuses
a write (/dev/full, a closed pipe) ends the command with exit status 1 and one line on standard error where it
can still be written (none for a pipe its reader closed), with no "Exception ignored" noise at exit; characters
the terminal's encoding lacks are replaced. Run as real processes: the streams are the operating system's."""

import os
import subprocess
import sys

import pytest

DEVFULL = "/dev/full"
pytestmark = pytest.mark.skipif(not os.path.exists(DEVFULL), reason="needs /dev/full (Linux)")


def _cli(*argv, stdout=None, stderr=subprocess.PIPE, env=None, close_stdout=False):
    """(exit status, standard output bytes or None, standard error text) of `hybrid-gpt argv`."""
    env = {**os.environ, **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "hybrid_gpt.cli", *map(str, argv)], stdout=stdout,
                            stderr=stderr, env=env)
    if close_stdout:
        proc.stdout.close()  # the reader is gone before the first write: `| head -0`
        out = None
    else:
        out = proc.stdout.read() if proc.stdout else None
    err = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
    assert proc.wait(timeout=300) is not None
    return proc.returncode, out, err


def _sample(pretrained, *more):
    return ["sample", pretrained / "pretrain-standard", "--max-new-tokens", "8", *more]


def _clean(err: str) -> None:
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_eval_into_a_full_disk_is_one_line_and_exit_1(pretrained):
    with open(DEVFULL, "w") as full:
        code, _, err = _cli("eval", pretrained / "pretrain-standard", stdout=full)
    _clean(err)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("hybrid-gpt eval: error: cannot write to standard output: no space left on device")


def test_a_logged_message_into_a_full_disk_is_one_line_and_exit_1(tmp_path):
    """Progress goes through logging (cli._Messages): its refused write ends the command like print's did,
    not in logging's "--- Logging error ---" traceback. Unbuffered, the first message fails, before any work."""
    with open(DEVFULL, "w") as full:
        code, _, err = _cli("prepare", "--preset", "smoke", "--out", tmp_path / "data", stdout=full,
                            env={"PYTHONUNBUFFERED": "1"})
    _clean(err)
    assert code == 1 and err.count("\n") == 1 and "Logging error" not in err
    assert err.startswith("hybrid-gpt prepare: error: cannot write to standard output: no space left on device")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("argv", [["--help"], ["sample", "--help"], ["import", "--help"]])
def test_help_into_a_full_disk_is_one_line_and_exit_1(argv):
    with open(DEVFULL, "w") as full:
        code, _, err = _cli(*argv, stdout=full)
    _clean(err)
    assert code == 1 and "cannot write to standard output" in err and err.count("\n") == 1


def test_both_streams_full_exit_1_silently(pretrained):
    with open(DEVFULL, "w") as full:
        code, _, err = _cli(*_sample(pretrained, "--prompt", "hi"), stdout=full, stderr=full)
    assert code == 1


def test_an_error_with_standard_error_full_keeps_its_exit_status(tmp_path):
    with open(DEVFULL, "w") as full:
        code, _, _ = _cli("eval", tmp_path / "missing", stderr=full)
    assert code == 2  # the refusal is still the input's; only its line is lost


@pytest.mark.parametrize("argv", [["sample"], ["eval"], ["--help"]])
def test_a_closed_pipe_is_quiet_and_exit_1(pretrained, argv):
    if argv[0] == "sample":
        argv = _sample(pretrained, "--prompt", "hello", "--num-samples", "3")
    elif argv[0] == "eval":
        argv = ["eval", pretrained / "pretrain-standard"]
    code, _, err = _cli(*argv, stdout=subprocess.PIPE, close_stdout=True)
    assert code == 1 and err == "", err


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_characters_the_encoding_lacks_are_replaced(pretrained, encoding):
    code, out, err = _cli(*_sample(pretrained, "--prompt", "héllo ✓"), stdout=subprocess.PIPE,
                          env={"PYTHONIOENCODING": encoding})
    _clean(err)
    assert code == 0
    expected = "héllo ✓".encode(encoding, "replace")
    assert out.startswith(expected), out[:40]
