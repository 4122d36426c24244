import json

import pytest

from hybrid_gpt.data.chat_data import build_conversations, build_pairs, load_dpo, load_sft, prepare_chat_data
from hybrid_gpt.data.corpus import VALIDATION_PLAYS, Document, Speech
from hybrid_gpt.errors import HybridGPTError


def _doc(name, speakers, scene_break=None):
    speeches = [Speech(speaker=s, text=f"{name} speech {i} by {s}",
                       scene=int(scene_break is not None and i >= scene_break)) for i, s in enumerate(speakers)]
    return Document(name=name, text="", speeches=speeches)


def test_conversations_alternate_and_stay_within_a_scene():
    doc = _doc("play", ["A", "B", "A", "B", "B", "C", "D", "E"], scene_break=6)
    convs = build_conversations([doc], seed=0)
    assert convs
    for c in convs:
        roles = [m["role"] for m in c["messages"]]
        assert roles[-1] == "assistant" and len(roles) % 2 == 0
        assert all(a != b for a, b in zip(roles, roles[1:]))
        idx = [int(m["content"].split()[2]) for m in c["messages"]]
        assert idx == list(range(idx[0], idx[-1] + 1))  # consecutive speeches
        assert not (min(idx) < 6 <= max(idx))  # never across the scene break
        assert not (3 in idx and 4 in idx)  # never two speeches in a row by one speaker


def test_pairs_reject_a_length_matched_speech_from_another_play():
    convs = build_conversations([_doc("one", ["A", "B"] * 10)], seed=0)
    pool = [("one", "one speech 1 by B"), ("two", "two speech 1 by X"), ("two", "a much longer speech " * 5)]
    pairs = build_pairs(convs, pool, seed=0)
    assert pairs and all(p["rejected"] == "two speech 1 by X" for p in pairs)
    assert all(p["chosen"] == c["messages"][-1]["content"] for p, c in zip(pairs, convs))


def test_embedded_chat_data_keeps_the_validation_plays_apart(corpus, tmp_path):
    meta = prepare_chat_data(corpus, tmp_path)
    assert meta["files"]["sft_train.jsonl"] > 10_000 and meta["files"]["dpo_val.jsonl"] > 1000
    val_sources = {json.loads(line)["source"].split(":")[0] for line in open(tmp_path / "sft_val.jsonl")}
    train_sources = {json.loads(line)["source"].split(":")[0] for line in open(tmp_path / "sft_train.jsonl")}
    assert val_sources == set(VALIDATION_PLAYS) and not train_sources & set(VALIDATION_PLAYS)
    assert len(load_sft(tmp_path / "sft_val.jsonl")) == meta["files"]["sft_val.jsonl"]
    pairs = load_dpo(tmp_path / "dpo_train.jsonl")
    assert all(p["chosen"] != p["rejected"] for p in pairs)


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_load_sft_good(tmp_path):
    path = _write(tmp_path, [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]},
                             "", {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                               {"role": "assistant", "content": "a"}], "extra": 1}])
    assert [len(c) for c in load_sft(path)] == [2, 3]


@pytest.mark.parametrize("line, message", [
    ("{not json", ":2: not valid JSON"),
    ('["a list"]', ":2: each line must be a JSON object"),
    ({"conversation": []}, ":2: expected a 'messages' list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, ":2: message 0 has role 'bot'"),
    ({"messages": [{"role": "user", "content": None}]}, ":2: message 0 content must be a string"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, ":2: the conversation has no assistant"),
])
def test_load_sft_malformed_lines_name_file_and_line(tmp_path, line, message):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]}
    path = _write(tmp_path, [good, line])
    with pytest.raises(HybridGPTError) as e:
        load_sft(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_load_dpo_accepts_trl_variants(tmp_path):
    path = _write(tmp_path, [
        {"prompt": "What light?", "chosen": "The east.", "rejected": "A fish."},
        {"prompt": [{"role": "user", "content": "Who?"}], "chosen": [{"role": "assistant", "content": "I."}],
         "rejected": [{"role": "assistant", "content": "Thee."}]},
    ])
    pairs = load_dpo(path)
    assert pairs[0]["prompt"] == [{"role": "user", "content": "What light?"}]
    assert pairs[1]["chosen"] == "I." and pairs[1]["rejected"] == "Thee."


@pytest.mark.parametrize("line, message", [
    ({"prompt": "p", "chosen": "c"}, "missing rejected"),
    ({"prompt": "p", "chosen": 5, "rejected": "r"}, "'chosen' must be a string"),
    ({"prompt": [{"role": "user"}], "chosen": "c", "rejected": "r"}, "'role' and 'content'"),
    ({"prompt": "p", "chosen": "c", "rejected": [{"role": "user", "content": "r"}]}, "'rejected' must be"),
])
def test_load_dpo_malformed(tmp_path, line, message):
    path = _write(tmp_path, [{"prompt": "p", "chosen": "c", "rejected": "r"}, line])
    with pytest.raises(HybridGPTError, match=":2: .*" if message.startswith("missing") else message) as e:
        load_dpo(path)
    assert f"{path}:2" in str(e.value) and message in str(e.value)


def test_empty_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(HybridGPTError, match="not found"):
        load_sft(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(HybridGPTError, match="no examples"):
        load_dpo(tmp_path / "empty.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe{}")
    with pytest.raises(HybridGPTError, match="not UTF-8"):
        load_sft(tmp_path / "bin.jsonl")


def test_unicode_line_separators_inside_strings_do_not_split_lines(tmp_path):
    row = {"messages": [{"role": "user", "content": "a\u2028b\x85c"}, {"role": "assistant", "content": "d\u2029e"}]}
    path = tmp_path / "sep.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\r\n", encoding="utf-8")
    assert load_sft(path) == [row["messages"]]


def test_chat_data_found_mid_swap_is_recovered_and_compared(corpus, tmp_path):
    from hybrid_gpt.data.chat_data import has_chat_data, is_chat_prepared, prepare_chat_data

    chat = tmp_path / "chat"
    assert not has_chat_data(chat) and not is_chat_prepared(chat, corpus, 1)
    prepare_chat_data(corpus, chat, seed=1)
    chat.rename(tmp_path / "chat.old")  # a crash between the two renames of the swap
    assert is_chat_prepared(chat, corpus, 1) and has_chat_data(chat)
    with pytest.raises(HybridGPTError, match="built differently"):
        is_chat_prepared(chat, corpus, 2)
