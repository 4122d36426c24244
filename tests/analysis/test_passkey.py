"""The retrofit's measurements: passkey prompts and their scoring, agreement with a teacher, chat sequences and
greedy answers, on a tiny Llama-family model with a tiny ChatML tokenizer."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from data.chatml import chatml_tokenizer
from helpers import LLAMA, smoke_model

from hybrid_gpt.analysis import passkey
from hybrid_gpt.analysis.passkey import (
    QUESTIONS,
    PasskeyTrial,
    Reference,
    chat_sequences,
    greedy_answers,
    passkey_trials,
    read_key,
    score_passkey,
)
from hybrid_gpt.data.template import render
from hybrid_gpt.errors import HybridGPTError

BLOCK = 512  # the tiny tokenizer spends about 180 tokens on the wording
PLAY = ("HAMLET:\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles.\n\n"
        "OPHELIA:\nGood my lord, how does your honour for this many a day?\n\n")


@pytest.fixture(scope="module")
def tok():
    return chatml_tokenizer()


@pytest.fixture(scope="module")
def filler(tok):
    doc = tok.doc_start_id
    return np.asarray(([doc] + tok.encode(PLAY)) * 30, dtype=np.uint16)


@pytest.fixture(scope="module")
def model(tok):
    return smoke_model("AM", vocab_size=tok.vocab_size, block_size=BLOCK, **LLAMA)


def occurrences(seq, sub):
    return sum(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@pytest.mark.parametrize("chat", [True, False])
def test_trials_state_the_key_once_at_the_stated_length(tok, filler, chat):
    template = tok.template if chat else None
    trials = passkey_trials(tok, filler, context=256, trials=6, seed=3, template=template)
    assert len(trials) == 6
    for t in trials:
        assert len(t.ids) == t.context == 256
        assert re.fullmatch(r"[1-9]\d{4}", t.key)
        text = tok.decode(t.ids)
        assert text.count(t.key) == 1 and occurrences(t.ids, tok.encode(t.key)) == 1
        assert f"The pass key is {t.key}." in text  # stated once, in the needle
        assert tok.doc_start_id not in t.ids  # the filler's document starts are dropped
        assert 0 <= t.depth <= 1
        assert text.endswith("Reply with the number only." + ("\nassistant\n" if chat else "\n\n") + "The pass key is")
    if chat:  # the chat prompt is the template's rendering of a user turn, then the generation prompt
        head = render(tok, [{"role": "user", "content": passkey.INTRO}]).ids[:-2]
        assert trials[0].ids[:len(head)] == head and tok.end_id in trials[0].stop_ids
    else:
        assert tok.decode(trials[0].ids).startswith(passkey.INTRO) and trials[0].stop_ids == ()


def test_trials_are_deterministic_and_differ_across_trials(tok, filler):
    a = passkey_trials(tok, filler, context=256, trials=5, seed=7, template=tok.template)
    assert a == passkey_trials(tok, filler, context=256, trials=5, seed=7, template=tok.template)
    assert a[:3] == passkey_trials(tok, filler, context=256, trials=3, seed=7, template=tok.template)
    assert len({t.key for t in a}) == 5 and len({round(t.depth, 2) for t in a}) == 5
    other = passkey_trials(tok, filler, context=256, trials=5, seed=8, template=tok.template)
    assert [t.key for t in other] != [t.key for t in a]
    # depths spread over the filler: the first five golden-ratio points fall in five different fifths
    assert sorted(int(t.depth * 5) for t in a) == [0, 1, 2, 3, 4]


def test_filler_holding_the_key_gets_another_key(tok, filler):
    first = passkey_trials(tok, filler, context=256, trials=1, seed=5)[0]
    key = tok.encode(f" {first.key} ")
    planted = np.concatenate([np.r_[filler[i:i + 30], key] for i in range(0, 900, 30)]).astype(np.uint16)
    again = passkey_trials(tok, planted, context=256, trials=1, seed=5)
    assert again[0].key != first.key and tok.decode(again[0].ids).count(again[0].key) == 1
    assert again == passkey_trials(tok, planted, context=256, trials=1, seed=5)  # the redraw is deterministic


def test_too_short_context_or_filler_is_a_clear_error(tok, filler):
    with pytest.raises(HybridGPTError, match="give passkey contexts of at least 196 tokens"):
        passkey_trials(tok, filler, context=150, trials=1, seed=0, template=tok.template)
    with pytest.raises(HybridGPTError, match="filler has"):
        passkey_trials(tok, filler[:100], context=400, trials=1, seed=0)
    with pytest.raises(HybridGPTError, match="at least one trial"):
        passkey_trials(tok, filler, context=256, trials=0, seed=0)


def test_read_key_takes_the_first_whole_number():
    assert read_key(" 12345. Remember it.") == "12345"
    assert read_key("is 123456") == "123456"  # extra digits: another number, so not the key
    assert read_key("12 345") == "12"
    assert read_key("no digits") == ""


def fake_generate(tok, answer, after=" 99999"):
    """A generate that replies ``answer(key)`` to each row (the key read from its prompt), then a stop token,
    then more digits that scoring must not read."""
    def generate(model, idx, max_new_tokens, temperature=1.0, stop_tokens=None, **kw):
        assert temperature == 0
        replies = []
        for row in idx.tolist():
            key = re.search(r"pass key is (\d{5})\.", tok.decode(row)).group(1)
            replies.append(tok.encode(answer(key)) + [tok.end_id] + tok.encode(after))
        width = max(len(r) for r in replies)
        for step in range(min(max_new_tokens, width)):
            yield torch.tensor([[r[step] if step < len(r) else tok.end_id] for r in replies])
    return generate


@pytest.mark.parametrize("answer, accuracy", [(lambda k: f" {k}.", 1.0), (lambda k: f" {int(k) % 90000 + 10001}", 0.0),
                                              (lambda k: f" {k}6", 0.0), (lambda k: "", 0.0)])
def test_scoring_is_exact_match(tok, filler, model, monkeypatch, answer, accuracy):
    trials = passkey_trials(tok, filler, context=256, trials=4, seed=1, template=tok.template)
    monkeypatch.setattr(passkey, "generate", fake_generate(tok, answer))
    result = score_passkey(model, trials, max_new_tokens=20, batch_size=3)
    assert result["accuracy"] == accuracy and result["correct"] == 4 * accuracy
    assert result["n"] == 4 and result["context"] == 256
    assert [a["key"] for a in result["answers"]] == [t.key for t in trials]
    assert [a["depth"] for a in result["answers"]] == [t.depth for t in trials]
    assert all("99999" not in a["text"] for a in result["answers"])  # the reply ends at the stop token
    bare = [PasskeyTrial(ids=t.ids, key=t.key, context=t.context, depth=t.depth, stop_ids=t.stop_ids) for t in trials]
    with pytest.raises(HybridGPTError, match="needs the tokenizer"):
        score_passkey(model, bare)
    assert score_passkey(model, bare, max_new_tokens=20, tokenizer=tok) == result


def test_scoring_a_real_model_batched_or_not(tok, filler, model):
    trials = passkey_trials(tok, filler, context=224, trials=3, seed=2, template=tok.template)
    trials += passkey_trials(tok, filler, context=240, trials=2, seed=2, template=tok.template)
    one = score_passkey(model, trials, max_new_tokens=4)
    assert one == score_passkey(model, trials, max_new_tokens=4, batch_size=3)
    assert [a["key"] for a in one["answers"]] == [t.key for t in trials]
    assert 0 <= one["accuracy"] <= 1 and one["n"] == 5
    with pytest.raises(HybridGPTError, match="exceeds the model's context"):
        score_passkey(model, passkey_trials(tok, filler, context=BLOCK + 8, trials=1, seed=2))


def perturbed(model, scale):
    other = smoke_model("AM", vocab_size=model.config.vocab_size, block_size=BLOCK, **LLAMA)
    other.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * scale)
    return other


def test_reference_against_itself_and_a_perturbed_model(tok, model):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, tok.vocab_size, size=n) for n in (40, 17, 64)]
    ref = Reference(model, seqs)
    same = ref.compare(model)
    assert same["top1_agreement"] == 1.0 and same["tokens"] == 121
    assert abs(same["kl"]) < 1e-4  # float16 storage costs about 1e-6 nats
    other = perturbed(model, 0.2)
    diff = ref.compare(other)
    assert diff["top1_agreement"] < 1 and diff["kl"] > 1e-3
    with torch.no_grad():  # the same KL computed directly in float32
        exact = sum(F.kl_div(F.log_softmax(other(torch.as_tensor(s)[None]).float(), -1),
                             F.log_softmax(model(torch.as_tensor(s)[None]).float(), -1),
                             log_target=True, reduction="sum") for s in seqs) / 121
    assert diff["kl"] == pytest.approx(float(exact), rel=1e-3)
    ref.CHUNK = 7  # positions compared in chunks add up to the same
    assert ref.compare(other)["kl"] == pytest.approx(diff["kl"], rel=1e-6)
    as_tensor = Reference(model, torch.as_tensor(np.stack([seqs[0], seqs[0]])))
    assert as_tensor.compare(other)["tokens"] == 80
    with pytest.raises(HybridGPTError, match="vocabulary"):
        ref.compare(smoke_model("AM", vocab_size=tok.vocab_size + 1, block_size=BLOCK, **LLAMA))


def conversations(n):
    lines = PLAY.split("\n")
    return [[{"role": "user", "content": lines[i % 5] * (1 + i % 3)},
             {"role": "assistant", "content": lines[(i + 1) % 5]}] for i in range(n)]


def test_chat_sequences_respect_the_budgets(tok):
    convs = conversations(12)
    seqs = chat_sequences(tok, tok.template, convs, max_tokens=300, block_size=48)
    assert sum(len(s) for s in seqs) == 300 and all(len(s) <= 48 for s in seqs)
    assert seqs[0].tolist() == render(tok, convs[0], max_len=48).ids  # in order, rendered as training renders
    assert [s.tolist() for s in seqs] == [s.tolist() for s in chat_sequences(tok, None, convs, max_tokens=300,
                                                                            block_size=48)]
    few = chat_sequences(tok, tok.template, convs[:2], max_tokens=10_000, block_size=48)
    assert len(few) == 2  # fewer tokens than asked: all of them


def test_greedy_answers(tok, model):
    answers = greedy_answers(model, tok, tok.template, max_new_tokens=6)
    assert len(QUESTIONS) == len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert answers == greedy_answers(model, tok, max_new_tokens=6)  # None: the tokenizer's own template
