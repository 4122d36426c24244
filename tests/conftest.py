import os

# The suite's models are tiny: one thread per process runs them as fast as two on an idle machine and
# far faster on a busy one (two torch threads that cannot both get a core wait on each other), and the
# tests that start processes (DDP, SIGKILL, the CLI) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import SMOKE  # noqa: E402

from hybrid_gpt.data.corpus import load_shakespeare  # noqa: E402
from hybrid_gpt.data.tokens import prepare_data  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def corpus():
    return load_shakespeare()


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, corpus):
    """A run directory with the embedded corpus prepared at the smoke preset's vocabulary."""
    run_dir = tmp_path_factory.mktemp("smoke-run")
    prepare_data(corpus, run_dir / "data", SMOKE["vocab_size"])
    return run_dir


@pytest.fixture(scope="session")
def pretrained(smoke_run, tmp_path_factory):
    """A run directory holding smoke-sized pretrained checkpoints of both model types."""
    import shutil

    from hybrid_gpt.train.pretrain import run_pretrain

    run_dir = tmp_path_factory.mktemp("pretrained")
    shutil.copytree(smoke_run / "data", run_dir / "data")
    for model_type in ("standard", "hybrid"):
        run_pretrain(run_dir=run_dir, preset="smoke", model_type=model_type,
                     overrides=dict(max_steps=6, eval_interval=3, progress=False))
    return run_dir
