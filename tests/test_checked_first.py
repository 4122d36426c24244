"""Issue 27, class 6: every input that can be checked up front is checked before the first expensive step,
with a message naming what is wrong and what to do. Each case of the issue is refused (or works) with no
model run: GPT.forward raises if anything is computed before the refusal."""

import shutil

import pytest
from helpers import run_bad, tiny_chat_files
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_gpt.analysis.retrofit import RetrofitConfig, command_line
from hybrid_gpt.analysis.retrofit_config import ANSWER_KS
from hybrid_gpt.cli import build_parser, main
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.infer.costs import CONTEXTS, default_contexts
from hybrid_gpt.model.gpt import GPT
from hybrid_gpt.options import values


def _boom(*a, **k):
    raise AssertionError("a model ran before the inputs were checked")


@pytest.fixture
def retrofit_run(pretrained, tmp_path):
    """A run directory with a context-32 checkpoint (base/), its data and held-out chats."""
    shutil.copytree(pretrained / "pretrain-standard", tmp_path / "base")
    (tmp_path / "chat").mkdir()
    sft, _ = tiny_chat_files(tmp_path)
    sft.rename(tmp_path / "chat" / "sft_val.jsonl")
    return tmp_path


FITTING = ["--quick", "--ks", "0,1", "--eval-context", "32", "--tokens-per-row", "32", "--speed-contexts", "32",
           "--decode-tokens", "4", "--passkey-contexts", "32"]


@pytest.mark.parametrize("extra, message", [
    ([], "give passkey contexts of at least"),  # the issue's: a passkey context equal to the model's context
    (["--passkey-contexts", "20"], "give passkey contexts of at least"),
    (["--answer-ks", "3"], "answer_ks 3 is not one of ks (0, 1)"),  # the issue's: no k = 3 answers, silently
    (["--answer-ks", "1,2"], "answer_ks 2 is not one of ks (0, 1)"),
    (["--answer-tokens", "5000"], "answer_tokens 5,000 is more than a model of context 32 may generate"),
    (["--eval-tokens", "40"], "eval_tokens must cover at least 2 whole windows of 32 tokens"),
    (["--similarity-tokens", "63"], "similarity_tokens must cover at least 2 whole windows"),
])
def test_retrofit_refuses_before_any_work(retrofit_run, extra, message, capsys, monkeypatch):
    monkeypatch.setattr(GPT, "forward", _boom)
    code, err = run_bad(["retrofit", retrofit_run / "base", *FITTING, *extra, "--out", retrofit_run / "r"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (retrofit_run / "r").exists()


@settings(deadline=None)
@given(ks=st.sets(st.integers(0, 6), min_size=1), answer=st.none() | st.sets(st.integers(1, 6), min_size=1))
def test_answer_ks_must_be_studied_and_its_default_is_what_is(ks, answer):
    cfg = RetrofitConfig(quick=True, ks=sorted(ks), answer_ks=None if answer is None else sorted(answer),
                         eval_context=32, tokens_per_row=32, passkey_contexts=[32], speed_contexts=[32],
                         decode_tokens=4, answer_tokens=4).resolved()
    if answer is not None and not answer <= ks:
        with pytest.raises(HybridGPTError, match="is not one of ks"):
            cfg.check("AAAAAA", 32)
        return
    cfg.check("AAAAAA", 32)
    assert cfg.answering == (sorted(answer) if answer is not None else [k for k in ANSWER_KS if k in ks])
    args = build_parser().parse_args(command_line("base", cfg).split()[1:])
    assert RetrofitConfig(**values(args, RetrofitConfig, skip_none=True)).resolved() == cfg


def test_costs_of_a_short_context_checkpoint_adapt_the_default_contexts(pretrained, capsys):
    """`costs CKPT` failed on any checkpoint whose context is under 256 (the first default context)."""
    assert main(["costs", str(pretrained / "pretrain-standard"), "--bandwidth", "50", "--flops", "100",
                 "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["contexts"] == [32]


@settings(deadline=None)  # a correctness test: it must not fail because a loaded machine is slow
@given(block=st.integers(1, 2**20))
def test_default_contexts_fit_the_model_and_reach_its_context(block):
    contexts = default_contexts(block)
    assert contexts == sorted(set(contexts)) and all(1 <= c <= block for c in contexts)
    assert contexts[-1] == min(block, CONTEXTS[-1]) and set(CONTEXTS) & set(range(block + 1)) <= set(contexts)
