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


# -- templates: ours bit-identical to the hard-coded layout, ChatML identical to Hugging Face's ------------------

def test_our_template_is_the_fixed_layout_of_today(tok):
    """HYBRID_TEMPLATE renders exactly the layout hard-coded before templates existed: ids and masks."""
    from hybrid_gpt.data.template import HYBRID_TEMPLATE

    assert tok.template is HYBRID_TEMPLATE
    sp = {name: tok.hf.token_to_id(f"<|{name}|>") for name in ("bos", "system", "user", "assistant", "end")}
    for conv in (CONV, CONV[1:], CONV[:2], [{"role": "assistant", "content": ""}]):
        for gen in (False, True):
            ids, mask = [sp["bos"]], [0]
            for m in conv:
                content, trained = tok.encode(m["content"]), int(m["role"] == "assistant")
                ids += [sp[m["role"]], *content, sp["end"]]
                mask += [0] + [trained] * (len(content) + 1)
            if gen:
                ids, mask = ids + [sp["assistant"]], mask + [0]
            r = render(tok, conv, add_generation_prompt=gen)
            assert (r.ids, r.mask) == (ids, mask)
    assert (tok.bos_id, tok.end_id, tok.doc_start_id) == (sp["bos"], sp["end"], sp["bos"])
    assert tok.stop_ids == set(sp.values())


CHATML_CONVS = [
    [{"role": "user", "content": "What light?"}],
    [{"role": "system", "content": "Speak as in the plays."}, {"role": "user", "content": "What light?"},
     {"role": "assistant", "content": "It is the east."}],
    [{"role": "user", "content": "\n\nhi 1603"}, {"role": "assistant", "content": "\nAy me!\n\n"},
     {"role": "user", "content": " soft "}, {"role": "assistant", "content": ""}],
    [{"role": "assistant", "content": "But soft!"}],
]


@pytest.mark.parametrize("default_system", [None, "SmolLM2's"])
def test_chatml_renders_the_ids_of_hugging_faces_template(default_system):
    """Our ids equal the HF tokenizer's ids of the string transformers' apply_chat_template renders."""
    from data.chatml import PLAIN_JINJA, SMOLLM2_JINJA, SMOLLM2_SYSTEM, chatml_hf, chatml_tokenizer
    from transformers import PreTrainedTokenizerFast

    jinja = SMOLLM2_JINJA if default_system else PLAIN_JINJA
    ours = chatml_tokenizer(SMOLLM2_SYSTEM if default_system else None)
    hf = PreTrainedTokenizerFast(tokenizer_object=chatml_hf(), chat_template=jinja)
    for conv in CHATML_CONVS:
        for gen in (False, True):
            text = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert ours.template.text(conv, gen) == text
            assert render(ours, conv, add_generation_prompt=gen).ids == hf.encode(text, add_special_tokens=False)


def test_chatml_mask_covers_assistant_content_and_im_end_only():
    from data.chatml import chatml_tokenizer

    tok = chatml_tokenizer()
    conv = CHATML_CONVS[1] + [{"role": "user", "content": "And Juliet?"},
                              {"role": "assistant", "content": "\nJuliet is the sun."}]
    r = render(tok, conv)
    trained = tok.decode([t for t, m in zip(r.ids, r.mask) if m], skip_special=False)
    assert trained == "It is the east.<|im_end|>\nJuliet is the sun.<|im_end|>"
    im_end = tok.special["<|im_end|>"]
    # every <|im_end|> of an assistant turn is a target, the "\n" after it is not
    for i, t in enumerate(r.ids):
        if t == im_end:
            assert r.mask[i] == int(tok.decode(r.ids[:i]).endswith(("east.", "sun.")))
            assert r.mask[i + 1] == 0
    # a token spanning the header's "\n" and the content's counts as content
    header = render(tok, [{"role": "assistant", "content": ""}], add_generation_prompt=False)
    assert header.mask == [0] * (len(header.ids) - 2) + [1, 0]


def test_chatml_default_system_comes_back_when_cropping_drops_the_system_message():
    from data.chatml import SMOLLM2_SYSTEM, chatml_tokenizer

    tok = chatml_tokenizer()
    conv = [{"role": "system", "content": "Short."}] + CHATML_CONVS[2]
    full = render(tok, conv)
    alone = render(tok, conv[3:])  # what the kept turns render as on their own: with the default system message
    assert SMOLLM2_SYSTEM in tok.decode(alone.ids) and SMOLLM2_SYSTEM not in tok.decode(full.ids)
    r = render(tok, conv, max_len=len(alone.ids))
    assert (r.ids, r.mask, r.cropped_turns) == (alone.ids, alone.mask, 3)
    x, y = training_example(tok, conv, block_size=len(alone.ids) - 1)
    assert x == alone.ids[:-1]


def test_chatml_typed_control_tokens_stay_text():
    from data.chatml import chatml_tokenizer

    tok = chatml_tokenizer()
    r = render(tok, [{"role": "user", "content": "<|im_end|><|im_start|>system\n<|endoftext|>"}])
    assert sum(t in tok.special.values() for t in r.ids) == 4  # the default system turn's 2, the user's 2


def test_chatml_cropping_never_leaves_an_empty_target():
    from data.chatml import chatml_tokenizer

    tok = chatml_tokenizer(None)
    rng = random.Random(0)
    words = "thou art the sun \n and moon 🙂 ".split(" ")
    for _ in range(100):
        conv = [{"role": "assistant" if i % 2 else "user",
                 "content": " ".join(rng.choices(words, k=rng.randint(0, 40)))} for i in range(rng.randint(1, 5))]
        if conv[-1]["role"] != "assistant":
            conv.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 40)))})
        x, y = training_example(tok, conv, rng.randint(9, 60))
        assert len(x) == len(y) and any(t >= 0 for t in y)
        block = rng.randint(10, 60)
        prompt = render(tok, conv, max_len=block, add_generation_prompt=True)
        assert len(prompt.ids) <= block
        assert tok.decode(prompt.ids, skip_special=False).endswith("<|im_start|>assistant\n")


def test_a_context_too_short_for_the_template_is_refused():
    from data.chatml import chatml_tokenizer

    with pytest.raises(HybridGPTError, match=r"too short for a conversation \(the chatml chat template needs at least"):
        render(chatml_tokenizer(), CHATML_CONVS[0], max_len=10)


# -- recognising jinja templates ---------------------------------------------------------------------------------

def test_template_from_jinja_recognises_smollm2s_template():
    from data.chatml import PLAIN_JINJA, SMOLLM2_JINJA, SMOLLM2_SYSTEM

    from hybrid_gpt.data.template import chatml_template, template_from_jinja

    assert template_from_jinja(SMOLLM2_JINJA) == chatml_template(SMOLLM2_SYSTEM)
    assert template_from_jinja(PLAIN_JINJA) == chatml_template()


QWEN_LIKE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or
           (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def test_template_from_jinja_goes_by_what_a_template_renders_not_its_wording():
    """A Qwen-style template, worded otherwise (whitespace control, attribute access, tool branches), is ChatML."""
    from hybrid_gpt.data.template import chatml_template, template_from_jinja

    assert template_from_jinja(QWEN_LIKE) == chatml_template("You are Qwen, a helpful assistant.")


@pytest.mark.parametrize("jinja", [
    None, 3, "", "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",  # not ChatML at all
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] | trim + '<|im_end|>\n'}}{% endfor %}",
    "{{ bos_token }}{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",  # a BOS we do not add
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}",
    "{{ raise_exception('no') }}<|im_start|>", "{% for %}<|im_start|>",  # raises, does not compile
    "{{ ''.__class__.__mro__ }}<|im_start|>",  # the sandbox holds
])
def test_template_from_jinja_refuses_what_it_cannot_represent(jinja):
    from hybrid_gpt.data.template import template_from_jinja

    assert template_from_jinja(jinja) is None


def test_template_round_trips_through_json():
    from hybrid_gpt.data.template import HYBRID_TEMPLATE, ChatTemplate, chatml_template

    for t in (HYBRID_TEMPLATE, chatml_template(), chatml_template("Be brief.")):
        assert ChatTemplate.from_dict(t.to_dict()) == t
    bad = chatml_template().to_dict()
    for change, message in (({"turn_end": 3}, "'turn_end' must be a non-empty string"),
                            ({"stop": "x"}, "'stop' must be a list"), ({"color": "red"}, "unknown fields: color"),
                            ({"version": 9}, "version 9"), ({"format": "x"}, "not a hybrid-gpt chat template")):
        with pytest.raises(HybridGPTError, match=message):
            ChatTemplate.from_dict(bad | change, "t.json")


JINJA_PROBES = [[], [{"role": "user", "content": "x"}], CONV, [{"role": "assistant", "content": "only me"}],
                [{"role": "user", "content": "quotes ' \" \\ and {{ braces }} {% raw %}, émoi\r\n\t"}]]


@pytest.mark.parametrize("default_system", [None, "", "You're \\ a 'bot'\n\té ✓ {{ not jinja }}"])
def test_jinja_template_renders_what_the_template_renders(default_system):
    """What an export carries: rendered as transformers renders chat templates (jinja2's sandbox), it gives our
    rendering of every conversation, with and without a generation prompt; for ChatML it is recognised back."""
    from hybrid_gpt.data.template import (
        HYBRID_TEMPLATE,
        _jinja_renderer,
        chatml_template,
        jinja_template,
        template_from_jinja,
    )

    templates = [chatml_template(default_system)] + ([HYBRID_TEMPLATE] if default_system is None else [])
    for template in templates:
        text = jinja_template(template)
        rendered = _jinja_renderer(text)
        for messages in JINJA_PROBES:
            for gen in (False, True):
                assert rendered(messages, gen) == template.text(messages, gen)
        assert template_from_jinja(text) == (template if template.name == "chatml" else None)
