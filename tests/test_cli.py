"""The CLI as a user drives it: the quick start on the smoke preset, and every bad input from the core issue."""

import json
import shutil
import subprocess
import sys

import pytest

from hybrid_gpt.cli import main


@pytest.fixture(scope="module")
def run_dir(smoke_run, tmp_path_factory):
    """A run directory with both smoke models pretrained through the CLI."""
    rd = tmp_path_factory.mktemp("cli-run")
    shutil.copytree(smoke_run / "data", rd / "data")
    for model_type in ("standard", "hybrid"):
        assert main(["pretrain", "--preset", "smoke", "--run-dir", str(rd), "--model-type", model_type,
                     "--max-steps", "6", "--eval-interval", "3", "--no-progress"]) == 0
    return rd


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_quick_start_commands(run_dir, capsys):
    assert sorted(p.name for p in run_dir.iterdir()) == ["data", "pretrain-hybrid", "pretrain-standard"]
    code, out, _ = run(["eval", run_dir / "pretrain-hybrid", "--json"], capsys)
    assert code == 0
    res = json.loads(out)
    assert res["layers"] == "AM" and res["bpb"] > 0 and res["loss"] > 0 and res["perplexity"] > 1
    code, out, _ = run(["eval", run_dir / "pretrain-standard"], capsys)
    assert code == 0 and "bits/byte" in out
    code, out, _ = run(["sample", run_dir / "pretrain-hybrid", "--prompt", "ROMEO:", "--max-new-tokens", "20",
                        "--preset", "smoke"], capsys)
    assert code == 0 and out.startswith("ROMEO:") and len(out) > len("ROMEO:\n")


def test_sampling_is_reproducible_and_greedy_cache_matches_no_cache(run_dir, capsys):
    base = ["sample", run_dir / "pretrain-standard", "--prompt", "KING:", "--max-new-tokens", "25"]
    outs = [run(base + ["--seed", "3"], capsys)[1] for _ in range(2)]
    assert outs[0] == outs[1]
    greedy = [run(base + ["--temperature", "0"] + extra, capsys)[1] for extra in ([], ["--no-cache"])]
    assert greedy[0] == greedy[1]


def test_original_flag_spellings(run_dir, tmp_path, capsys):
    out = tmp_path / "base_hybrid_model"
    code, _, _ = run(["pretrain", "--preset", "smoke", "--run-dir", run_dir, "--model_type", "hybrid",
                      "--output_path", out, "--max-steps", "2", "--no-progress"], capsys)
    assert code == 0 and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["model"]["layers"] == "AM"


def test_custom_layer_pattern_names_its_run(run_dir, capsys):
    code, _, _ = run(["pretrain", "--preset", "smoke", "--run-dir", run_dir, "--layers", "ANM",
                      "--max-steps", "2", "--no-progress"], capsys)
    assert code == 0 and (run_dir / "pretrain-ANM" / "config.json").is_file()


def test_long_prompt_is_cropped_with_a_note(run_dir, capsys):
    code, out, err = run(["sample", run_dir / "pretrain-hybrid", "--prompt", "To be or not to be. " * 40,
                          "--max-new-tokens", "3"], capsys)
    assert code == 0 and "keeping its last 31" in err


def test_console_script_exit_status_and_stderr(tmp_path):
    """Through a real process: exit status 2, one line on stderr, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "hybrid_gpt.cli", "eval", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr


def test_prepare_is_idempotent_and_never_silently_replaces_data(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"SPEAKER {i % 7}:\nline number {i} of the play\n\n" for i in range(400)))
    argv = ["prepare", "--corpus", corpus, "--run-dir", tmp_path / "run", "--vocab-size", "300"]
    code, out, _ = run(argv, capsys)
    assert code == 0 and (tmp_path / "run" / "data" / "meta.json").is_file()
    code, out, _ = run(argv, capsys)
    assert code == 0 and "nothing to do" in out
    before = (tmp_path / "run" / "data" / "tokenizer.json").read_bytes()
    code, _, err = run(argv[:-1] + ["320"], capsys)
    assert code == 2 and "--force" in err
    assert (tmp_path / "run" / "data" / "tokenizer.json").read_bytes() == before
    code, _, _ = run(argv[:-1] + ["320", "--force"], capsys)
    assert code == 0
    meta = json.loads((tmp_path / "run" / "data" / "meta.json").read_text())
    assert meta["vocab_size"] <= 320 and meta["source"].startswith("user corpus")


def test_training_a_model_too_big_for_memory_is_refused(run_dir, tmp_path, capsys):
    code, _, err = run(["pretrain", "--run-dir", run_dir, "--preset", "smoke", "--n-embd", "65536", "--n-head", "1",
                        "--out", tmp_path / "huge"], capsys)
    assert code == 2 and "GiB but only" in err and not (tmp_path / "huge").exists()


@pytest.mark.parametrize("argv, expected", [
    (["sample", "CKPT", "--prompt", b"\xff"], "--prompt: is not valid UTF-8 text"),
    (["chat", "CKPT", "-p", b"caf\xe9"], "-p/--prompt: is not valid UTF-8 text"),
    (["pretrain", "--seed", "18446744073709551616"], "--seed: must be in [0, 4294967295]"),
    (["pretrain", "--corpus-typo", "x" * 100_000], "unrecognized arguments"),
])
def test_a_real_command_line_with_bad_bytes_or_values(run_dir, argv, expected):
    """Bytes from a shell arrive as lone surrogates; the refusal is one short line, exit 2, before any work."""
    argv = [str(run_dir / "pretrain-hybrid") if a == "CKPT" else a for a in argv]
    proc = subprocess.run([sys.executable, "-m", "hybrid_gpt.cli", *argv], capture_output=True, timeout=120)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2 and expected in err, err[:2000]
    assert err.count("\n") == 1 and len(err) < 1000 and not proc.stdout
