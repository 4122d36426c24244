import json

import numpy as np
import pytest

from hybrid_gpt.data.tokens import TokenData, batch_offsets, get_batch
from hybrid_gpt.errors import HybridGPTError


def test_prepared_files_are_consistent(smoke_run, corpus):
    data = TokenData.open(smoke_run / "data")
    meta = json.loads((smoke_run / "data" / "meta.json").read_text())
    assert meta["vocab_size"] == data.tokenizer.vocab_size == 512
    assert meta["splits"]["val"]["documents"] == [d.name for d in corpus.val]
    assert meta["splits"]["train"]["tokens"] == len(data.train)
    assert data.train.dtype == np.uint16
    # Bytes per split are those of the rendered text, and the token files decode back to it.
    assert meta["splits"]["val"]["bytes"] == len(corpus.split_text("val").encode())
    assert data.tokenizer.decode(data.val) == corpus.split_text("val")
    assert int(data.tokenizer.token_byte_lengths()[data.val].sum()) == meta["splits"]["val"]["bytes"]
    assert data.val[0] == data.tokenizer.bos_id  # each document starts with <|bos|>


def test_truncated_token_file_is_refused(smoke_run, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(smoke_run / "data", copy)
    with open(copy / "val.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(HybridGPTError, match="truncated"):
        TokenData.open(copy)
    with pytest.raises(HybridGPTError, match="run `hybrid-gpt prepare`"):
        TokenData.open(tmp_path / "nowhere")


def test_batches_are_a_pure_function_of_seed_and_step():
    a = batch_offsets(10_000, 32, 8, seed=1, step=5)
    assert np.array_equal(a, batch_offsets(10_000, 32, 8, seed=1, step=5))
    assert not np.array_equal(a, batch_offsets(10_000, 32, 8, seed=1, step=6))
    assert not np.array_equal(a, batch_offsets(10_000, 32, 8, seed=2, step=5))
    assert a.min() >= 0 and a.max() <= 10_000 - 33


def test_get_batch_shifts_targets_by_one():
    tokens = np.arange(100, dtype=np.uint16)
    x, y = get_batch(tokens, np.array([0, 10]), 8)
    assert x.shape == y.shape == (2, 8)
    assert x[1, 0] == 10 and y[1, 0] == 11 and y[1, -1] == 18


def test_too_little_data_for_the_context():
    with pytest.raises(HybridGPTError, match="too few"):
        batch_offsets(20, 32, 4, seed=0, step=0)


def test_prepare_with_a_checkpoints_tokenizer_round_trips_through_eval(tmp_path, capsys):
    """`prepare --tokenizer CKPT` tokenizes a corpus with the checkpoint's tokenizer (documents start with its
    <|endoftext|>), so `eval CKPT --data` accepts the data and reports bits per byte for that tokenizer."""
    from data.chatml import chatml_checkpoint

    from hybrid_gpt.checkpoint import checkpoint_data
    from hybrid_gpt.cli import main

    ckpt = tmp_path / "imported"
    tok = chatml_checkpoint(ckpt)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = {"a": "ROMEO:\nBut soft, what light through yonder window breaks?\n" * 30, "b": "JULIET:\nAy me! 1603\n"}
    for name, text in texts.items():
        (corpus / f"{name}.txt").write_text(text)
    data = tmp_path / "data"
    argv = ["prepare", "--corpus", corpus, "--tokenizer", ckpt, "--out", data]
    assert main([str(a) for a in argv]) == 0
    meta = json.loads((data / "meta.json").read_text())
    assert meta["tokenizer_source"] == str(ckpt.resolve()) and meta["requested_vocab_size"] is None
    assert meta["vocab_size"] == tok.vocab_size and meta["tokenizer_sha256"] == tok.sha256()
    opened = TokenData.open(data)
    assert list(opened.val[:1]) == [tok.special["<|endoftext|>"]] and list(opened.train).count(0) == 1
    assert tok.decode(opened.val) == texts["b"]
    assert int(tok.token_byte_lengths()[opened.val].sum()) == meta["splits"]["val"]["bytes"]
    assert checkpoint_data(ckpt, tok, {}, data).root == data
    capsys.readouterr()
    assert main(["eval", str(ckpt), "--data", str(data), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["bytes"] == meta["splits"]["val"]["bytes"] and res["bpb"] > 0
    # the same again is already there; another tokenizer, or a vocabulary besides, is refused
    assert main([str(a) for a in argv]) == 0 and "already prepared" in capsys.readouterr().out
    assert main([str(a) for a in argv[:-2] + ["--out", tmp_path / "other", "--vocab-size", "300"]]) == 2
    assert "--vocab-size or --tokenizer, not both" in capsys.readouterr().err
    assert main([str(a) for a in ["prepare", "--corpus", corpus, "--out", data, "--vocab-size", "300"]]) == 2
    assert "pass --force to replace it" in capsys.readouterr().err
    # The data keeps the tokenizer's chat template: a model trained on it can still chat.
    assert (data / "chat_template.json").is_file() and opened.tokenizer.template == tok.template
    # Without --out (or --run-dir), the data goes beside the checkpoint, where `eval CKPT` looks for it.
    capsys.readouterr()
    assert main([str(a) for a in ["prepare", "--corpus", corpus, "--tokenizer", ckpt]]) == 0
    assert f"{tmp_path / 'data'} is already prepared" in capsys.readouterr().out


def test_prepare_refuses_a_tokenizer_too_large_for_token_files(tmp_path):
    from unittest import mock

    from data.chatml import chatml_tokenizer

    from hybrid_gpt.data.corpus import Corpus, Document
    from hybrid_gpt.data.tokens import prepare_data

    tok = chatml_tokenizer()
    doc = Document(name="a", text="Ay me!\n")
    with mock.patch.object(type(tok), "vocab_size", 70_000), pytest.raises(
            HybridGPTError, match="has 70,000 tokens; token files are uint16, which hold at most 65,536"):
        prepare_data(Corpus(source="x", train=[doc], val=[doc]), tmp_path / "data", None, tokenizer=tok,
                     tokenizer_source="big")
    assert not (tmp_path / "data").exists()
