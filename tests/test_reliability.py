"""The write sequence of every directory (fsutil.claimed_dir / staged_dir / output_dir), recovery of a
half-finished swap by every entry point, and the refusals that keep a run from going silently wrong."""

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import SMOKE, smoke_model

from hybrid_gpt import fsutil
from hybrid_gpt.checkpoint import load_checkpoint, save_checkpoint
from hybrid_gpt.data.tokenizer import Tokenizer
from hybrid_gpt.data.tokens import DATA_FILES, TokenData, is_prepared, prepare_data
from hybrid_gpt.errors import HybridGPTError, RunFailure
from hybrid_gpt.fsutil import WriteError, claimed_dir, exclusive_writer, output_dir, recover_dir
from hybrid_gpt.train.pretrain import run_pretrain, train_config
from hybrid_gpt.train.stage import is_complete, run_or_skip

CKPT = ("config.json", "model.safetensors", "tokenizer.json")


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _crash_mid_swap(path):
    """The state a crash between replace_dir's two renames leaves: only "<path>.old"."""
    path.rename(path.with_name(path.name + ".old"))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["ROMEO:\nBut soft, what light!\n\n"] * 10, vocab_size=300)


# -- the one directory-writing sequence ------------------------------------------------------------

def test_output_dir_swaps_in_whole_and_keeps_the_previous_on_failure(tmp_path):
    out = tmp_path / "out"
    with output_dir(out, allowed=("a.txt",), what="test output") as tmp:
        (tmp / "a.txt").write_text("one")
        assert not out.exists()  # nothing appears until the whole directory is written
    assert (out / "a.txt").read_text() == "one"
    with pytest.raises(KeyError):
        with output_dir(out, allowed=("a.txt",), what="test output", overwrite=True) as tmp:
            (tmp / "a.txt").write_text("two")
            raise KeyError("killed half-way")
    assert (out / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary, no lock, no .old left


def test_claimed_dir_refuses_a_directory_that_is_not_ours_naming_what_is_in_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a.txt", "notes.txt", "photos"):
        (out / name).write_text("x")
    before = _files(out)
    with pytest.raises(HybridGPTError, match="already exists; pass --overwrite"):
        with claimed_dir(out, allowed=("a.txt",), what="test output"):
            pass
    with pytest.raises(HybridGPTError, match=r"is not a test output: it holds notes.txt, photos; it is left untouched"):
        with claimed_dir(out, allowed=("a.txt",), what="test output", overwrite=True):
            pass
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # a refused command leaves no lock behind


def test_an_empty_directory_may_be_replaced_and_a_long_listing_is_cut(tmp_path):
    (tmp_path / "empty").mkdir()
    with output_dir(tmp_path / "empty", allowed=("a",), what="x", overwrite=True) as tmp:
        (tmp / "a").write_text("1")
    assert (tmp_path / "empty" / "a").is_file()
    many = tmp_path / "many"
    many.mkdir()
    for i in range(100):
        (many / f"f{i:03d}").write_text("")
    with pytest.raises(HybridGPTError) as e:
        fsutil.check_replaceable(many, ("a",), "x")
    assert "f000, f001, f002, f003 and 96 more" in str(e.value) and len(str(e.value)) < 300


def test_claimed_dir_removes_stale_temporaries_and_recovers_a_half_finished_swap(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("complete")
    _crash_mid_swap(out)
    stale = tmp_path / ".out.tmp-99999"  # a writer killed while building its directory
    stale.mkdir()
    (stale / "a.txt").write_text("half")
    with claimed_dir(out, allowed=("a.txt",), what="x", resume=True):
        assert (out / "a.txt").read_text() == "complete"
        assert not stale.exists() and not (tmp_path / "out.old").exists()


def test_recovery_waits_for_a_writer_that_holds_the_lock(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _crash_mid_swap(out)
    with exclusive_writer(out):  # a writer between its two renames: the .old is its to handle
        recover_dir(out)
        assert not out.exists()
    recover_dir(out)
    assert out.is_dir()


def test_dot_as_output_directory_is_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(HybridGPTError, match=f"{tmp_path} is not a checkpoint: it holds notes.txt"):
        with claimed_dir(".", allowed=CKPT, what="checkpoint", overwrite=True):
            pass


# -- writes that fail say so in one line -------------------------------------------------------------

def test_a_failed_write_and_a_failed_cleanup_give_one_error(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(fsutil, "_write_file", refuse)
    monkeypatch.setattr(type(tmp_path), "unlink", refuse)  # the cleanup fails too, as on a read-only mount
    with pytest.raises(WriteError) as e:
        fsutil.write_json(tmp_path / "r.json", {})
    assert str(e.value) == (f"could not write {tmp_path / 'r.json'}: read-only file system; "
                            "the previous version is untouched")


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, tok, monkeypatch):
    path = tmp_path / "ckpt"
    save_checkpoint(path, smoke_model(vocab_size=tok.vocab_size), tok, {"step": 1})
    before = _files(path)
    calls = []

    def full(p, data):
        calls.append(p)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsutil_write(p, data)

    fsutil_write = fsutil._write_file
    monkeypatch.setattr(fsutil, "_write_file", full)
    with pytest.raises(RunFailure, match=f"could not write {path}: no space left on device"):
        save_checkpoint(path, smoke_model(seed=1, vocab_size=tok.vocab_size), tok, {"step": 2}, trainer_state={})
    assert _files(path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# -- every entry point recovers a half-finished swap -------------------------------------------------

def test_pipeline_skips_a_complete_checkpoint_found_mid_swap(tmp_path, tok, caplog):
    ckpt = tmp_path / "pretrain-standard"
    save_checkpoint(ckpt, smoke_model(vocab_size=tok.vocab_size), tok, {"complete": True})
    _crash_mid_swap(ckpt)
    caplog.set_level(logging.INFO, logger="hybrid_gpt")

    def must_not_run(**kw):
        raise AssertionError("the stage ran again")

    assert run_or_skip("pretrain standard", ckpt, must_not_run) == 0.0
    assert "skipped" in caplog.messages[0] and is_complete(ckpt)


def test_load_and_resume_recover_a_checkpoint_found_mid_swap(smoke_run, tmp_path, caplog):
    kw = dict(run_dir=smoke_run, preset="smoke", out=tmp_path / "r", overrides=dict(max_steps=2, progress=False))
    run_pretrain(**kw)
    _crash_mid_swap(tmp_path / "r")
    caplog.clear()
    caplog.set_level(logging.INFO, logger="hybrid_gpt")
    assert run_pretrain(**kw, resume=True).step == 2 and "already complete" in caplog.messages[0]
    _crash_mid_swap(tmp_path / "r")
    assert load_checkpoint(tmp_path / "r")[0].config.n_layer == SMOKE["n_layer"]


def test_prepared_data_found_mid_swap_is_recovered(smoke_run, corpus, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(smoke_run / "data", data)
    _crash_mid_swap(data)
    assert is_prepared(data, corpus, SMOKE["vocab_size"])
    _crash_mid_swap(data)
    assert len(TokenData.open(data).val) > 0


# -- prepare replaces data only once the new data is complete ----------------------------------------

def test_prepare_force_swaps_new_data_in_whole(tmp_path):
    from hybrid_gpt.data.corpus import load_user_corpus

    text = tmp_path / "c.txt"
    text.write_text("".join(f"A{i % 5}:\nline {i} of it\n\n" for i in range(300)))
    corpus = load_user_corpus(text)
    data = tmp_path / "data"
    prepare_data(corpus, data, 280)
    first = _files(data)
    with pytest.raises(HybridGPTError, match="between 262 and 65536"):
        prepare_data(corpus, data, 70000)  # checked before anything is touched
    assert _files(data) == first
    prepare_data(corpus, data, 300)
    assert json.loads((data / "meta.json").read_text())["requested_vocab_size"] == 300
    assert sorted(p.name for p in data.iterdir()) == sorted(set(DATA_FILES) - {"chat_template.json"})  # ours
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "data"]


# -- nothing silently wrong ---------------------------------------------------------------------------

def test_non_finite_weights_are_never_saved(tmp_path, tok):
    model = smoke_model(vocab_size=tok.vocab_size)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(RunFailure, match=r"became non-finite by step 7 \(first in transformer.h.1.mlp.c_fc.weight\)"):
        save_checkpoint(tmp_path / "ckpt", model, tok, {"step": 7, "complete": True})
    assert not any(tmp_path.iterdir())


def test_a_nan_weight_decay_with_skip_nonfinite_never_marks_a_checkpoint_complete(smoke_run, tmp_path):
    out = tmp_path / "r"
    with pytest.raises(HybridGPTError):  # refused up front, or when the NaN weights would be saved
        run_pretrain(run_dir=smoke_run, preset="smoke", out=out,
                     overrides=dict(max_steps=3, progress=False, weight_decay=float("nan"), skip_nonfinite=True))
    assert not is_complete(out)


def test_init_weights_are_loaded_strictly(smoke_run, tmp_path):
    from hybrid_gpt.train.stage import Stage, run_stage

    model = smoke_model("AAMM", vocab_size=SMOKE["vocab_size"])
    data = TokenData.open(smoke_run / "data")
    state = model.state_dict()
    del state[next(k for k in state if k.startswith("transformer.h.2.mixer"))]

    stage = Stage(name="sft", out=tmp_path / "o", config=model.config, tokenizer=data.tokenizer,
                  tcfg=train_config(dict(max_steps=1, progress=False)), info={"init": "the init"},
                  make_task=lambda m, d: None, init_state=state)
    with pytest.raises(HybridGPTError, match="weights in the init do not match its config.json: missing"):
        run_stage(stage, device="cpu")


def test_prepare_stops_at_ctrl_c_during_bpe_training(tmp_path):
    """The Rust trainer never returns to Python by itself; Ctrl-C must still end `prepare` at once."""
    import random
    import signal
    import subprocess
    import sys
    import time

    rng = random.Random(0)
    (tmp_path / "big.txt").write_text("".join(rng.choice("abcdefghijklmnop") for _ in range(10_000_000)))
    proc = subprocess.Popen([sys.executable, "-m", "hybrid_gpt.cli", "prepare", "--corpus", "big.txt", "--out", "d",
                             "--vocab-size", "4096"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            # Ctrl-C as a terminal sends it, even when the suite runs in a background job
                            # (which inherits SIGINT ignored, and then Python never raises KeyboardInterrupt).
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline().startswith("preparing")  # printed just before the corpus is trained on
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        t0 = time.time()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert time.time() - t0 < 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt"]  # no half-built data left


def test_bench_out_replaces_a_previous_result_and_nothing_else(pretrained, tmp_path, capsys):
    from hybrid_gpt.cli import main
    from hybrid_gpt.infer.bench import RESULT_KEYS

    out = tmp_path / "bench.json"
    out.write_text(json.dumps({k: {} for k in RESULT_KEYS}))  # an earlier run's result: ours to replace
    argv = ["bench", str(pretrained / "pretrain-hybrid"), "--no-peer", "--no-naive", "--contexts", "8",
            "--batch-sizes", "1", "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--out", str(out)]
    assert main(argv) == 0
    assert json.loads(out.read_text())["models"]
    out.write_text("{}")  # a JSON file that is not a bench result is refused, and kept
    assert main(argv) == 2 and out.read_text() == "{}"
    assert "exists and is not a bench result" in capsys.readouterr().err


def test_a_corpus_file_name_that_is_not_utf8_is_kept_as_escapes(tmp_path):
    from hybrid_gpt.data.corpus import load_user_corpus

    folder = tmp_path / "texts"
    folder.mkdir()
    for raw in (b"a\xff.txt", b"b.txt"):
        with open(os.path.join(os.fsencode(folder), raw), "w") as f:
            f.write("WHO:\nhello there, my friend\n\n" * 20)
    corpus = load_user_corpus(folder)
    assert [d.name for d in corpus.train + corpus.val] == ["a\\udcff", "b"]
    assert len(corpus.sha256()) == 64  # hashed (and written to meta.json) without a UnicodeEncodeError


def test_chat_reads_piped_lines_in_bounded_pieces(monkeypatch, capsys):
    import io

    from hybrid_gpt.infer.chat import MAX_INPUT_CHARS, LineTooLong, read_line

    class Endless(io.TextIOBase):  # like /dev/zero: reading it whole would never end
        def readline(self, size=-1):
            assert 0 < size <= MAX_INPUT_CHARS + 1, "an unbounded read"
            self.reads = getattr(self, "reads", 0) + 1
            return "z" * size if self.reads < 5 else "z\n"

    monkeypatch.setattr("sys.stdin", Endless())
    with pytest.raises(LineTooLong) as e:
        read_line("you> ")
    assert e.value.length == 4 * (MAX_INPUT_CHARS + 1) + 1
    monkeypatch.setattr("sys.stdin", io.StringIO("x" * (MAX_INPUT_CHARS + 3) + "\nhello\n"))
    with pytest.raises(LineTooLong):
        read_line("you> ")
    assert read_line("you> ") == "hello"
    with pytest.raises(EOFError):
        read_line("you> ")


def test_sft_finds_its_init_checkpoint_left_mid_swap(pretrained, tmp_path):
    """The default --init (the pretrained checkpoint) is recovered from <init>.old before it is looked for."""
    import shutil

    from hybrid_gpt.train.finetune import resolve_init

    run_dir = tmp_path / "run"
    shutil.copytree(pretrained / "pretrain-hybrid", run_dir / "pretrain-hybrid.old")
    name, init, *_ = resolve_init("sft", run_dir, "hybrid", None, None)
    assert (run_dir / "pretrain-hybrid" / "config.json").is_file() and Path(init).name == "pretrain-hybrid"
