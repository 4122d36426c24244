import json

import numpy as np
import pytest

from hybrid_gpt.data.tokens import TokenData, batch_offsets, get_batch
from hybrid_gpt.errors import HybridGPTError


def test_prepared_files_are_consistent(smoke_run, corpus):
    data = TokenData.open(smoke_run / "data")
    meta = json.loads((smoke_run / "data" / "meta.json").read_text())
    assert meta["vocab_size"] == data.tokenizer.vocab_size == 512
    assert meta["splits"]["val"]["documents"] == [d.name for d in corpus.val]
    assert meta["splits"]["train"]["tokens"] == len(data.train)
    assert data.train.dtype == np.uint16
    # Bytes per split are those of the rendered text, and the token files decode back to it.
    assert meta["splits"]["val"]["bytes"] == len(corpus.split_text("val").encode())
    assert data.tokenizer.decode(data.val) == corpus.split_text("val")
    assert int(data.tokenizer.token_byte_lengths()[data.val].sum()) == meta["splits"]["val"]["bytes"]
    assert data.val[0] == data.tokenizer.bos_id  # each document starts with <|bos|>


def test_truncated_token_file_is_refused(smoke_run, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(smoke_run / "data", copy)
    with open(copy / "val.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(HybridGPTError, match="truncated"):
        TokenData.open(copy)
    with pytest.raises(HybridGPTError, match="run `hybrid-gpt prepare`"):
        TokenData.open(tmp_path / "nowhere")


def test_batches_are_a_pure_function_of_seed_and_step():
    a = batch_offsets(10_000, 32, 8, seed=1, step=5)
    assert np.array_equal(a, batch_offsets(10_000, 32, 8, seed=1, step=5))
    assert not np.array_equal(a, batch_offsets(10_000, 32, 8, seed=1, step=6))
    assert not np.array_equal(a, batch_offsets(10_000, 32, 8, seed=2, step=5))
    assert a.min() >= 0 and a.max() <= 10_000 - 33


def test_get_batch_shifts_targets_by_one():
    tokens = np.arange(100, dtype=np.uint16)
    x, y = get_batch(tokens, np.array([0, 10]), 8)
    assert x.shape == y.shape == (2, 8)
    assert x[1, 0] == 10 and y[1, 0] == 11 and y[1, -1] == 18


def test_too_little_data_for_the_context():
    with pytest.raises(HybridGPTError, match="too few"):
        batch_offsets(20, 32, 4, seed=0, step=0)
