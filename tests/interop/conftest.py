"""Fixtures of the import and export tests (their helpers are in hf_models.py)."""

import pytest
from data.chatml import chatml_hf
from hf_models import VOCAB


@pytest.fixture(scope="session")
def bpe():
    """A byte-level BPE tokenizer (`tokenizers`) of VOCAB tokens, ChatML's control tokens first."""
    return chatml_hf(VOCAB)


@pytest.fixture(scope="session")
def remote_code_cache(tmp_path_factory):
    """transformers' cache of trust_remote_code modules in a directory of the session's, not the home directory's
    (one per process: Python keeps the first one's package for the rest of it)."""
    import transformers.dynamic_module_utils as dynamic

    cache = str(tmp_path_factory.mktemp("hf-modules"))
    previous, dynamic.HF_MODULES_CACHE = dynamic.HF_MODULES_CACHE, cache
    yield cache
    dynamic.HF_MODULES_CACHE = previous
