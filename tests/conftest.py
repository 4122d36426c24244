import pytest
import torch

from hybrid_gpt.corpus import load_shakespeare
from hybrid_gpt.data import prepare_data
from hybrid_gpt.model import GPT, GPTConfig
from hybrid_gpt.presets import get_preset

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
