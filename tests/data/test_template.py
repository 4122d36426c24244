import random

import pytest

from hybrid_gpt.data.template import check_messages, render, training_example
from hybrid_gpt.data.tokenizer import Tokenizer
from hybrid_gpt.errors import HybridGPTError


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["ROMEO:\nBut soft, what light through yonder window breaks?\n\n"] * 20, vocab_size=300)


CONV = [
    {"role": "system", "content": "Speak as in the plays."},
    {"role": "user", "content": "What light?"},
    {"role": "assistant", "content": "It is the east."},
    {"role": "user", "content": "And Juliet?"},
    {"role": "assistant", "content": "Juliet is the sun."},
]


def test_mask_covers_exactly_assistant_content_and_its_end_token(tok):
    r = render(tok, CONV)
    expected_ids, expected_mask = [tok.bos_id], [0]
    for m in CONV:
        content = tok.encode(m["content"])
        role = tok.special[{"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}[m["role"]]]
        trained = int(m["role"] == "assistant")
        expected_ids += [role] + content + [tok.end_id]
        expected_mask += [0] + [trained] * (len(content) + 1)
    assert r.ids == expected_ids and r.mask == expected_mask
    trained_text = tok.decode([t for t, m in zip(r.ids, r.mask) if m], skip_special=False)
    assert trained_text == "It is the east.<|end|>Juliet is the sun.<|end|>"


def test_training_example_shifts_and_masks(tok):
    x, y = training_example(tok, CONV, block_size=200)
    r = render(tok, CONV)
    assert x == r.ids[:-1]
    assert y == [t if m else -1 for t, m in zip(r.ids[1:], r.mask[1:])]


def test_cropping_drops_whole_turns_from_the_left(tok):
    full = render(tok, CONV)
    last_two = render(tok, CONV[-2:])
    r = render(tok, CONV, max_len=len(last_two.ids))
    assert r.ids == last_two.ids and r.cropped_turns == 3 and r.cut_tokens == 0
    assert len(render(tok, CONV, max_len=len(full.ids)).ids) == len(full.ids)


def test_cropping_never_leaves_an_empty_target(tok):
    rng = random.Random(0)
    words = "thou art the sun and moon 🙂 ".split()
    for _ in range(200):
        conv = []
        for i in range(rng.randint(1, 6)):
            role = "assistant" if i % 2 else "user"
            conv.append({"role": role, "content": " ".join(rng.choices(words, k=rng.randint(0, 60)))})
        if conv[-1]["role"] != "assistant":
            conv.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 60)))})
        block = rng.randint(2, 80)
        example = training_example(tok, conv, block)
        assert example is not None
        x, y = example
        assert len(x) == len(y) <= block and any(t >= 0 for t in y)


def test_generation_prompt_keeps_the_newest_text(tok):
    conv = [{"role": "user", "content": "first " * 50}, {"role": "assistant", "content": "reply"},
            {"role": "user", "content": "what light " * 40 + "THE END"}]
    r = render(tok, conv, max_len=30, add_generation_prompt=True)
    assert len(r.ids) == 30 and r.ids[0] == tok.bos_id and r.ids[-1] == tok.special["<|assistant|>"]
    assert tok.decode(r.ids).endswith("THE END")
    assert r.cropped_turns == 2 and r.cut_tokens > 0


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "narrator", "content": "x"}], "role 'narrator'"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "user", "content": 3}], "must be a string"),
])
def test_bad_messages(messages, message):
    with pytest.raises(HybridGPTError, match=message):
        check_messages(messages)
