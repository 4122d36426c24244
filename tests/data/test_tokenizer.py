import pytest

from hybrid_gpt.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from hybrid_gpt.errors import HybridGPTError

TEXTS = ["ROMEO:\nBut soft, what light through yonder window breaks?\n\n", "JULIET:\nAy me!\n\n"] * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, vocab_size=300)


@pytest.mark.parametrize("text", [
    "", "hello world", "ROMEO:\nO, she doth teach the torches to burn bright!\n\n",
    "naïve café — ünïcödé ✓ 漢字 🙂", "tabs\tand\r\nnewlines\n\n\n", "  leading and trailing  ",
    "<|end|> typed by a user <|user|>",
])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_reserved_and_only_enter_by_id(tok):
    assert sorted(tok.special) == sorted(SPECIAL_TOKENS)
    ids = tok.encode("<|end|>")
    assert tok.end_id not in ids and len(ids) > 1  # literal text stays text
    seq = [tok.bos_id] + tok.encode("hi") + [tok.end_id]
    assert tok.decode(seq) == "hi"
    assert tok.decode(seq, skip_special=False) == "<|bos|>hi<|end|>"


def test_byte_lengths_count_utf8_bytes(tok):
    lengths = tok.token_byte_lengths()
    for text in ["hello", "café 🙂 漢字", "ROMEO:\nAy me!\n\n"]:
        assert lengths[tok.encode(text)].sum() == len(text.encode("utf-8"))
    assert all(lengths[i] == 0 for i in tok.special.values())


def test_save_and_load_round_trip(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(tok.to_str())
    again = Tokenizer.from_file(path)
    assert again.encode("But soft!") == tok.encode("But soft!")
    assert again.sha256() == tok.sha256()
    assert again.vocab_size == tok.vocab_size <= 300


def test_bad_vocab_size_and_bad_file(tmp_path):
    with pytest.raises(HybridGPTError, match="vocab-size"):
        Tokenizer.train(TEXTS, vocab_size=100)
    with pytest.raises(HybridGPTError, match="vocab-size"):
        Tokenizer.train(TEXTS, vocab_size=70000)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(HybridGPTError, match="not a valid tokenizer"):
        Tokenizer.from_file(bad)
    with pytest.raises(HybridGPTError, match="not found"):
        Tokenizer.from_file(tmp_path / "missing.json")


def test_decode_stream_never_splits_a_character(tok):
    text = "café 🙂 漢字, soft!"
    ids = tok.encode(text)
    pieces = list(tok.decode_stream(ids))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
