import numpy as np
import pytest
import torch
from helpers import smoke_model

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.train.evaluate import LOGITS_BUDGET, batch_rows, evaluate_lm, window_length, windows


def test_windows_tile_the_split_without_overlap_up_to_the_budget():
    tokens = np.arange(100, dtype=np.uint16)
    batches = list(windows(tokens, block_size=8, max_tokens=50, batch_size=4))
    assert [len(b) for b in batches] == [4, 2]  # 50 // 8 = 6 whole windows, in batches of 4
    rows = torch.cat(batches)
    assert rows.dtype == torch.int64 and rows.shape == (6, 9)
    assert torch.equal(rows[:, :-1].flatten(), torch.arange(48))  # inputs tile 0..47, each once
    assert torch.equal(rows[:, 1:].flatten(), torch.arange(1, 49))  # targets: the next token of each


@pytest.mark.parametrize("n_tokens, max_tokens, expected", [(20, 1000, 19), (100, 5, 5), (2, 1000, 1)])
def test_a_split_or_budget_shorter_than_one_context_gives_one_shorter_window(n_tokens, max_tokens, expected):
    tokens = np.arange(n_tokens, dtype=np.uint16)
    (batch,) = list(windows(tokens, block_size=32, max_tokens=max_tokens))
    assert batch.shape == (1, expected + 1) and torch.equal(batch[0], torch.arange(expected + 1))
    model = smoke_model("AM", vocab_size=128)
    assert model.config.block_size == 32
    assert evaluate_lm(model, tokens, np.ones(128, dtype=np.int64), max_tokens)["tokens"] == expected


def test_too_few_tokens_are_refused():
    with pytest.raises(HybridGPTError, match="at least 2"):
        next(windows(np.arange(1, dtype=np.uint16), 32, 100))
    with pytest.raises(HybridGPTError, match="at least 1"):
        next(windows(np.arange(10, dtype=np.uint16), 32, 0))


def test_a_shorter_context_scores_windows_of_that_length_and_a_longer_one_is_refused():
    model = smoke_model("AA")  # context 32
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, 200).astype(np.uint16)
    lengths = np.ones(model.config.vocab_size, dtype=np.int64)
    assert window_length(model, None) == 32 and window_length(model, 8) == 8
    res = evaluate_lm(model, tokens, lengths, 64, context=8)
    # By hand: the first 8 windows of 8 targets each.
    with torch.no_grad():
        x = torch.from_numpy(tokens[:65].astype(np.int64))
        losses = [model(x[None, i:i + 8], x[None, i + 1:i + 9])[1].item() for i in range(0, 64, 8)]
    assert res["tokens"] == 64 and abs(res["loss"] - sum(losses) / 8) < 1e-5
    for bad in (0, 33, True):
        with pytest.raises(HybridGPTError, match="evaluation context"):
            evaluate_lm(model, tokens, lengths, 64, context=bad)


def test_batches_of_long_windows_over_a_large_vocabulary_have_fewer_rows():
    model = smoke_model("AA")
    assert batch_rows(model, 32, 16) == 16  # the smoke and cpu presets keep their batches
    model.config.vocab_size = LOGITS_BUDGET // (32 * 3)
    assert batch_rows(model, 32, 16) == 3
    model.config.vocab_size = LOGITS_BUDGET
    assert batch_rows(model, 32, 16) == 1


def test_a_full_context_window_whose_logits_would_not_fit_asks_for_a_shorter_one():
    model = smoke_model("AA")
    model.config.vocab_size = 4 * LOGITS_BUDGET // 32 + 1  # one 32-token window just over the limit
    with pytest.raises(HybridGPTError, match="pass --context"):
        window_length(model, None)
    assert window_length(model, 16) == 16
