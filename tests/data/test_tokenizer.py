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
    with pytest.raises(HybridGPTError, match="vocab_size must be between"):
        Tokenizer.train(TEXTS, vocab_size=100)
    with pytest.raises(HybridGPTError, match="vocab_size must be between"):
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


# -- long runs without whitespace: bounded pre-tokens, so that BPE training stays linear ----------------

LONG_RUNS = [
    "a" * 5000, "漢字" * 3000, "0123456789" * 500, "!?" * 2000, "x" * 70 + " " * 300 + "y" * 65,
    "\x1c!" * 2000,  # Python counts U+001C as whitespace, the pre-tokenizer does not: still cut
    "word " * 50 + "b" * 1000 + "\n" * 200 + "tail", "🙂" * 700, " " + "q" * 64, "é" * 129,
]


@pytest.mark.parametrize("text", LONG_RUNS)
def test_pieces_bound_every_pre_token_and_join_back(tok, text):
    from hybrid_gpt.data.tokenizer import MAX_RUN, pieces

    parts = pieces(text)
    assert "".join(parts) == text
    # Lengths in characters of the original text (the offsets), as the trainer sees them piece by piece.
    longest = max(end - start for p in parts for _, (start, end) in tok.hf.pre_tokenizer.pre_tokenize_str(p))
    assert longest <= MAX_RUN + 1
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([text, "hi", text]) == [tok.encode(text), tok.encode("hi"), tok.encode(text)]


def test_without_the_cut_a_long_run_is_one_pre_token(tok):
    """The property the cut is for: the byte-level regex alone keeps a run whole, however long."""
    (only, _), = tok.hf.pre_tokenizer.pre_tokenize_str("a" * 5000)
    assert len(only) == 5000


def test_the_embedded_corpus_is_never_cut(corpus):
    """So its tokenizer and token ids are exactly those the committed results were produced with."""
    from hybrid_gpt.data.tokenizer import pieces

    assert all(pieces(d.text) == [d.text] for d in corpus.train + corpus.val)


def test_training_on_long_runs_gives_a_tokenizer_that_round_trips():
    text = "".join(chr(0x4E00 + (i * 7919) % 2000) for i in range(20_000))  # 20,000 CJK characters, no space
    trained = Tokenizer.train([text, "ROMEO:\nBut soft!\n\n"], vocab_size=400)
    assert trained.vocab_size == 400 and trained.decode(trained.encode(text)) == text


def test_training_can_be_interrupted():
    """Ctrl-C lands while the worker (here: a sleep standing in for the Rust trainer) is still busy."""
    import os
    import signal
    import threading
    import time

    from hybrid_gpt.data.tokenizer import interruptible

    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))

    def busy():  # the timer starts once the worker runs, so the signal cannot land before interruptible waits
        timer.start()
        time.sleep(20)

    # Python's own Ctrl-C handler, even when the suite runs in a background job that inherits SIGINT ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        t0 = time.time()
        with pytest.raises(KeyboardInterrupt):
            interruptible(busy)
        assert time.time() - t0 < 10
        timer.join()
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_worker_error_reaches_the_caller():
    from hybrid_gpt.data.tokenizer import interruptible

    with pytest.raises(ZeroDivisionError):
        interruptible(lambda: 1 / 0)


def test_lone_surrogates_are_refused(tok):
    with pytest.raises(HybridGPTError, match=r"holds a lone surrogate \('\\ud800'\)"):
        tok.encode("a\ud800b")


def test_vocab_size_is_checked_before_training():
    with pytest.raises(HybridGPTError, match="between 262 and 65536, got 70000"):
        Tokenizer.train(iter(()), 70000)


# -- tokenizers that bring their own special tokens and template ------------------------------------------------

def test_a_chatml_tokenizer_brings_its_special_tokens_and_template():
    from data.chatml import CHATML_SPECIALS, chatml_tokenizer

    from hybrid_gpt.data.template import chatml_template

    tok = chatml_tokenizer(None)
    assert tok.special == {t: i for i, t in enumerate(CHATML_SPECIALS)} and tok.template == chatml_template()
    assert (tok.bos_id, tok.end_id, tok.doc_start_id) == (None, 2, 0)
    assert tok.stop_ids == {0, 1, 2}
    ids = tok.encode("<|im_end|><|endoftext|><repo_name>")
    assert not set(ids) & set(tok.special.values()) and tok.decode(ids) == "<|im_end|><|endoftext|><repo_name>"


def test_without_our_tokens_or_a_template_there_is_no_chat():
    """A GPT-2 style tokenizer: its text works, <|endoftext|> starts documents, chat is a one-line error."""
    from data.chatml import chatml_hf

    from hybrid_gpt.data.template import render

    tok = Tokenizer(chatml_hf())
    assert tok.template is None and tok.bos_id is None and tok.doc_start_id == 0
    assert tok.decode(tok.encode("But soft!")) == "But soft!"
    with pytest.raises(HybridGPTError, match=r"tokenizer lacks the special tokens \['<\|bos\|>'.*no chat template"):
        render(tok, [{"role": "user", "content": "hi"}])
    with pytest.raises(HybridGPTError, match="lacks the special tokens"):
        tok.stop_ids


def test_a_template_whose_tokens_the_tokenizer_lacks_is_refused(tok):
    from data.chatml import chatml_hf

    from hybrid_gpt.data.template import HYBRID_TEMPLATE, chatml_template

    with pytest.raises(HybridGPTError, match=r"lacks the special token that opens its turns \('<\|system\|>'\)"):
        Tokenizer(chatml_hf(), HYBRID_TEMPLATE)
    with pytest.raises(HybridGPTError, match="lacks the special token that opens its turns"):
        Tokenizer.from_str(tok.to_str(), template=chatml_template())


def test_a_tokenizer_that_is_not_byte_level_bpe_is_refused(tok):
    import json

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    wordpiece = HFTokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(HybridGPTError, match=r"not a byte-level BPE \(WordPiece model, no decoder\); hybrid-gpt "
                                             "supports byte-level BPE tokenizers"):
        Tokenizer(wordpiece)
    sentencepiece_like = HFTokenizer.from_str(tok.to_str())
    sentencepiece_like.decoder = decoders.Metaspace()
    with pytest.raises(HybridGPTError, match=r"\(BPE model, Metaspace decoder\)"):
        Tokenizer(sentencepiece_like)
    raw = json.loads(tok.to_str())
    raw["decoder"] = None
    with pytest.raises(HybridGPTError, match="not a byte-level BPE"):
        Tokenizer.from_str(json.dumps(raw))


def test_byte_lengths_count_added_tokens_by_their_text():
    """Special added tokens stand for no bytes; one that is not special matches its text, so counts its bytes."""
    from data.chatml import chatml_hf
    from tokenizers import AddedToken

    hf = chatml_hf()
    hf.add_tokens([AddedToken("naïve café", special=False)])
    tok = Tokenizer(hf)
    lengths = tok.token_byte_lengths()
    for text in ["a naïve café 🙂 here", "<|im_start|>user\n1603", "ROMEO:\nAy me!\n\n"]:
        ids = tok.encode(text)
        assert lengths[ids].sum() == len(text.encode("utf-8"))
    assert hf.token_to_id("naïve café") in tok.encode("a naïve café")
    assert all(lengths[i] == 0 for i in tok.special.values()) and len(tok.special) == 4
    assert not lengths.flags.writeable


def test_a_sampled_prompt_starts_with_the_templates_bos_if_it_has_one(tok):
    from data.chatml import chatml_hf, chatml_tokenizer

    bos = tok.special["<|bos|>"]
    assert tok.prompt_ids("ROMEO:") == [bos] + tok.encode("ROMEO:") and tok.prompt_ids("") == [bos]
    chatml = chatml_tokenizer()
    assert chatml.prompt_ids("ROMEO:") == chatml.encode("ROMEO:") and chatml.prompt_ids("") == [0]  # <|endoftext|>
    raw = Tokenizer(chatml_hf()).to_str().replace("<|endoftext|>", "<|unused|>")  # no template, no <|endoftext|>
    with pytest.raises(HybridGPTError, match="an empty prompt needs a token to start from"):
        Tokenizer.from_str(raw).prompt_ids("")
