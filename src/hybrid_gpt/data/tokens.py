"""Token files: `prepare` turns a corpus into a tokenizer plus uint16 memmaps, and the
training loop draws deterministic batches from them.

A batch is a pure function of (seed, step): no sampler state needs saving for an exact resume,
and every DDP rank can draw the same global batch and take its own rows.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hybrid_gpt.data.corpus import Corpus
from hybrid_gpt.data.tokenizer import (
    MAX_VOCAB,
    TOKENIZER_FILES,
    Tokenizer,
    check_vocab_size,
    interruptible,
    load_tokenizer,
    save_tokenizer,
)
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import clip, output_dir, read_json, recover_dir, write_bytes, write_json

logger = logging.getLogger(__name__)

META_VERSION = 1
DATA_FILES = ("meta.json", *TOKENIZER_FILES, "train.bin", "val.bin")  # all a data directory may hold


def prepare_data(corpus: Corpus, out_dir: str | Path, vocab_size: int | None,
                 tokenizer: Tokenizer | None = None, tokenizer_source: str | None = None) -> dict:
    """Train the tokenizer on the training split (or take ``tokenizer``, a checkpoint's, recorded as
    ``tokenizer_source``) and write tokenizer.json, train.bin, val.bin, meta.json.

    Everything is checked, then built in a temporary directory and swapped in whole: until the new
    data is complete, the previous data (which trained checkpoints need) stays as it was, and a
    directory that holds anything else is refused, not replaced.
    """
    out = Path(out_dir)
    if tokenizer is None:
        check_vocab_size(vocab_size)
    elif tokenizer.vocab_size > MAX_VOCAB:
        raise HybridGPTError(f"the tokenizer of {tokenizer_source or 'the checkpoint'} has {tokenizer.vocab_size:,} "
                             f"tokens; token files are uint16, which hold at most {MAX_VOCAB:,}")
    digest = corpus.sha256()
    logger.debug(f"corpus {corpus.source}: {len(corpus.train)} training and {len(corpus.val)} validation documents, "
                 f"sha256 {digest[:12]}")
    with output_dir(out, allowed=DATA_FILES, what="prepared data directory", overwrite=True) as tmp:
        if tokenizer is None:
            t0 = time.time()
            tok = Tokenizer.train((d.text for d in corpus.train), vocab_size)
            logger.info(f"trained a {tok.vocab_size}-token byte-level BPE in {time.time() - t0:.1f}s")
        else:
            tok = tokenizer
            logger.info(f"tokenizing with the {tok.vocab_size}-token tokenizer of {tokenizer_source or 'a checkpoint'}")
        save_tokenizer(tok, tmp)
        meta = {
            "version": META_VERSION,
            "source": corpus.source,
            "corpus_sha256": digest,
            "tokenizer_sha256": tok.sha256(),
            "vocab_size": tok.vocab_size,
            # a small corpus can yield fewer merges than asked for; None: a checkpoint's tokenizer
            "requested_vocab_size": vocab_size if tokenizer is None else None,
            "dtype": "uint16",
            "splits": {},
        }
        if tokenizer is not None:
            meta["tokenizer_source"] = tokenizer_source
        start = [] if tok.doc_start_id is None else [tok.doc_start_id]
        if not start:
            logger.warning("the tokenizer has no token that starts a document: documents follow each other unmarked")
        for split, docs in (("train", corpus.train), ("val", corpus.val)):
            # Each document starts with the tokenizer's doc_start_id (ours: <|bos|>), so that no context window
            # silently spans two plays unmarked.
            encoded = interruptible(tok.encode_batch, [d.text for d in docs])
            arr = np.concatenate([np.asarray([*start, *ids], dtype=np.uint16) for ids in encoded])
            write_bytes(tmp / f"{split}.bin", memoryview(arr))
            meta["splits"][split] = {
                "documents": [d.name for d in docs],
                "tokens": int(arr.size),
                "bytes": int(sum(len(d.text.encode("utf-8")) for d in docs)),
            }
            logger.info(f"{split}: {len(docs)} documents, {arr.size:,} tokens, "
                        f"{meta['splits'][split]['bytes']:,} bytes")
        write_json(tmp / "meta.json", meta)
    return meta


def _field(obj, key: str, t: type, where: str):
    value = obj.get(key)
    if not isinstance(value, t) or (t is int and isinstance(value, bool)):
        kind = {str: "a string", int: "a whole number", dict: "an object"}[t]
        raise HybridGPTError(f"{where} is damaged: '{key}' must be {kind}; re-run `hybrid-gpt prepare --force`")
    return value


# A file that only another kind of directory holds, and what that directory is.
OTHER_KINDS = {"sft_train.jsonl": "a chat data directory (from `hybrid-gpt prepare-chat`)",
               "dpo_train.jsonl": "a chat data directory (from `hybrid-gpt prepare-chat`)",
               "model.safetensors": "a checkpoint", "config.json": "a checkpoint"}


def _other_kind(root: Path) -> str | None:
    """What ``root`` is when it is a directory of another kind than prepared data (chat data, a checkpoint),
    so that the error names the mix-up instead of calling its meta.json damaged."""
    if (root / "train.bin").is_file():
        return None
    return next((what for name, what in OTHER_KINDS.items() if (root / name).is_file()), None)


def read_meta(root: str | Path) -> dict:
    """meta.json of a prepared data directory, checked for the fields every reader relies on."""
    root = Path(root)
    recover_dir(root)
    where = f"{root}/meta.json"
    other = _other_kind(root)
    if other:
        raise HybridGPTError(f"{root} is {other}, not prepared token data: give a directory written by "
                             "`hybrid-gpt prepare` instead (by default <run-dir>/data), e.g. with --data")
    if not (root / "meta.json").is_file():
        raise HybridGPTError(f"no prepared data in {root}; run `hybrid-gpt prepare` first (or pass --data DIR)")
    meta = read_json(root / "meta.json", "data meta file")
    if not isinstance(meta, dict):
        raise HybridGPTError(f"{where} is damaged: it must be a JSON object; re-run `hybrid-gpt prepare --force`")
    for key in ("source", "tokenizer_sha256"):
        _field(meta, key, str, where)
    vocab = _field(meta, "vocab_size", int, where)
    if not 0 < vocab <= MAX_VOCAB:
        raise HybridGPTError(f"{where} is damaged: vocab_size {vocab} does not fit uint16 token files")
    splits = _field(meta, "splits", dict, where)
    for split in ("train", "val"):
        tokens = _field(_field(splits, split, dict, f"{where} splits"), "tokens", int, f"{where} splits.{split}")
        if tokens < 0:
            raise HybridGPTError(f"{where} is damaged: splits.{split}.tokens is negative")
    return meta


@dataclass
class TokenData:
    """A prepared data directory: tokenizer, train/val memmaps and their meta."""

    root: Path
    meta: dict
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray

    def sha256(self) -> str:
        """The data's identity wherever its directory lies: a digest of its meta (corpus, tokenizer, splits)."""
        import hashlib

        return hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode()).hexdigest()

    @classmethod
    def open(cls, root: str | Path) -> "TokenData":
        """Open and check a prepared data directory: meta.json's shape, the tokenizer it names, and token files
        of the recorded lengths (at least two tokens each: one to predict from, one to predict) whose
        ids are all in the vocabulary, so that no later step indexes out of the embedding."""
        root = Path(root)
        meta = read_meta(root)
        tok = load_tokenizer(root)
        if meta["tokenizer_sha256"] != tok.sha256() or meta["vocab_size"] != tok.vocab_size:
            raise HybridGPTError(f"{root}/tokenizer.json does not match meta.json; re-run `hybrid-gpt prepare`")
        arrays = {}
        for split in ("train", "val"):
            path = root / f"{split}.bin"
            expected = meta["splits"][split]["tokens"]
            if not path.is_file() or path.stat().st_size != 2 * expected:
                raise HybridGPTError(f"{path} is missing or truncated; re-run `hybrid-gpt prepare`")
            if expected < 2:
                raise HybridGPTError(f"{path} holds {expected} token{'s' * (expected != 1)}: at least 2 are needed "
                                     "(one to predict from, one to predict); prepare a larger corpus")
            arrays[split] = np.memmap(path, dtype=np.uint16, mode="r")
            top = int(arrays[split].max())
            if top >= tok.vocab_size:
                raise HybridGPTError(f"{path} holds token id {top}, outside the vocabulary of {tok.vocab_size}; "
                                     "it is damaged or from other data: re-run `hybrid-gpt prepare --force`")
        return cls(root=root, meta=meta, tokenizer=tok, train=arrays["train"], val=arrays["val"])

    def split(self, name: str) -> np.ndarray:
        return self.train if name == "train" else self.val


def batch_offsets(n_tokens: int, block_size: int, rows: int, seed: int, step: int) -> np.ndarray:
    """Start offsets of the ``rows`` windows of step ``step``: the same on every rank and every resume."""
    high = n_tokens - block_size - 1
    if high <= 0:
        raise HybridGPTError(
            f"the training split has {n_tokens} tokens, too few for a context of {block_size}; "
            "use a larger corpus or a smaller --block-size"
        )
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, high + 1, size=rows)


def get_batch(tokens: np.ndarray, offsets: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    windows = np.stack([tokens[o : o + block_size + 1] for o in offsets]).astype(np.int64)
    t = torch.from_numpy(windows)
    return t[:, :-1], t[:, 1:]


def is_prepared(out_dir: str | Path, corpus: Corpus, vocab_size: int | None,
                tokenizer: Tokenizer | None = None) -> bool:
    """Whether ``out_dir`` already holds this corpus prepared at this vocabulary, or with ``tokenizer``
    (False: nothing there).

    Raises if it holds other data: checkpoints trained on it need it, so it is never replaced silently.
    """
    out_dir = Path(out_dir)
    recover_dir(out_dir)
    if not (out_dir / "meta.json").is_file():
        return False
    meta = read_meta(out_dir)
    if tokenizer is not None:
        same_vocab = meta["tokenizer_sha256"] == tokenizer.sha256()
    else:
        same_vocab = meta.get("requested_vocab_size", meta.get("vocab_size")) == vocab_size
    if meta.get("corpus_sha256") == corpus.sha256() and same_vocab:
        return True
    raise HybridGPTError(
        f"{out_dir} already holds data prepared from {clip(meta['source'])} with vocabulary {meta['vocab_size']}; "
        "pass --force to replace it, or --run-dir/--out to prepare elsewhere"
    )


def ensure_prepared(data_dir: Path, preset: str, tag: str = "pipeline") -> Corpus:
    """Prepare the embedded corpus into ``data_dir`` at the preset's vocabulary unless it is already
    there (see :func:`is_prepared`); returns the corpus."""
    from hybrid_gpt.data.corpus import load_shakespeare
    from hybrid_gpt.presets import get_preset

    corpus = load_shakespeare()
    vocab_size = get_preset(preset)["vocab_size"]
    if not is_prepared(data_dir, corpus, vocab_size):
        logger.info(f"[{tag}] prepare -> {data_dir}")
        prepare_data(corpus, data_dir, vocab_size)
    return corpus
