"""Property-based tests: arbitrary Unicode, control characters and long strings never raise anything
but the documented HybridGPTError."""

import json
import unicodedata

import pytest
from helpers import smoke_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid_gpt.data.chat_data import load_dpo, load_sft
from hybrid_gpt.data.template import render, training_example
from hybrid_gpt.data.tokenizer import Tokenizer
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.infer.chat import ChatSession, clean_input

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Any Unicode text (surrogates cannot be encoded, so Python strings from files never hold them), long ones too.
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
long_texts = st.text(st.characters(blacklist_categories=("Cs",)), min_size=2000, max_size=5000)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["ROMEO:\nBut soft, what light through yonder window breaks? 🙂 café\n\n"] * 20,
                           vocab_size=300)


@FUZZ
@given(text=st.one_of(texts, long_texts))
def test_tokenizer_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert not set(ids) & set(tok.special.values())  # control tokens only ever enter by id
    assert tok.token_byte_lengths()[ids].sum() == len(text.encode("utf-8"))


messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                           "content": texts}), min_size=1, max_size=6)


@FUZZ
@given(conv=messages, block=st.integers(min_value=2, max_value=120))
def test_template_mask_and_cropping(tok, conv, block):
    full = render(tok, conv)
    trained = [t for t, m in zip(full.ids, full.mask) if m]
    expected = []
    for m in conv:
        if m["role"] == "assistant":
            expected += tok.encode(m["content"]) + [tok.end_id]
    assert trained == expected
    example = training_example(tok, conv, block)
    if example is not None:
        x, y = example
        assert len(x) == len(y) <= block and any(t >= 0 for t in y)
    if conv[-1]["role"] == "assistant":
        assert example is not None  # the final assistant turn always leaves a target
    prompt = render(tok, conv, max_len=block + 1, add_generation_prompt=True)
    assert len(prompt.ids) <= block + 1 and prompt.ids[-1] == tok.special["<|assistant|>"]


@FUZZ
@given(lines=st.lists(st.one_of(texts, st.builds(json.dumps, st.dictionaries(texts, texts, max_size=3)),
                                st.just('{"messages": [{"role": "user", "content": "hi"}]}'),
                                st.just('{"prompt": "p", "chosen": "c", "rejected": 7}')), max_size=5))
def test_jsonl_loaders_raise_only_documented_errors(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(line.replace("\n", " ").replace("\r", " ") for line in lines), encoding="utf-8")
    for loader in (load_sft, load_dpo):
        try:
            loader(path)
        except HybridGPTError as e:
            assert str(path) in str(e)


@FUZZ
@given(text=st.one_of(texts, long_texts))
def test_clean_input_leaves_no_control_characters(text):
    cleaned = clean_input(text)
    assert all(ch in "\t\n" or unicodedata.category(ch) != "Cc" for ch in cleaned)
    assert cleaned == cleaned.strip()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(texts, long_texts))
def test_chat_answers_any_input(tok, text):
    model = smoke_model("AAMM", vocab_size=tok.vocab_size)
    session = ChatSession(model, tok, max_new_tokens=4, temperature=1.0, seed=0)
    reply = "".join(session.reply(clean_input(text) or "?"))
    assert isinstance(reply, str) and len(session.history) == 2
    assert session.last.prompt_tokens <= model.config.block_size
