import pytest
from helpers import SERVE_CONTEXT, smoke_model


@pytest.fixture(scope="session")
def serve_ckpts(smoke_run, tmp_path_factory):
    """Random standard (AAAA) and hybrid (AAMM) checkpoints with the smoke run's tokenizer (our chat template),
    for `hybrid-gpt serve`'s tests."""
    from hybrid_gpt.checkpoint import save_checkpoint
    from hybrid_gpt.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("serve")
    tok = load_tokenizer(smoke_run / "data")
    paths = {}
    for name, layers in (("standard", "AAAA"), ("hybrid", "AAMM")):
        paths[name] = root / name
        save_checkpoint(paths[name], smoke_model(layers, vocab_size=tok.vocab_size, block_size=SERVE_CONTEXT), tok,
                        {"stage": "test"})
    return paths
