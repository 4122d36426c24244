"""Fixtures of the import tests (their helpers are in hf_models.py)."""

import pytest
from hf_models import SPECIALS, VOCAB, smollm_pre_tokenizer


@pytest.fixture(scope="session")
def bpe(corpus):
    """A byte-level BPE tokenizer of VOCAB tokens (`tokenizers`), ChatML's control tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = smollm_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus.split_text("val")[:100_000]], trainer)
    assert tok.get_vocab_size() == VOCAB
    return tok
