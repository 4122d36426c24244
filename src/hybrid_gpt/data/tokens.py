"""Token files: `prepare` turns a corpus into a tokenizer plus uint16 memmaps, and the
training loop draws deterministic batches from them.

A batch is a pure function of (seed, step): no sampler state needs saving for an exact resume,
and every DDP rank can draw the same global batch and take its own rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hybrid_gpt.data.corpus import Corpus
from hybrid_gpt.data.tokenizer import MAX_VOCAB, Tokenizer
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import atomic_path, read_json, write_json, write_text

META_VERSION = 1


def prepare_data(corpus: Corpus, out_dir: str | Path, vocab_size: int, log=print) -> dict:
    """Train the tokenizer on the training split and write tokenizer.json, train.bin, val.bin, meta.json.

    meta.json is written last, so its presence marks a complete data directory.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Until the new meta.json lands, the directory must not pass for complete.
    (out / "meta.json").unlink(missing_ok=True)
    t0 = time.time()
    tok = Tokenizer.train((d.text for d in corpus.train), vocab_size)
    log(f"trained a {tok.vocab_size}-token byte-level BPE in {time.time() - t0:.1f}s")
    write_text(out / "tokenizer.json", tok.to_str())
    meta = {
        "version": META_VERSION,
        "source": corpus.source,
        "corpus_sha256": corpus.sha256(),
        "tokenizer_sha256": tok.sha256(),
        "vocab_size": tok.vocab_size,
        "requested_vocab_size": vocab_size,  # a small corpus can yield fewer merges than asked for
        "dtype": "uint16",
        "splits": {},
    }
    for split, docs in (("train", corpus.train), ("val", corpus.val)):
        # Each document starts with <|bos|>, so that no context window silently spans two plays unmarked.
        ids = []
        for doc_ids in tok.encode_batch([d.text for d in docs]):
            ids.append(tok.bos_id)
            ids.extend(doc_ids)
        arr = np.asarray(ids, dtype=np.uint16)
        with atomic_path(out / f"{split}.bin") as tmp:
            arr.tofile(tmp)
        meta["splits"][split] = {
            "documents": [d.name for d in docs],
            "tokens": int(arr.size),
            "bytes": int(sum(len(d.text.encode("utf-8")) for d in docs)),
        }
        log(f"{split}: {len(docs)} documents, {arr.size:,} tokens, {meta['splits'][split]['bytes']:,} bytes")
    write_json(out / "meta.json", meta)
    return meta


@dataclass
class TokenData:
    """A prepared data directory: tokenizer, train/val memmaps and their meta."""

    root: Path
    meta: dict
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray

    @classmethod
    def open(cls, root: str | Path) -> "TokenData":
        root = Path(root)
        if not (root / "meta.json").is_file():
            raise HybridGPTError(f"no prepared data in {root}; run `hybrid-gpt prepare` first (or pass --data DIR)")
        meta = read_json(root / "meta.json", "data meta file")
        tok = Tokenizer.from_file(root / "tokenizer.json")
        if meta.get("tokenizer_sha256") != tok.sha256():
            raise HybridGPTError(f"{root}/tokenizer.json does not match meta.json; re-run `hybrid-gpt prepare`")
        if tok.vocab_size > MAX_VOCAB:
            raise HybridGPTError(f"vocabulary of {tok.vocab_size} does not fit uint16 token files")
        arrays = {}
        for split in ("train", "val"):
            path = root / f"{split}.bin"
            expected = meta["splits"][split]["tokens"]
            if not path.is_file() or path.stat().st_size != 2 * expected:
                raise HybridGPTError(f"{path} is missing or truncated; re-run `hybrid-gpt prepare`")
            arrays[split] = np.memmap(path, dtype=np.uint16, mode="r")
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


def is_prepared(out_dir: str | Path, corpus: Corpus, vocab_size: int) -> bool:
    """Whether ``out_dir`` already holds this corpus prepared at this vocabulary (False: nothing there).

    Raises if it holds other data: checkpoints trained on it need it, so it is never replaced silently.
    """
    out_dir = Path(out_dir)
    if not (out_dir / "meta.json").is_file():
        return False
    meta = read_json(out_dir / "meta.json", "data meta file")
    same_vocab = meta.get("requested_vocab_size", meta.get("vocab_size")) == vocab_size
    if meta.get("corpus_sha256") == corpus.sha256() and same_vocab:
        return True
    raise HybridGPTError(
        f"{out_dir} already holds data prepared from {meta.get('source')} with vocabulary {meta.get('vocab_size')}; "
        "pass --force to replace it, or --run-dir/--out to prepare elsewhere"
    )


def ensure_prepared(data_dir: Path, preset: str, log=print, tag: str = "pipeline") -> Corpus:
    """Prepare the embedded corpus into ``data_dir`` at the preset's vocabulary unless it is already
    there (see :func:`is_prepared`); returns the corpus."""
    from hybrid_gpt.data.corpus import load_shakespeare
    from hybrid_gpt.presets import get_preset

    corpus = load_shakespeare()
    vocab_size = get_preset(preset)["vocab_size"]
    if not is_prepared(data_dir, corpus, vocab_size):
        log(f"[{tag}] prepare -> {data_dir}")
        prepare_data(corpus, data_dir, vocab_size, log=log)
    return corpus
