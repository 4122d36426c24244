"""Fixtures of the import tests (their helpers are in hf_models.py)."""

import pytest
from data.chatml import chatml_hf
from hf_models import VOCAB


@pytest.fixture(scope="session")
def bpe():
    """A byte-level BPE tokenizer (`tokenizers`) of VOCAB tokens, ChatML's control tokens first."""
    return chatml_hf(VOCAB)
