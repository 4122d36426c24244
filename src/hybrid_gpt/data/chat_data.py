"""Chat data: SFT conversations and DPO preference pairs built offline from the play dialogue,
and loaders for the ecosystem's JSONL formats.

Construction (documented in the README):
- A *conversation* is a window of consecutive speeches within one scene, each by a different speaker
  than the one before. Roles alternate backwards from the last speech, which is the assistant's, so a
  window of 2, 4 or 6 speeches reads user, assistant, user, assistant, ...
- A *preference pair* takes a conversation: prompt = every turn but the last, chosen = the true
  last speech, rejected = a speech of similar length (within 25%) drawn at random from a different
  play. A wrong reply of the same length keeps length from being a shortcut.
- Validation uses the held-out plays only (Hamlet, The Tempest, Twelfth Night), as in pretraining.

Formats: SFT lines are {"messages": [{"role": ..., "content": ...}, ...]} (Hugging Face chat
format); DPO lines are {"prompt": ..., "chosen": ..., "rejected": ...} (TRL), where prompt is a
string or a message list and chosen/rejected are strings or one-message assistant lists.
"""

from __future__ import annotations

import bisect
import json
import logging
import random
from pathlib import Path

from hybrid_gpt.data.corpus import Corpus, Document
from hybrid_gpt.data.template import check_messages
from hybrid_gpt.data.tokenizer import check_unicode
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import output_dir, parse_json, read_json, read_text, recover_dir, write_json, write_text
from hybrid_gpt.presets import DEFAULT_SEED

logger = logging.getLogger(__name__)

CHAT_FILES = ("meta.json", "sft_train.jsonl", "sft_val.jsonl", "dpo_train.jsonl", "dpo_val.jsonl")
JSONL_LIMIT = 256 << 20  # bytes of one SFT/DPO file, read whole: bound it before reading
MAX_TURN_CHARS = 320  # longer speeches are left out: at context 128 they would be mostly cropped
TURN_CHOICES = (2, 4, 6)


def _scene_runs(doc: Document) -> list[list]:
    """Runs of speeches within a scene where every speaker differs from the one before."""
    runs, current = [], []
    for s in doc.speeches:
        if current and (s.scene != current[-1].scene or s.speaker == current[-1].speaker):
            runs.append(current)
            current = []
        current.append(s)
    if current:
        runs.append(current)
    return runs


def build_conversations(docs: list[Document], seed: int) -> list[dict]:
    """One conversation ending at each eligible speech, with a random window length from TURN_CHOICES."""
    rng = random.Random(seed)
    out = []
    for doc in docs:
        for run in _scene_runs(doc):
            for end in range(1, len(run)):
                n = rng.choice(TURN_CHOICES)
                start = end + 1 - n
                while start < 0:  # shorter runs: the longest even window that fits
                    start += 2
                window = run[start:end + 1]
                if any(len(s.text) > MAX_TURN_CHARS for s in window):
                    continue
                roles = ["assistant" if (end - i) % 2 == 0 else "user" for i in range(start, end + 1)]
                out.append({"messages": [{"role": r, "content": s.text} for r, s in zip(roles, window)],
                            "source": f"{doc.name}:{window[-1].speaker}"})
    return out


def build_pairs(conversations: list[dict], pool: list[tuple[str, str]], seed: int) -> list[dict]:
    """Preference pairs: the true reply against a length-matched speech from another play."""
    rng = random.Random(seed)
    pool = sorted(pool, key=lambda p: len(p[1]))
    lengths = [len(text) for _, text in pool]
    pairs = []
    for conv in conversations:
        chosen = conv["messages"][-1]["content"]
        play = conv["source"].split(":")[0]
        lo = bisect.bisect_left(lengths, int(len(chosen) * 0.75))
        hi = bisect.bisect_right(lengths, int(len(chosen) * 1.25) + 1)
        for _ in range(20):
            if hi <= lo:
                break
            other_play, rejected = pool[rng.randrange(lo, hi)]
            if other_play != play and rejected != chosen:
                pairs.append({"prompt": conv["messages"][:-1], "chosen": chosen, "rejected": rejected,
                              "source": conv["source"]})
                break
    return pairs


def _pool(docs: list[Document]) -> list[tuple[str, str]]:
    return [(d.name, s.text) for d in docs for s in d.speeches if len(s.text) <= MAX_TURN_CHARS]


def prepare_chat_data(corpus: Corpus, out_dir: str | Path, seed: int = DEFAULT_SEED) -> dict:
    """Write sft_{train,val}.jsonl, dpo_{train,val}.jsonl and meta.json, built in a temporary directory
    and swapped in whole: the previous chat data stays until the new one is complete."""
    out = Path(out_dir)
    with output_dir(out, allowed=CHAT_FILES, what="chat data directory", overwrite=True) as tmp:
        meta = {"source": corpus.source, "corpus_sha256": corpus.sha256(), "seed": seed, "files": {}}
        for split, docs in (("train", corpus.train), ("val", corpus.val)):
            convs = build_conversations(docs, seed)
            random.Random(seed).shuffle(convs)
            pairs = build_pairs(convs, _pool(docs), seed + 1)
            for kind, rows in (("sft", convs), ("dpo", pairs)):
                name = f"{kind}_{split}.jsonl"
                write_text(tmp / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                meta["files"][name] = len(rows)
                logger.info(f"{name}: {len(rows):,} {'conversations' if kind == 'sft' else 'preference pairs'}")
        write_json(tmp / "meta.json", meta)
    return meta


def has_chat_data(chat_dir: str | Path) -> bool:
    """Whether ``chat_dir`` holds complete chat data (meta.json is written last), after recovering a
    half-finished swap."""
    chat_dir = Path(chat_dir)
    recover_dir(chat_dir)
    return (chat_dir / "meta.json").is_file()


def is_chat_prepared(out_dir: str | Path, corpus: Corpus, seed: int) -> bool:
    """Whether ``out_dir`` already holds chat data built from this corpus with this seed (False: nothing there).

    Raises if it holds chat data built otherwise: it is never replaced silently.
    """
    out = Path(out_dir)
    if not has_chat_data(out):
        return False
    meta = read_json(out / "meta.json", "chat data meta file")
    if isinstance(meta, dict) and meta.get("corpus_sha256") == corpus.sha256() and meta.get("seed") == seed:
        return True
    raise HybridGPTError(f"{out} holds chat data built differently; pass --force to replace it")


# -- loaders -------------------------------------------------------------------------------------

def _read_jsonl(path: Path):
    recover_dir(path.parent)  # our own files sit in a swapped directory
    text = read_text(path, "data file", JSONL_LIMIT)
    rows = 0
    # JSON Lines are separated by "\n" only: splitlines() would also split inside strings at U+2028 etc.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        obj = parse_json(line, f"{path}:{lineno}")
        if not isinstance(obj, dict):
            raise HybridGPTError(f"{path}:{lineno}: each line must be a JSON object")
        check_unicode(json.dumps(obj, ensure_ascii=False), f"{path}:{lineno}")
        rows += 1
        yield lineno, obj
    if rows == 0:
        raise HybridGPTError(f"{path} holds no examples")


def load_sft(path: str | Path) -> list[list[dict]]:
    """Conversations from a JSONL file of {"messages": [...]} lines; each must have an assistant turn."""
    path = Path(path)
    out = []
    for lineno, obj in _read_jsonl(path):
        where = f"{path}:{lineno}"
        if "messages" not in obj:
            raise HybridGPTError(f"{where}: expected a 'messages' list (Hugging Face chat format)")
        messages = check_messages(obj["messages"], where)
        if not any(m["role"] == "assistant" for m in messages):
            raise HybridGPTError(f"{where}: the conversation has no assistant turn to learn from")
        out.append([{"role": m["role"], "content": m["content"]} for m in messages])
    return out


def _reply(value, where: str, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1:
        (m,) = check_messages(value, f"{where} '{field}'")
        if m["role"] == "assistant":
            return m["content"]
    raise HybridGPTError(f"{where}: '{field}' must be a string or a one-message assistant list")


def load_dpo(path: str | Path) -> list[dict]:
    """Preference pairs from TRL-format JSONL: prompt (string or messages), chosen, rejected."""
    path = Path(path)
    out = []
    for lineno, obj in _read_jsonl(path):
        where = f"{path}:{lineno}"
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
        if missing:
            raise HybridGPTError(f"{where}: missing {', '.join(missing)} (TRL format: prompt, chosen, rejected)")
        prompt = obj["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        else:
            prompt = check_messages(prompt, f"{where} 'prompt'")
        out.append({"prompt": [{"role": m["role"], "content": m["content"]} for m in prompt],
                    "chosen": _reply(obj["chosen"], where, "chosen"),
                    "rejected": _reply(obj["rejected"], where, "rejected")})
    return out
