"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with the chat special tokens reserved.

Special tokens are reserved at training time so that SFT and DPO need no re-tokenisation. Ordinary
text is always encoded with special-token matching switched off: a literal "<|end|>" typed by a user
becomes plain bytes, never the control token; control tokens enter a sequence only by id.

Text is cut inside runs of more than MAX_RUN characters without whitespace (or of whitespace alone)
before training and encoding alike: BPE training costs about the square of a pre-token's length, so
one long run (a CJK paragraph, a base64 blob) would otherwise take hours. Natural text has no such
runs (Shakespeare's longest is 46), so its tokenizer and its token ids are the same as without the cut.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import clip, read_text

BOS, SYSTEM, USER, ASSISTANT, END = "<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (BOS, SYSTEM, USER, ASSISTANT, END)
MAX_VOCAB = 2**16  # token files are uint16
MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 1  # the byte alphabet, the special tokens and one merge
TOKENIZER_LIMIT = 64 << 20  # bytes of tokenizer.json; one of MAX_VOCAB tokens is a few MB
MAX_RUN = 64  # characters: longer runs are cut into pieces this long (see the module docstring)
# Whitespace as the byte-level pre-tokenizer's regex (Rust, Unicode White_Space) sees it, which differs
# from Python's \s (that also counts U+001C..U+001F): a run we do not cut must be no longer in its eyes.
_WS = "\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_LONG_RUN = re.compile(f"[^{_WS}]{{{MAX_RUN + 1},}}|[{_WS}]{{{MAX_RUN + 1},}}")


def pieces(text: str) -> list[str]:
    """``text`` cut every MAX_RUN characters inside longer runs, so that no pre-token is longer than
    MAX_RUN + 1 (a leading space joins a word); joined, the pieces are ``text`` again."""
    cuts = [c for m in _LONG_RUN.finditer(text) for c in range(m.start() + MAX_RUN, m.end(), MAX_RUN)]
    if not cuts:
        return [text]
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def interruptible(fn, *args):
    """``fn(*args)`` in a worker thread that the main thread waits for in short joins.

    The Rust code of `tokenizers` runs for minutes without returning to Python, so a Ctrl-C would only
    land after it; a join with a timeout lets the KeyboardInterrupt through at once (the worker, a
    daemon, dies with the process).
    """
    result: dict = {}

    def work():
        try:
            result["value"] = fn(*args)
        except BaseException as e:  # handed to the caller's thread
            result["error"] = e

    worker = threading.Thread(target=work, daemon=True, name="tokenizers")
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
    if "error" in result:
        raise result["error"]
    return result["value"]


def check_vocab_size(vocab_size: int) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise HybridGPTError(f"vocab_size must be between {MIN_VOCAB} and {MAX_VOCAB}, got {clip(vocab_size)}")


def check_unicode(text: str, what: str) -> None:
    """Refuse text that is not valid Unicode: a lone surrogate (JSON's "\\ud800") cannot be encoded."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise HybridGPTError(f"{what} holds a lone surrogate ({ascii(text[e.start])}), which is not a character; "
                             "fix the text's encoding") from None


class Tokenizer:
    """A thin wrapper: encode/decode ordinary text, special ids by name, bytes per token."""

    def __init__(self, hf: HFTokenizer):
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise HybridGPTError(f"tokenizer lacks the special tokens {missing}; re-run `hybrid-gpt prepare`")
        hf.encode_special_tokens = True  # ordinary text never yields control tokens
        self.hf = hf
        self.special = {t: hf.token_to_id(t) for t in SPECIAL_TOKENS}

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Train on ``texts`` (cut into :func:`pieces`); interruptible by Ctrl-C."""
        check_vocab_size(vocab_size)
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        interruptible(lambda: hf.train_from_iterator((p for t in texts for p in pieces(t)), trainer=trainer))
        return cls(hf)

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        return cls.from_str(read_text(path, "tokenizer file", TOKENIZER_LIMIT), where=f"tokenizer file {path}")

    @classmethod
    def from_str(cls, text: str, where: str = "tokenizer") -> "Tokenizer":
        try:
            hf = HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise HybridGPTError(f"{where} is not a valid tokenizer.json ({clip(e, 120)})") from e
        return cls(hf)

    def to_str(self) -> str:
        return self.hf.to_str()

    def sha256(self) -> str:
        import hashlib

        # Canonical JSON, so that formatting differences do not change the identity.
        return hashlib.sha256(json.dumps(json.loads(self.to_str()), sort_keys=True).encode()).hexdigest()

    # -- use ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self.special[BOS]

    @property
    def end_id(self) -> int:
        return self.special[END]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (cut into :func:`pieces` as in training); a text that is not valid
        Unicode (a lone surrogate from JSON's "\\ud800") is a one-line error."""
        for i, t in enumerate(texts):
            check_unicode(t, "the text" if len(texts) == 1 else f"text {i + 1}")
        split = [pieces(t) for t in texts]
        flat = [p for ps in split for p in ps]
        if len(flat) == 1:
            encoded = [self.hf.encode(flat[0], add_special_tokens=False)]
        else:
            encoded = self.hf.encode_batch(flat, add_special_tokens=False)
        out, i = [], 0
        for ps in split:
            ids = []
            for e in encoded[i:i + len(ps)]:
                ids.extend(e.ids)
            out.append(ids)
            i += len(ps)
        return out

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def decode_stream(self, ids) -> Iterator[str]:
        """Text pieces as token ids arrive, holding back a partial UTF-8 character until it is whole."""
        out: list[int] = []
        printed = ""
        for i in ids:
            out.append(int(i))
            text = self.decode(out)
            if not text.endswith("\ufffd"):
                yield text[len(printed):]
                printed = text
        rest = self.decode(out)[len(printed):]
        if rest:
            yield rest

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token stands for (0 for special tokens), for bits-per-byte.

        In byte-level BPE every character of a token's string stands for exactly one byte.
        """
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        specials = set(self.special.values())
        for token, idx in self.hf.get_vocab(with_added_tokens=True).items():
            lengths[idx] = 0 if idx in specials else len(token)
        return lengths
