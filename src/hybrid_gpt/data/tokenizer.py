"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with the chat special tokens reserved.

Special tokens are reserved at training time so that SFT and DPO need no re-tokenisation. Ordinary
text is always encoded with special-token matching switched off: a literal "<|end|>" typed by a user
becomes plain bytes, never the control token; control tokens enter a sequence only by id.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from hybrid_gpt.errors import HybridGPTError

BOS, SYSTEM, USER, ASSISTANT, END = "<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (BOS, SYSTEM, USER, ASSISTANT, END)
MAX_VOCAB = 2**16  # token files are uint16


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
    def train(cls, texts, vocab_size: int) -> "Tokenizer":
        if not 256 + len(SPECIAL_TOKENS) < vocab_size <= MAX_VOCAB:
            raise HybridGPTError(
                f"--vocab-size must be between {256 + len(SPECIAL_TOKENS) + 1} and {MAX_VOCAB}, got {vocab_size}"
            )
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise HybridGPTError(f"tokenizer file {path} not found")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise HybridGPTError(f"tokenizer file {path} is not a valid tokenizer.json ({e})") from e
        return cls(hf)

    @classmethod
    def from_str(cls, text: str) -> "Tokenizer":
        return cls(HFTokenizer.from_str(text))

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
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

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
