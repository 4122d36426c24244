"""Issue 27, class 7: generation is bounded by what a user would mean (infer.config.generation_limit: a multiple of
the model's context, never under a page, never over MAX_NEW_TOKENS), checked before the first token by
generate itself, and up front by sample and chat; --help says so."""

import re

import pytest
import torch
from helpers import run_bad, smoke_model
from hypothesis import given
from hypothesis import strategies as st

from hybrid_gpt.cli import build_parser
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.infer.config import (
    GENERATION_CONTEXTS,
    GENERATION_RULE,
    MAX_NEW_TOKENS,
    MIN_GENERATION_LIMIT,
    check_new_tokens,
    generation_limit,
)
from hybrid_gpt.infer.engine import generate
from hybrid_gpt.model.gpt import GPT


@given(block=st.integers(1, 2**20), n=st.integers(1, 10 * MAX_NEW_TOKENS))
def test_the_limit_is_a_multiple_of_the_context_between_a_page_and_the_maximum(block, n):
    limit = generation_limit(block)
    assert MIN_GENERATION_LIMIT <= limit <= MAX_NEW_TOKENS
    assert limit == min(MAX_NEW_TOKENS, max(MIN_GENERATION_LIMIT, GENERATION_CONTEXTS * block))
    if n <= limit:
        check_new_tokens(n, block)
    else:
        with pytest.raises(HybridGPTError, match=f"{limit:,}"):
            check_new_tokens(n, block)


def test_generate_refuses_before_the_first_token(monkeypatch):
    model = smoke_model("AM")
    idx = torch.zeros(1, 2, dtype=torch.long)
    assert next(generate(model, idx, generation_limit(32))).shape == (1, 1)  # the limit itself is fine

    def boom(*a, **k):
        raise AssertionError("a token was computed")

    monkeypatch.setattr(GPT, "forward", boom)
    with pytest.raises(HybridGPTError, match="may generate at once: 1,024"):
        generate(model, idx, 1_000_000 // 10)  # at the call, not at the first next()


@pytest.mark.parametrize("command", [["chat", "-p", "hi"], ["sample", "--prompt", "hi"]])
@pytest.mark.parametrize("n", ["1025", "100000"])
def test_sample_and_chat_refuse_an_unbounded_request_up_front(pretrained, command, n, capsys, monkeypatch):
    """`chat -p hi --max-new-tokens 1000000` on a 32-token model ran for about 15 minutes."""
    monkeypatch.setattr(GPT, "forward", lambda *a, **k: pytest.fail("generated before refusing"))
    code, err = run_bad([command[0], pretrained / "pretrain-hybrid", *command[1:], "--max-new-tokens", n], capsys)
    assert code == 2 and f"max_new_tokens {int(n):,} is more than a model of context 32" in err, err
    assert len(err.strip().splitlines()) == 1
    code, err = run_bad([command[0], pretrained / "pretrain-hybrid", *command[1:], "--max-new-tokens", "1000000"],
                        capsys)
    assert code == 2 and f"must be at most {MAX_NEW_TOKENS}" in err


@pytest.mark.parametrize("command", ["sample", "chat"])
def test_help_states_the_bound(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    text = " ".join(sub.format_help().split())
    assert re.sub(r"\s+", " ", GENERATION_RULE) in text
