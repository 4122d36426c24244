"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) and the chat template that goes with it.

Ours reserves the special tokens of our chat template at training time, so that SFT and DPO need no
re-tokenisation; an imported checkpoint brings its own tokenizer, special tokens and template (any
byte-level BPE: GPT-2, Llama 3, SmolLM2 style). Ordinary text is always encoded with special-token matching
switched off: a literal "<|end|>" typed by a user becomes plain bytes, never the control token; control
tokens enter a sequence only by id.

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
from functools import cached_property
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from hybrid_gpt.data.config import MAX_VOCAB
from hybrid_gpt.data.template import HYBRID_TEMPLATE, ROLES, SPECIAL_TOKENS, ChatTemplate
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import clip, read_json, read_text, write_json, write_text

MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 1  # the byte alphabet, the special tokens and one merge
TOKENIZER_LIMIT = 64 << 20  # bytes of tokenizer.json; one of MAX_VOCAB tokens is a few MB
DOC_END = "<|endoftext|>"  # starts documents in token files when the tokenizer has no chat template (GPT-2)
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
    """A thin wrapper: encode/decode ordinary text, special ids by name, bytes per token, and the chat
    template (``template``; default: ours when the tokenizer has its five special tokens, else none)."""

    def __init__(self, hf: HFTokenizer, template: ChatTemplate | None = None):
        if not isinstance(hf.model, models.BPE) or not isinstance(hf.decoder, decoders.ByteLevel):
            kind = f"{type(hf.model).__name__} model, {type(hf.decoder).__name__ if hf.decoder else 'no'} decoder"
            raise HybridGPTError(f"the tokenizer is not a byte-level BPE ({kind}); hybrid-gpt supports byte-level "
                                 "BPE tokenizers (a BPE model with the ByteLevel decoder: GPT-2, Llama 3, SmolLM2)")
        hf.encode_special_tokens = True  # ordinary text never yields control tokens
        self.hf = hf
        self.special = {t.content: i for i, t in sorted(hf.get_added_tokens_decoder().items()) if t.special}
        if template is None and all(t in self.special for t in SPECIAL_TOKENS):
            template = HYBRID_TEMPLATE
        self.template = template
        if template is not None:
            self._check_template(template)

    def _check_template(self, template: ChatTemplate) -> None:
        """The template's structural tokens must be special tokens of this tokenizer."""
        needed = [(f"its turns ({clip(repr(template.turn(r)))})", template.turn(r)) for r in ROLES]
        needed.append((f"turn_end ({clip(repr(template.turn_end))})", template.turn_end))
        for what, text in needed:
            if not isinstance(self.split_special(text)[0], int):
                raise HybridGPTError(f"the tokenizer lacks the special token that opens {what} in the chat template "
                                     f"{clip(repr(template.name))}")
        if template.bos is not None and template.bos not in self.special:
            raise HybridGPTError(f"the tokenizer lacks the special token {clip(repr(template.bos))} that opens the "
                                 f"chat template {clip(repr(template.name))}")

    def chat_template(self) -> ChatTemplate:
        """The chat template; a one-line error when there is none (a tokenizer without our special tokens
        and no template of its own: a GPT-2 import, or a damaged tokenizer.json)."""
        if self.template is None:
            missing = [t for t in SPECIAL_TOKENS if t not in self.special]
            raise HybridGPTError(f"tokenizer lacks the special tokens {missing} and has no chat template of its "
                                 "own; re-run `hybrid-gpt prepare`, or use a checkpoint with chat_template.json")
        return self.template

    @cached_property
    def _special_re(self) -> re.Pattern | None:
        if not self.special:
            return None
        return re.compile("|".join(re.escape(t) for t in sorted(self.special, key=len, reverse=True)))

    def split_special(self, text: str) -> list[int | str]:
        """``text`` cut at this tokenizer's special tokens: their ids, and the text between them (for
        template strings only; ordinary text never yields control tokens)."""
        if self._special_re is None:
            return [text] if text else []
        out: list[int | str] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                out.append(text[pos:m.start()])
            out.append(self.special[m.group()])
            pos = m.end()
        if pos < len(text):
            out.append(text[pos:])
        return out

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
    def from_file(cls, path: str | Path, template: ChatTemplate | None = None) -> "Tokenizer":
        path = Path(path)
        return cls.from_str(read_text(path, "tokenizer file", TOKENIZER_LIMIT), where=f"tokenizer file {path}",
                            template=template)

    @classmethod
    def from_str(cls, text: str, where: str = "tokenizer", template: ChatTemplate | None = None) -> "Tokenizer":
        try:
            hf = HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise HybridGPTError(f"{where} is not a valid tokenizer.json ({clip(e, 120)})") from e
        return cls(hf, template)

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
    def bos_id(self) -> int | None:
        """The id opening every rendering and sampled prompt: the template's bos (ours: <|bos|>; ChatML: none)."""
        template = self.template
        return self.special[template.bos] if template is not None and template.bos is not None else None

    @property
    def end_id(self) -> int:
        """The id that closes a turn (<|end|>, <|im_end|>), also the padding of batches."""
        return self.split_special(self.chat_template().turn_end)[0]

    @property
    def stop_ids(self) -> set[int]:
        """Ids that end a reply: the template's turn end and those of its stop tokens the tokenizer has."""
        return {self.end_id} | {self.special[t] for t in self.chat_template().stop if t in self.special}

    @property
    def doc_start_id(self) -> int | None:
        """The id starting each document in token files: the template's doc_start (ours: <|bos|>; ChatML:
        <|endoftext|>), without a template <|endoftext|>; None when the tokenizer has neither."""
        token = self.template.doc_start if self.template is not None else DOC_END
        return self.special.get(token) if token is not None else None

    def prompt_ids(self, text: str) -> list[int]:
        """The ids a sampled continuation of ``text`` starts from: the template's bos, if it has one (ours:
        <|bos|>; ChatML: none), then the text's; an empty text without a bos starts at doc_start_id."""
        ids = ([] if self.bos_id is None else [self.bos_id]) + self.encode(text)
        if not ids and self.doc_start_id is None:
            raise HybridGPTError("an empty prompt needs a token to start from, and this tokenizer has none (no BOS, "
                                 "no document start); give a prompt")
        return ids or [self.doc_start_id]

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
        """UTF-8 bytes each token stands for (0 for special tokens), for bits-per-byte; read-only.

        In byte-level BPE every character of a vocabulary token's string stands for exactly one byte; an
        added token that is not special matches its text as it is, so it stands for that text's UTF-8 bytes.
        """
        return self._byte_lengths

    @cached_property
    def _byte_lengths(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        added = {i: t for i, t in self.hf.get_added_tokens_decoder().items()}
        for token, idx in self.hf.get_vocab(with_added_tokens=True).items():
            if idx in added:
                lengths[idx] = 0 if added[idx].special else len(token.encode("utf-8"))
            else:
                lengths[idx] = len(token)
        lengths.flags.writeable = False
        return lengths


TEMPLATE_FILE = "chat_template.json"  # beside tokenizer.json, when the chat template is not ours
TOKENIZER_FILES = ("tokenizer.json", TEMPLATE_FILE)


def save_tokenizer(tokenizer: Tokenizer, root: Path) -> None:
    """Write ``tokenizer`` into ``root``: tokenizer.json, and chat_template.json when its template is not ours.

    The one writer for checkpoints and prepared data alike, so that a tokenizer never loses its template."""
    write_text(root / "tokenizer.json", tokenizer.to_str())
    if tokenizer.template is not None and tokenizer.template != HYBRID_TEMPLATE:
        write_json(root / TEMPLATE_FILE, tokenizer.template.to_dict())


def load_tokenizer(root: Path) -> Tokenizer:
    """The tokenizer in ``root`` (a checkpoint or a prepared data directory), with the chat template of its
    chat_template.json if it has one."""
    template = None
    if (root / TEMPLATE_FILE).is_file():
        where = f"{root}/{TEMPLATE_FILE}"
        template = ChatTemplate.from_dict(read_json(root / TEMPLATE_FILE, "chat template file"), where)
    return Tokenizer.from_file(root / "tokenizer.json", template)
