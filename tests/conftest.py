import os

# The suite's models are tiny: one thread per process runs them as fast as two on an idle machine and
# far faster on a busy one (two torch threads that cannot both get a core wait on each other), and the
# tests that start processes (DDP, SIGKILL, the CLI) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from hybrid_gpt.corpus import load_shakespeare  # noqa: E402
from hybrid_gpt.data import prepare_data  # noqa: E402
from hybrid_gpt.model import GPT, GPTConfig  # noqa: E402
from hybrid_gpt.presets import get_preset  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
SMOKE = get_preset("smoke")


def smoke_config(layers: str = "AAMM", vocab_size: int = 97, **kw) -> GPTConfig:
    """A model of the smoke preset's width, with any layer pattern."""
    base = dict(vocab_size=vocab_size, block_size=SMOKE["block_size"], n_embd=SMOKE["n_embd"],
                n_head=SMOKE["n_head"], layers=layers)
    base.update(kw)
    return GPTConfig(**base)


def smoke_model(layers: str = "AAMM", seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    model = GPT(smoke_config(layers, **kw))
    # Random non-zero biases and LayerNorm parameters, so that no test passes by a zero-initialised accident.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(mean=1.0 if "ln" in name and name.endswith("weight") else 0.0, std=0.1)
    return model.eval()


@pytest.fixture(scope="session")
def corpus():
    return load_shakespeare()


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, corpus):
    """A run directory with the embedded corpus prepared at the smoke preset's vocabulary."""
    run_dir = tmp_path_factory.mktemp("smoke-run")
    prepare_data(corpus, run_dir / "data", SMOKE["vocab_size"], log=lambda *a: None)
    return run_dir


def quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="session")
def pretrained(smoke_run, tmp_path_factory):
    """A run directory holding smoke-sized pretrained checkpoints of both model types."""
    import shutil

    from hybrid_gpt.pretrain import run_pretrain

    run_dir = tmp_path_factory.mktemp("pretrained")
    shutil.copytree(smoke_run / "data", run_dir / "data")
    for model_type in ("standard", "hybrid"):
        run_pretrain(run_dir=run_dir, preset="smoke", model_type=model_type,
                     overrides=dict(max_steps=6, eval_interval=3, progress=False), log=quiet)
    return run_dir


def write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_chat_files(tmp_path):
    """Small SFT and DPO JSONL files in the ecosystem's formats (fast to train on)."""
    lines = ["But soft, what light through yonder window breaks?", "It is the east, and Juliet is the sun.",
             "Good night, good night! Parting is such sweet sorrow.", "What's in a name?", "Ay me!",
             "O Romeo, Romeo! wherefore art thou Romeo?", "Wilt thou be gone? It is not yet near day."]
    sft = [{"messages": [{"role": "user", "content": lines[i % 7]},
                         {"role": "assistant", "content": lines[(i + 1) % 7]}]} for i in range(24)]
    dpo = [{"prompt": lines[i % 7], "chosen": lines[(i + 1) % 7], "rejected": "Fish and chips, " * (1 + i % 3)}
           for i in range(24)]
    return write_jsonl(tmp_path / "sft.jsonl", sft), write_jsonl(tmp_path / "dpo.jsonl", dpo)
