"""The CLI driven in-process with random JSON and JSONL shapes in the files it reads (hypothesis): whatever the
shape, no traceback, an exit status in {0, 1, 2, 130}, and no file outside the run's output changes.

Each test mutates one kind of file in a shared copy of a smoke run and restores it after every example: a
checkpoint's config.json, a prepared data directory's meta.json, the tokenizer, SFT and DPO JSONL, the
metrics on --resume, and the analysis results `verdict` reads. A shape is either a random JSON value (null,
booleans, huge integers, NaN and infinities, lone surrogates written as \\ud800 escapes, nested lists and
objects) or the real file with one node dropped, replaced by a value of another type, or wrapped in a list, a
number of 5,000 digits, or the file cut short. Derandomized, so the suite is deterministic.
"""

import copy
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from helpers import run_bad
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid_gpt.stats import mean_ci

LEAVES = st.one_of(st.none(), st.booleans(), st.integers(),
                   st.sampled_from([2**64, -2**63 - 1, 10**300, 10**400, 1.7e308, -1e308]),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                   st.sampled_from(["", "\ud800", "a\udfffb", "AM", "user", "assistant", "x" * 300]))
VALUES = st.recursive(LEAVES, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
    st.one_of(st.text(max_size=6), st.sampled_from(["role", "content", "messages", "prompt", "chosen"])),
    kids, max_size=3), max_leaves=8)
DIGITS = "\x00digits\x00"  # stands for a number longer than Python converts (4,300 digits)


def _paths(doc, prefix=(), depth=4):
    """Every node of ``doc`` down to ``depth`` (the first 40 children of each), as key paths."""
    yield prefix
    children = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    if depth:
        for key, value in list(children)[:40]:
            yield from _paths(value, prefix + (key,), depth - 1)


def _dump(value) -> str:
    return json.dumps(value).replace(json.dumps(DIGITS), "9" * 5000)  # escapes lone surrogates; NaN as NaN


@st.composite
def mutated(draw, doc):
    """``doc`` with one node dropped, retyped or wrapped in a list; or another value; or cut short."""
    kind = draw(st.sampled_from(["drop", "retype", "retype", "wrap", "digits", "other", "cut"]))
    if kind == "other":
        return _dump(draw(VALUES))
    if kind == "cut":
        text = json.dumps(doc)
        return text[:draw(st.integers(0, len(text) - 1))]
    path = draw(st.sampled_from(list(_paths(doc))))
    new = copy.deepcopy(doc)
    if not path:
        return _dump({} if kind == "drop" else [new] if kind == "wrap" else DIGITS if kind == "digits"
                     else draw(VALUES.filter(lambda v: type(v) is not type(doc))))
    parent = new
    for key in path[:-1]:
        parent = parent[key]
    old = parent[path[-1]]
    if kind == "drop":
        del parent[path[-1]]
    else:
        parent[path[-1]] = [old] if kind == "wrap" else DIGITS if kind == "digits" else draw(
            VALUES.filter(lambda v: type(v) is not type(old)))
    return _dump(new)


def _rows(rows: list, garbage: list[str]):
    """JSONL: real rows, real rows mutated, random values, and lines that are not JSON."""
    line = st.one_of(st.sampled_from(rows).map(json.dumps), st.sampled_from(rows).flatmap(mutated),
                     VALUES.map(_dump), st.sampled_from(garbage + ["", "{oops", "9" * 5000, "[" * 5000]))
    return st.lists(line, min_size=1, max_size=4).map(lambda lines: "\n".join(lines) + "\n")


def _message():
    role = st.one_of(st.sampled_from(["user", "assistant", "system", "tool", ""]), VALUES)
    return st.one_of(st.fixed_dictionaries({"role": role, "content": st.one_of(st.text(max_size=20), VALUES)}),
                     st.fixed_dictionaries({"role": role}), VALUES)


SFT_ROWS = st.lists(_message(), max_size=4).map(lambda m: json.dumps({"messages": m}))
DPO_ROWS = st.fixed_dictionaries({"prompt": st.one_of(st.text(max_size=10), st.lists(_message(), max_size=3)),
                                  "chosen": st.one_of(st.text(max_size=10), VALUES),
                                  "rejected": st.one_of(st.text(max_size=10), VALUES)}).map(json.dumps)


def _analyses(vd: Path) -> list[Path]:
    """Small but complete results of the four analyses `verdict` reads, in a run directory of their own."""
    variants = [{"spec": s, "layers": s, "parameters": 1000, "kv_bytes_per_token": 512 * (1 + (s == "AAAA")),
                 "val_bpb": mean_ci(v), "decode_tok_s": t} for s, v, t in
                [("AAAA", [2.30, 2.31], 1000.0), ("AAMM", [2.31, 2.33], 1500.0), ("AANN", [2.4, 2.41], 1600.0),
                 ("AA", [2.5, 2.52], 2000.0)]]
    results = {
        "ablate/ablate.json": {"decode": {"context": 64}, "variants": variants},
        "probe/probe.json": {"chance": 0.0625, "settings": {"task": "recall"},
                             "patterns": [{"pattern": p, "accuracy": mean_ci([a, a + 0.01])}
                                          for p, a in (("AAAA", 0.9), ("AAMM", 0.3), ("AANN", 0.1))]},
        "importance/pretrain-standard/importance.json": {"recommendation": {
            "pattern": "AAMM", "same_as_deep": False, "deep_pattern": "AMAM"}},
        "distill-AM/distill.json": {"arms": {"distilled": {"quality_kept": 0.4}, "distilled_finetuned": {
            "quality_kept": 0.6}, "drop": {"bpb": 2.4}}},
    }
    for name, data in results.items():
        (vd / name).parent.mkdir(parents=True)
        (vd / name).write_text(json.dumps(data))
        (vd / name).with_suffix(".md").write_text(f"## {name}\n\n![plot](plot.png)\n")
    return [vd / name for name in results]


@pytest.fixture(scope="module")
def arena(pretrained, tmp_path_factory):
    """(inputs, work): a copy of a pretrained run with chat files and analysis results, and a folder for outputs."""
    from helpers import tiny_chat_files

    base = tmp_path_factory.mktemp("json-fuzz")
    inputs, work = base / "in", base / "work"
    shutil.copytree(pretrained, inputs)
    shutil.copytree(inputs / "pretrain-hybrid", inputs / "resume")  # the one --resume writes into
    tiny_chat_files(inputs)
    (inputs / "vd").mkdir()
    _analyses(inputs / "vd")
    work.mkdir()
    return inputs, work


def _train(i, w, out, *more):
    return ["--preset", "smoke", "--run-dir", i, "--max-steps", "2", "--eval-interval", "2", "--eval-tokens", "32",
            "--no-progress", "--out", w / out, *more]


def _resume(i, w, *more):
    return ["pretrain", *_train(i, w, "x"), "--out", i / "resume", "--model-type", "hybrid", "--resume",
            "--max-steps", "7", *more]


# Per command, its argument list given (inputs, work); every one is fast when its inputs are valid.
COMMANDS = {
    "eval": lambda i, w: ["eval", i / "pretrain-hybrid", "--eval-tokens", "32"],
    "eval --data": lambda i, w: ["eval", i / "pretrain-hybrid", "--eval-tokens", "32", "--data", i / "data"],
    "sample": lambda i, w: ["sample", i / "pretrain-hybrid", "--max-new-tokens", "3"],
    "chat": lambda i, w: ["chat", i / "pretrain-hybrid", "-p", "Who goes there?", "--max-new-tokens", "3"],
    "bench": lambda i, w: ["bench", i / "pretrain-hybrid", "--contexts", "16", "--new-tokens", "4", "--repeats", "1",
                           "--warmup", "0", "--batch-sizes", "1", "--no-peer", "--no-naive"],
    "sft": lambda i, w: ["sft", *_train(i, w, "sft"), "--init", i / "pretrain-hybrid", "--sft-data", i / "sft.jsonl"],
    "dpo": lambda i, w: ["dpo", *_train(i, w, "dpo"), "--init", i / "pretrain-hybrid", "--dpo-data", i / "dpo.jsonl"],
    "pretrain": lambda i, w: ["pretrain", *_train(i, w, "pre"), "--data", i / "data"],
    "resume": _resume,
    "verdict": lambda i, w: ["verdict", "--run-dir", i / "vd"],
}
CHECKPOINT_READERS = ["eval", "sample", "bench", "chat", "sft", "dpo"]

# Per target: the file it mutates (relative to inputs), the commands that read it, and examples to try.
TARGETS = {
    "config.json": ("pretrain-hybrid/config.json", CHECKPOINT_READERS, 24),
    "resume config.json": ("resume/config.json", ["resume"], 6),
    "meta.json": ("data/meta.json", ["eval --data", "pretrain"], 12),
    "tokenizer.json": ("pretrain-hybrid/tokenizer.json", ["eval", "sample", "chat"], 10),
    "metrics.jsonl": ("resume/metrics.jsonl", ["resume"], 6),
    "sft.jsonl": ("sft.jsonl", ["sft"], 14),
    "dpo.jsonl": ("dpo.jsonl", ["dpo"], 10),
    "ablate.json": ("vd/ablate/ablate.json", ["verdict"], 12),
    "probe.json": ("vd/probe/probe.json", ["verdict"], 10),
    "importance.json": ("vd/importance/pretrain-standard/importance.json", ["verdict"], 6),
    "distill.json": ("vd/distill-AM/distill.json", ["verdict"], 6),
}


def _shapes(target: str, original: str):
    if target in ("sft.jsonl", "dpo.jsonl", "metrics.jsonl"):
        rows = [json.loads(line) for line in original.splitlines() if line.strip()]
        extra = {"sft.jsonl": SFT_ROWS, "dpo.jsonl": DPO_ROWS}.get(target)
        return st.one_of(_rows(rows, []), st.lists(extra, min_size=1, max_size=3).map("\n".join)) \
            if extra is not None else _rows(rows, ['{"step": 1}', '{"step": "1"}'])
    return mutated(json.loads(original))


def _snapshot(root: Path) -> dict:
    """Each entry's kind, and a file's size, mtime and inode: a rewrite, a replace or a removal all change it."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st_ = os.lstat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = st_.st_mode if stat.S_ISDIR(st_.st_mode) else (
                st_.st_mode, st_.st_size, st_.st_mtime_ns, st_.st_ino)
    return out


def _changed(before: dict, after: dict) -> list[str]:
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_cli_with_random_json_shapes(target, arena, monkeypatch, capsys):
    inputs, work = arena
    monkeypatch.chdir(work)
    rel, commands, examples = TARGETS[target]
    path = inputs / rel
    original = path.read_bytes()
    pristine = inputs / "pretrain-hybrid"
    threads = torch.get_num_threads()

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(text=_shapes(target, original.decode()), command=st.sampled_from(commands))
    def run(text, command):
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        argv = COMMANDS[command](inputs, work)
        before = _snapshot(inputs)
        try:
            code, err = run_bad(argv, capsys)
        finally:
            torch.set_num_threads(threads)
        changed = _changed(before, _snapshot(inputs))
        # Restore before asserting, so one failure does not cascade into the next examples.
        path.write_bytes(original)
        if command == "resume":
            shutil.rmtree(inputs / "resume")
            shutil.copytree(pristine, inputs / "resume")
            path.write_bytes(original)
        for p in work.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        seen = (argv, text[:300], code, err[-2000:])
        assert code in (0, 1, 2, 130) and "Traceback" not in err, seen
        assert not code or (err.strip() and len(err.strip().splitlines()[-1]) < 1000), seen
        # The run's own output: a resumed checkpoint, the verdict's two files.
        ours = {"resume": [str(inputs / "resume")], "verdict": [str(inputs / "vd" / "hypothesis.")]}.get(command, [])
        outside = [p for p in changed if not (code == 0 and any(p.startswith(o) for o in ours))]
        assert not outside, (argv, text[:300], code, outside)

    run()
