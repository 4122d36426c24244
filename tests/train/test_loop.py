import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import smoke_model

from hybrid_gpt.data.tokenizer import Tokenizer
from hybrid_gpt.errors import HybridGPTError, RunFailure
from hybrid_gpt.train.loop import TrainConfig, cosine_lr, train
from hybrid_gpt.train.pretrain import run_pretrain


def losses(ckpt):
    rows = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


def test_schedule_warms_up_then_decays_to_the_floor():
    lrs = [cosine_lr(s, 100, 1.0, warmup_steps=10, min_lr_ratio=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[4] == pytest.approx(0.5)  # linear warmup
    assert lrs[9] == lrs[10] == 1.0  # the peak: the last warmup step, then the start of the cosine
    assert cosine_lr(55, 100, 1.0, 10, 0.1) == pytest.approx(0.55)  # half way down the cosine: the mean
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert cosine_lr(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)  # the floor at the end, and after it
    assert cosine_lr(500, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert cosine_lr(0, 10, 2.0) == 2.0 and cosine_lr(10, 10, 2.0, min_lr_ratio=0.0) == 0.0  # no warmup


class CountingTask:
    """Rows are their step and index; the loss is the model's on them, and each step also reports one draw
    from the torch generator (the one dropout uses), taken before the forward."""

    tokens_per_row = 4

    def rows(self, step):
        return (torch.arange(8 * 4).view(8, 4) + step) % 50

    def take(self, batch, lo, hi, device):
        return batch[lo:hi].to(device)

    def loss(self, model, x):
        draw = torch.rand(()).item()
        _, loss = model(x, x)
        return loss, {"draw": draw}


def test_in_memory_training_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = smoke_model("AM", vocab_size=50)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(max_steps=3, batch_size=4, eval_interval=1, save_interval=1, progress=False)
    result = train(model, CountingTask(), cfg)
    assert result.step == 3 and not result.interrupted and [m["step"] for m in result.metrics] == [1, 2, 3]
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no lock, no metrics file
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model trained
    with pytest.raises(HybridGPTError, match="checkpoint directory"):
        train(model, CountingTask(), cfg, resume_state={"step": 1})


RANK_SCRIPT = """
import json, sys
import torch
from hybrid_gpt.model.gpt import GPT, GPTConfig
from hybrid_gpt.runtime import distributed_env, init_distributed, shutdown_distributed
from hybrid_gpt.train.loop import TrainConfig, train
sys.path[:0] = [sys.argv[2], sys.argv[3]]  # tests/train and tests (for its helpers)
from test_loop import CountingTask

init_distributed(torch.device("cpu"))
rank = distributed_env()[0]
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=50, block_size=4, n_embd=8, n_head=2, layers="AM", dropout=0.1))
result = train(model, CountingTask(), TrainConfig(max_steps=2, batch_size=8, progress=False, seed=5))
shutdown_distributed()
with open(f"{sys.argv[1]}-{rank}.json", "w") as f:
    json.dump([m["draw"] for m in result.metrics], f)
"""


def test_each_rank_draws_its_own_dropout_masks(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    here = Path(__file__).parent
    paths = [str(here), str(here.parent)]
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "single"), *paths], capture_output=True,
                            text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path / "ddp"), *paths], capture_output=True, text=True, env=env,
                         timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, r0, r1 = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("single-0", "ddp-0", "ddp-1"))
    assert r0[0] == one[0]  # rank 0 keeps the seed a single process uses
    assert r1[0] != r0[0]  # rank 1 draws from a generator of its own


def test_resume_matches_an_uninterrupted_run(smoke_run, tmp_path):
    common = dict(run_dir=smoke_run, preset="smoke", model_type="hybrid",
                  overrides=dict(max_steps=16, eval_interval=4, progress=False, dropout=0.1))
    run_pretrain(out=tmp_path / "full", **common)
    part = run_pretrain(out=tmp_path / "part", **{**common, "overrides": {**common["overrides"], "stop_after": 6}})
    assert part.interrupted and part.step == 6
    resumed = run_pretrain(out=tmp_path / "part", resume=True, **common)
    assert resumed.step == 16 and not resumed.interrupted
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    a, b = load_state(tmp_path / "part"), load_state(tmp_path / "full")
    assert all(torch.equal(a[k], b[k]) for k in a)


def load_state(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_resume_of_a_complete_run_does_nothing(smoke_run, tmp_path, caplog):
    kw = dict(run_dir=smoke_run, preset="smoke", out=tmp_path / "r", overrides=dict(max_steps=4, progress=False))
    run_pretrain(**kw)
    caplog.clear()
    caplog.set_level(logging.INFO, logger="hybrid_gpt")
    result = run_pretrain(**kw, resume=True)
    assert result.step == 4 and "already complete" in caplog.messages[0]


def test_ddp_two_processes_match_one(smoke_run, tmp_path):
    args = ["pretrain", "--preset", "smoke", "--run-dir", str(smoke_run), "--model-type", "hybrid",
            "--max-steps", "6", "--batch-size", "4", "--grad-accum", "2", "--eval-interval", "3", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "hybrid_gpt.cli", *args, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "hybrid_gpt.cli", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one[0]) == len(two[0]) == 6
    assert one[0] == pytest.approx(two[0], abs=1e-4)
    assert one[1] == pytest.approx(two[1], abs=1e-4)
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["training"]["world_size"] == 2
    # Each rank's random state is kept, so that a resume gives each its own generator back.
    ranks = torch.load(tmp_path / "two" / "trainer_state.pt", weights_only=True)["rng_ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    assert "rng_ranks" not in torch.load(tmp_path / "one" / "trainer_state.pt", weights_only=True)


def _default_sigint():
    # A shell starts background jobs with SIGINT ignored, and children inherit that; give them Ctrl-C back,
    # so that a signal sent before the training loop installs its handler still stops them.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_save_a_checkpoint_that_resumes(smoke_run, tmp_path, signum):
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "hybrid_gpt.cli", "pretrain", "--preset", "smoke", "--run-dir", str(smoke_run),
           "--max-steps", "100000", "--eval-interval", "50", "--no-progress", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    deadline = time.time() + 120
    while not (out / "trainer_state.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    state = torch.load(out / "trainer_state.pt", weights_only=True)
    assert state["step"] >= 50
    # A second process may not write the same checkpoint while the first is still running.
    if signum == signal.SIGTERM:
        return
    first = subprocess.Popen(cmd + ["--resume"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=_default_sigint)
    deadline = time.time() + 120
    while not (tmp_path / ".interrupted.lock").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    second = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=120)
    first.send_signal(signal.SIGINT)
    try:
        first.communicate(timeout=120)
    finally:
        first.kill()  # never leave a 100,000-step run behind
    assert second.returncode == 2 and "another process (pid" in second.stderr, second.stderr


class NaNTask:
    tokens_per_row = 4

    def rows(self, step):
        return None

    def take(self, batch, lo, hi, device):
        return None

    def loss(self, model, micro):
        out = model(torch.zeros(1, 4, dtype=torch.long))
        return out.sum() * float("nan"), {}

    def evaluate(self, model, final, autocast=None):
        return {"loss": 0.0}


def test_non_finite_batches_can_be_skipped_and_counted(tmp_path):
    import json as _json

    tok = Tokenizer.train(["abc def"] * 5, vocab_size=270)
    model = smoke_model("AM", vocab_size=tok.vocab_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(max_steps=3, batch_size=1, progress=False, skip_nonfinite=True, eval_interval=3)
    result = train(model, NaNTask(), cfg, tmp_path / "nan", tok, {}, torch.device("cpu"))
    assert result.step == 3 and sum(1 for m in result.metrics if m.get("skipped")) == 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no update from a NaN batch
    config = _json.loads((tmp_path / "nan" / "config.json").read_text())
    assert config["training"]["skipped_steps"] == 3


def test_non_finite_loss_stops_the_run(tmp_path):
    tok = Tokenizer.train(["abc def"] * 5, vocab_size=270)
    model = smoke_model("AM", vocab_size=tok.vocab_size)
    cfg = TrainConfig(max_steps=3, batch_size=1, progress=False)
    with pytest.raises(RunFailure, match="non-finite at step 1"):
        train(model, NaNTask(), cfg, tmp_path / "nan", tok, {}, torch.device("cpu"))
    assert not (tmp_path / "nan").exists()


def test_a_second_writer_of_the_same_checkpoint_is_refused(smoke_run, tmp_path):
    from hybrid_gpt.errors import HybridGPTError
    from hybrid_gpt.fsutil import exclusive_writer

    out = tmp_path / "locked"
    with exclusive_writer(out):  # as if another process were training into it
        with pytest.raises(HybridGPTError, match="another process .* is writing"):
            run_pretrain(run_dir=smoke_run, preset="smoke", out=out, overrides=dict(max_steps=2, progress=False))
    assert not out.exists()
    run_pretrain(run_dir=smoke_run, preset="smoke", out=out, overrides=dict(max_steps=2, progress=False))
    assert (out / "model.safetensors").is_file()


def test_sigkill_while_checkpointing_never_tears_a_checkpoint(smoke_run, tmp_path):
    """kill -9 at several moments of a run that checkpoints every step; --resume ends where an
    uninterrupted run ends."""
    from hybrid_gpt.checkpoint import load_checkpoint

    args = [sys.executable, "-m", "hybrid_gpt.cli", "pretrain", "--preset", "smoke", "--run-dir", str(smoke_run),
            "--max-steps", "150", "--save-interval", "1", "--eval-interval", "50", "--no-progress"]
    ref = subprocess.run(args + ["--out", str(tmp_path / "ref")], capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    kills = 0
    for delay in (0.0, 0.3, 0.7):
        resume = ["--resume"] if (out / "trainer_state.pt").exists() or out.with_name("killed.old").exists() else []
        proc = subprocess.Popen(args + ["--out", str(out)] + resume, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        start = time.time()
        seen = None
        while time.time() - start < 120 and proc.poll() is None:
            state = out / "trainer_state.pt"
            if state.exists():
                seen = seen or time.time()
                if time.time() - seen >= delay:
                    break
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        load_checkpoint(out if out.exists() else out.with_name("killed.old"))  # complete, never torn
    assert kills >= 2
    final = subprocess.run(args + ["--out", str(out), "--resume"], capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    assert losses(out) == losses(tmp_path / "ref")
    assert not list(tmp_path.glob(".killed.tmp-*"))


def test_a_failed_write_says_what_and_keeps_the_previous_checkpoint(smoke_run, tmp_path):
    """Out of disk, simulated with a file-size limit: exit 1, one line naming the checkpoint, old one intact."""
    import resource

    from hybrid_gpt.checkpoint import load_checkpoint

    out = tmp_path / "ckpt"
    args = [sys.executable, "-m", "hybrid_gpt.cli", "pretrain", "--preset", "smoke", "--run-dir", str(smoke_run),
            "--eval-interval", "5", "--no-progress", "--out", str(out)]
    first = subprocess.run(args + ["--max-steps", "5"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    before = (out / "model.safetensors").read_bytes()

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write then fails with EFBIG

    proc = subprocess.run(args + ["--max-steps", "10", "--resume"], capture_output=True, text=True, timeout=300,
                          preexec_fn=small_files)
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "could not write" in line and str(out) in line and "Traceback" not in proc.stderr
    assert (out / "model.safetensors").read_bytes() == before
    assert load_checkpoint(out)[2]["step"] == 5
    assert not list(tmp_path.glob(".ckpt.tmp-*"))
