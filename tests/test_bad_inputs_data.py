"""The bad-input catalogue below the CLI: damaged or foreign files, directories that are not ours,
unbounded inputs, and a file system that refuses writes, each driven through the CLI as a user would.

Each case must exit non-zero (2: bad input; 1: a run that could not finish), print one line on
stderr naming the problem, show no traceback, and leave every file that existed before it
byte-identical (the data-loss cases are the point of that check)."""

import builtins
import errno
import hashlib
import io
import json
import os
import shutil
import stat
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from helpers import run_bad
from safetensors.torch import load_file, save_file

from hybrid_gpt import fsutil
from hybrid_gpt.cli import main
from hybrid_gpt.data.corpus import MAX_CORPUS_BYTES


@pytest.fixture(scope="module")
def run_dir(pretrained, tmp_path_factory):
    """A private copy of a run directory with prepared data, chat data and both smoke models pretrained."""
    rd = tmp_path_factory.mktemp("bad-inputs-data") / "run"
    shutil.copytree(pretrained, rd)
    assert main(["prepare-chat", "--run-dir", str(rd), "--preset", "smoke"]) == 0
    return rd


# -- building damaged inputs ----------------------------------------------------------------------

def _copy(t, r, name="pretrain-hybrid", to="ckpt"):
    shutil.copytree(r / name, t / to)
    return t / to


def _notes_dir(t, name="mine"):
    d = t / name
    d.mkdir()
    (d / "notes.txt").write_text("a week of notes\n")
    return d


def _cwd_like(t):
    """A directory that looks like a project checkout, as --out $PWD would see it."""
    d = t / "project"
    (d / "src").mkdir(parents=True)
    (d / "README.md").write_text("# mine\n")
    (d / "src" / "main.py").write_text("print('hi')\n")
    (d / "config.json").write_text("{}\n")
    return d


def _with_state(t, r, change):
    """A copy of the hybrid checkpoint whose trainer_state.pt is ``change(state)``."""
    ckpt = _copy(t, r)
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    torch.save(change(state), ckpt / "trainer_state.pt")
    return ckpt


def _set(d, key, value):
    d[key] = value
    return d


def _without(d, key):
    del d[key]
    return d


def _with_weights(t, r, change):
    ckpt = _copy(t, r)
    state = load_file(str(ckpt / "model.safetensors"))
    change(state)
    save_file(state, str(ckpt / "model.safetensors"))
    return ckpt


def _with_config(t, r, change):
    ckpt = _copy(t, r)
    raw = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(change(raw)))
    return ckpt


def _with_file(t, r, name, text, src="pretrain-hybrid"):
    ckpt = _copy(t, r, src)
    (ckpt / name).write_text(text)
    return ckpt


def _with_meta(t, r, change):
    data = _copy(t, r, "data", "data")
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps(change(meta)))
    return data


def _with_tokens(t, r, split, ids):
    data = _copy(t, r, "data", "data")
    np.asarray(ids, dtype=np.uint16).tofile(data / f"{split}.bin")
    meta = json.loads((data / "meta.json").read_text())
    meta["splits"][split]["tokens"] = len(ids)
    (data / "meta.json").write_text(json.dumps(meta))
    return data


def _vocab_id(t, r, split):
    data = _copy(t, r, "data", "data")
    arr = np.fromfile(data / f"{split}.bin", dtype=np.uint16)
    arr[len(arr) // 2] = json.loads((data / "meta.json").read_text())["vocab_size"]
    arr.tofile(data / f"{split}.bin")
    return data


def _jsonl(t, text, name="data.jsonl"):
    path = t / name
    path.write_text(text, encoding="utf-8")
    return path


def _fifo(t, name="fifo.txt"):
    os.mkfifo(t / name)
    return t / name


def _sparse(t, size, name="big.txt"):
    path = t / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _fifo_in(t, r, name):
    ckpt = _copy(t, r)
    (ckpt / name).unlink()
    os.mkfifo(ckpt / name)
    return ckpt


def _nested_config(t, r):
    ckpt = _copy(t, r)
    (ckpt / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    return ckpt


def _first_moment(state, value):
    first = next(iter(state["optimizer"]["state"].values()))
    first["exp_avg"] = value
    return state


def _moment(state):
    return next(iter(state["optimizer"]["state"].values()))["exp_avg"]


def _set_square(state, value):
    next(iter(state["optimizer"]["state"].values()))["exp_avg_sq"].fill_(value)
    return state


# -- the command lines ----------------------------------------------------------------------------

def _pretrain(r, *args):
    return ["pretrain", "--run-dir", r, "--preset", "smoke", "--no-progress", *args]


def _resume(r, ckpt, *args):
    return _pretrain(r, "--model-type", "hybrid", "--out", ckpt, "--resume", "--max-steps", "8", *args)


def _sft(r, *args):
    return ["sft", "--run-dir", r, "--preset", "smoke", "--model-type", "hybrid", "--no-progress", *args]


def _dpo(r, *args):
    return ["dpo", "--run-dir", r, "--preset", "smoke", "--init", r / "pretrain-hybrid", "--no-progress", *args]


def _msg(role, content="hi"):
    return {"role": role, "content": content}


def _sft_line(*messages):
    return json.dumps({"messages": list(messages)}) + "\n"


@dataclass
class Case:
    build: object  # (tmp, run_dir) -> (argv, expected text in the one line)
    code: int = 2
    fault: str | None = None  # "erofs", "eacces": the file system refuses writes; "enospc:N": the Nth write fills it


CASES = {
    # Data loss: a replace must never delete what is not ours.
    "overwrite a user's folder": Case(lambda t, r: (_pretrain(r, "--out", _notes_dir(t), "--overwrite"),
                                                    "is not a checkpoint: it holds notes.txt")),
    "overwrite the prepared data": Case(lambda t, r: (_pretrain(r, "--out", r / "data", "--overwrite"),
                                                      "is not a checkpoint: it holds meta.json, train.bin, val.bin")),
    "overwrite the working directory": Case(lambda t, r: (_pretrain(r, "--out", _cwd_like(t), "--overwrite"),
                                                          "it holds README.md, src")),
    "overwrite the current directory": Case(lambda t, r: (_pretrain(r, "--out", _in_cwd(t), "--overwrite"),
                                                          "is not a checkpoint: it holds notes.txt")),
    "resume into a user's folder": Case(lambda t, r: (_resume(r, _notes_dir(t)), "it holds notes.txt")),
    "importance into a user's folder": Case(lambda t, r: (["importance", r / "pretrain-standard", "--max-tokens", "64",
                                                            "--out", _notes_dir(t)],
                                                           "is not a layer-importance output")),
    "probe into a user's folder": Case(lambda t, r: (["probe", "--run-dir", r, "--preset", "smoke", "--steps", "1",
                                                       "--out", _notes_dir(t)], "is not a probe output")),
    "ablate into a user's folder": Case(lambda t, r: (["ablate", "--run-dir", r, "--preset", "smoke", "--steps", "1",
                                                        "--out", _notes_dir(t)], "is not a layer-ablation output")),
    "distill over a user's folder": Case(lambda t, r: (["distill", r / "pretrain-standard", "--layers", "AM",
                                                         "--out", _notes_dir(t), "--overwrite"],
                                                        "is not a distill output")),
    "output name too long": Case(lambda t, r: (_pretrain(r, "--out", t / ("x" * 300)), "takes names of at most")),
    "overwrite a file": Case(lambda t, r: (_pretrain(r, "--out", _jsonl(t, "mine\n", "notes.txt"), "--overwrite"),
                                           "exists and is not a directory")),
    "sft overwrite a user's folder": Case(lambda t, r: (_sft(r, "--out", _notes_dir(t), "--overwrite"),
                                                        "is not a checkpoint: it holds notes.txt")),
    "prepare into a user's folder": Case(lambda t, r: (["prepare", "--out", _notes_dir(t), "--vocab-size", "300"],
                                                       "is not a prepared data directory: it holds notes.txt")),
    "prepare --force into a checkpoint": Case(lambda t, r: (["prepare", "--out", _copy(t, r), "--force",
                                                             "--vocab-size", "300"],
                                                            "is not a prepared data directory")),
    "prepare onto a file": Case(lambda t, r: (["prepare", "--out", _jsonl(t, "mine\n", "notes.txt"),
                                               "--vocab-size", "300"], "exists and is not a directory")),
    "prepare-chat --force into a user's folder": Case(lambda t, r: (["prepare-chat", "--out", _notes_dir(t),
                                                                     "--force"],
                                                                    "is not a chat data directory: it holds notes")),
    "prepare --force with a bad vocabulary": Case(lambda t, r: (["prepare", "--run-dir", r, "--force",
                                                                 "--vocab-size", "70000"], "65536")),
    "prepare --force onto a full disk": Case(lambda t, r: (["prepare", "--run-dir", r, "--preset", "smoke",
                                                            "--force"], "no space left on device"),
                                             code=1, fault="enospc:2"),
    "prepare-chat --force onto a full disk": Case(lambda t, r: (["prepare-chat", "--run-dir", r, "--preset", "smoke",
                                                                 "--force"], "no space left on device"),
                                                  code=1, fault="enospc:3"),
    "resume onto a full disk": Case(lambda t, r: (_resume(r, _copy(t, r)), "no space left on device"),
                                    code=1, fault="enospc:1"),
    # Weights that would load silently wrong.
    "resume with a deleted tensor": Case(lambda t, r: (_resume(r, _with_weights(
        t, r, lambda s: s.pop("transformer.h.0.mixer.c_attn.weight"))), "missing transformer.h.0.mixer.c_attn.weight")),
    "resume with an extra tensor": Case(lambda t, r: (_resume(r, _with_weights(
        t, r, lambda s: s.update(extra=torch.zeros(2)))), "unexpected extra")),
    "resume with a mis-shaped tensor": Case(lambda t, r: (_resume(r, _with_weights(
        t, r, lambda s: s.update({"transformer.ln_f.weight": torch.zeros(3)}))), "mis-shaped transformer.ln_f.weight")),
    "int8 weights": Case(lambda t, r: (["eval", _with_weights(t, r, lambda s: s.update(
        {"transformer.ln_f.weight": s["transformer.ln_f.weight"].to(torch.int8)}))], "torch.int8")),
    "bool weights": Case(lambda t, r: (["sample", _with_weights(t, r, lambda s: s.update(
        {"transformer.ln_f.bias": s["transformer.ln_f.bias"] > 0}))], "must be floating point")),
    "complex weights": Case(lambda t, r: (["eval", _with_weights(t, r, lambda s: s.update(
        {"transformer.ln_f.bias": s["transformer.ln_f.bias"].to(torch.complex64)}))], "torch.complex64")),
    "NaN weights": Case(lambda t, r: (["sample", _with_weights(t, r, lambda s: s["transformer.wte.weight"].fill_(
        float("nan")))], "not finite (transformer.wte.weight")),
    "resume NaN weights": Case(lambda t, r: (_resume(r, _with_weights(t, r, lambda s: s["transformer.wpe.weight"].fill_(
        float("inf")))), "not finite")),
    # A damaged trainer state on --resume.
    "trainer state {}": Case(lambda t, r: (_resume(r, _with_state(t, r, lambda s: {})), "no step, optimizer, rng")),
    "trainer state a list": Case(lambda t, r: (_resume(r, _with_state(t, r, lambda s: [1, 2])), "a list, not a dict")),
    "trainer state without optimizer": Case(lambda t, r: (_resume(r, _with_state(
        t, r, lambda s: _without(s, "optimizer"))), "no optimizer")),
    "trainer state text step": Case(lambda t, r: (_resume(r, _with_state(t, r, lambda s: _set(s, "step", "6"))),
                                                  "step 6 is not a whole number")),
    "trainer state float step": Case(lambda t, r: (_resume(r, _with_state(t, r, lambda s: _set(s, "step", 2.5))),
                                                   "is not a whole number")),
    "trainer state negative step": Case(lambda t, r: (_resume(r, _with_state(t, r, lambda s: _set(s, "step", -1))),
                                                      "step -1 is not a whole number >= 0")),
    "trainer state step disagrees": Case(lambda t, r: (_resume(r, _with_state(t, r, lambda s: _set(s, "step", 3))),
                                                       "while config.json says 6")),
    "trainer state NaN elapsed": Case(lambda t, r: (_resume(r, _with_state(
        t, r, lambda s: _set(s, "elapsed", float("nan")))), "elapsed time")),
    "bad torch RNG state": Case(lambda t, r: (_resume(r, _with_state(t, r, lambda s: _set(
        s, "rng", {**s["rng"], "torch": torch.zeros(7, dtype=torch.uint8)}))), "random-number state")),
    "bad python RNG state": Case(lambda t, r: (_resume(r, _with_state(t, r, lambda s: _set(
        s, "rng", {**s["rng"], "python": [1, 2, 3]}))), "random-number state")),
    "RNG state not a dict": Case(lambda t, r: (_resume(r, _with_state(t, r, lambda s: _set(s, "rng", [0]))),
                                               "random-number state")),
    "wrong param groups": Case(lambda t, r: (_resume(r, _with_state(t, r, lambda s: _set(
        s, "optimizer", {**s["optimizer"], "param_groups": s["optimizer"]["param_groups"][:1]}))),
        "parameter groups do not match")),
    "NaN optimizer moments": Case(lambda t, r: (_resume(r, _with_state(t, r, lambda s: _first_moment(
        s, torch.full_like(_moment(s), float("nan"))))), "optimizer moments of parameter 0 are not finite")),
    "negative optimizer squares": Case(lambda t, r: (_resume(r, _with_state(t, r, lambda s: _set_square(s, -1.0))),
                                                     "are not finite (or negative squares)")),
    "optimizer not a state dict": Case(lambda t, r: (_resume(r, _with_state(t, r, lambda s: _set(s, "optimizer", 3))),
                                                     "not an optimizer's state dict")),
    "mis-shaped optimizer moments": Case(lambda t, r: (_resume(r, _with_state(
        t, r, lambda s: _first_moment(s, torch.zeros(3)))), "optimizer moments of parameter")),
    "optimizer setting of the wrong type": Case(lambda t, r: (_resume(r, _with_state(t, r, lambda s: _set(
        s["optimizer"]["param_groups"][0], "betas", "fast") and s)), "optimizer setting betas")),
    "truncated trainer state": Case(lambda t, r: (_resume(r, _with_file(t, r, "trainer_state.pt", "PK\x03")),
                                                  "trainer_state.pt is unreadable")),
    "corrupt metrics.jsonl": Case(lambda t, r: (_resume(r, _with_file(t, r, "metrics.jsonl", '{"step": 1}\n{oops\n')),
                                                "metrics.jsonl:2: not valid JSON")),
    "metrics.jsonl of lists": Case(lambda t, r: (_resume(r, _with_file(t, r, "metrics.jsonl", "[1, 2]\n")),
                                                 "metrics.jsonl:1 is not a metrics record")),
    "metrics.jsonl text step": Case(lambda t, r: (_resume(r, _with_file(t, r, "metrics.jsonl", '{"step": "1"}\n')),
                                                  "is not a metrics record")),
    # JSON of the wrong shape.
    "config training a list": Case(lambda t, r: (["eval", _with_config(t, r, lambda c: _set(c, "training", []))],
                                                 "'training' must be an object, got list")),
    "config training.step text": Case(lambda t, r: (["eval", _with_config(t, r, lambda c: _set(
        c, "training", {**c["training"], "step": "six"}))], "training.step must be a whole number")),
    "config training.complete text": Case(lambda t, r: (_resume(r, _with_config(t, r, lambda c: _set(
        c, "training", {**c["training"], "complete": "yes"}))), "training.complete must be true or false")),
    "config training.train_config a list": Case(lambda t, r: (_resume(r, _with_config(t, r, lambda c: _set(
        c, "training", {**c["training"], "train_config": [1]}))), "training.train_config must be an object")),
    "config of a later format version": Case(lambda t, r: (["eval", _with_config(t, r, lambda c: _set(
        c, "format_version", 99))], "reads hybrid-gpt-checkpoint versions 1 to 1")),
    "config of another format": Case(lambda t, r: (["sample", _with_config(t, r, lambda c: _set(
        c, "format", ["x"]))], 'is of format ["x"] version 1')),
    "config a list": Case(lambda t, r: (["eval", _with_config(t, r, lambda c: [c])], "no 'model' object")),
    "config model a string": Case(lambda t, r: (["eval", _with_config(t, r, lambda c: _set(c, "model", "AAMM"))],
                                                "no 'model' object")),
    "config model n_embd text": Case(lambda t, r: (["eval", _with_config(t, r, lambda c: _set(
        c, "model", {**c["model"], "n_embd": "x" * 100_000}))], "n_embd must be a whole number")),
    "config model many unknown keys": Case(lambda t, r: (["eval", _with_config(t, r, lambda c: _set(
        c, "model", {**c["model"], **{f"k{i}": i for i in range(20_000)}}))], "unknown keys")),
    "config 20,000-letter pattern": Case(lambda t, r: (["sample", _with_config(t, r, lambda c: _set(
        c, "model", {**c["model"], "layers": "AM" * 10_000}))], "has 20,000 letters; the limit is 1,024")),
    "config nested too deeply": Case(lambda t, r: (["eval", _nested_config(t, r)], "nested too deeply")),
    "meta.json a list": Case(lambda t, r: (_pretrain(r, "--data", _with_meta(t, r, lambda m: [m]), "--out", t / "o"),
                                           "meta.json is damaged: it must be a JSON object")),
    "meta.json without splits": Case(lambda t, r: (_pretrain(r, "--data", _with_meta(
        t, r, lambda m: _without(m, "splits")), "--out", t / "o"), "'splits' must be an object")),
    "meta.json without val": Case(lambda t, r: (_pretrain(r, "--data", _with_meta(
        t, r, lambda m: _set(m, "splits", {"train": m["splits"]["train"]})), "--out", t / "o"),
        "'val' must be an object")),
    "meta.json without source": Case(lambda t, r: (["eval", r / "pretrain-hybrid", "--data", _with_meta(
        t, r, lambda m: _without(m, "source"))], "'source' must be a string")),
    "meta.json text token count": Case(lambda t, r: (["eval", r / "pretrain-hybrid", "--data", _with_meta(
        t, r, lambda m: _set(m, "splits", {**m["splits"], "val": {"tokens": "many"}}))], "'tokens' must be")),
    "prepare over a damaged meta.json": Case(lambda t, r: (["prepare", "--out", _with_meta(t, r, lambda m: 3),
                                                            "--preset", "smoke"], "must be a JSON object")),
    "config with a 5,000-digit number": Case(lambda t, r: (["eval", _with_file(
        t, r, "config.json", '{"model": ' + "9" * 5000 + "}")], "not valid JSON (Exceeds the limit (4300 digits)")),
    "metrics.jsonl with a 5,000-digit step": Case(lambda t, r: (_resume(r, _with_file(
        t, r, "metrics.jsonl", '{"step": ' + "9" * 5000 + "}\n")), "metrics.jsonl:1: not valid JSON")),
    "sft with a 5,000-digit number": Case(lambda t, r: (_sft(r, "--sft-data", _jsonl(
        t, '{"messages": ' + "9" * 5000 + "}\n")), "data.jsonl:1: not valid JSON")),
    "verdict over a corrupt probe.json": Case(lambda t, r: (_verdict(
        t, "probe/probe.json", '{"patterns": [{"pattern": "AAMM"'), "probe.json: not valid JSON")),
    "verdict over a probe.json of lists": Case(lambda t, r: (_verdict(
        t, "probe/probe.json", '{"chance": 0.1, "settings": {"task": "recall"}, "patterns": [[1]]}'),
        "probe.json is damaged: `verdict` needs chance, settings.task, and patterns")),
    "verdict over an ablate.json of NaN": Case(lambda t, r: (_verdict(t, "ablate/ablate.json", _ablation(
        decode_tok_s=float("nan"))), "ablate.json is damaged")),
    "verdict over a 400-digit speed": Case(lambda t, r: (_verdict(t, "ablate/ablate.json", _ablation(
        decode_tok_s=10**400)), "ablate.json is damaged")),
    "verdict over values that overflow a sum": Case(lambda t, r: (_verdict(t, "ablate/ablate.json", _ablation(
        val_bpb={"mean": 1e308, "values": [1e308, 1e308], "ci95": None})), "ablate.json is damaged")),
    "verdict over a zero speed": Case(lambda t, r: (_verdict(t, "ablate/ablate.json", _ablation(decode_tok_s=0)),
                                                    "ablate.json is damaged")),
    "verdict over unpaired seeds": Case(lambda t, r: (_verdict(t, "ablate/ablate.json", _ablation(
        val_bpb={"mean": 2.0, "values": [2.0, 2.0], "ci95": [2.0, 2.0]}, first_only=True)), "ablate.json is damaged")),
    "verdict over an importance.json list": Case(lambda t, r: (_verdict(
        t, "importance/pretrain-standard/importance.json", "[]"), "importance.json is damaged")),
    "verdict onto a hypothesis.md directory": Case(lambda t, r: (_verdict_onto_dir(t), "hypothesis.md exists and is "
                                                                                    "not a regular file")),
    "verdict over a distill.json FIFO": Case(lambda t, r: (_verdict(t, "distill-AM/distill.json", None),
                                                           "is a FIFO, not a regular file")),
    "sft role a list": Case(lambda t, r: (_sft(r, "--sft-data", _jsonl(t, _sft_line(_msg(["user"]), _msg("assistant"))
                                                                       * 3)), "message 0 has role ['user']")),
    "sft role an object": Case(lambda t, r: (_sft(r, "--sft-data", _jsonl(t, _sft_line(
        _msg({"r": "user"}), _msg("assistant")) * 3)), "message 0 has role {'r': 'user'}")),
    "sft name a list": Case(lambda t, r: (_sft(r, "--sft-data", _jsonl(t, _sft_line(
        {"role": "user", "content": "hi", "name": [1]}, _msg("assistant")) * 3)), "name must be a string")),
    "sft lone surrogate": Case(lambda t, r: (_sft(r, "--sft-data", _jsonl(
        t, _sft_line(_msg("user", "hi \ud800 there"), _msg("assistant")) * 3)),
        "data.jsonl:1 holds a lone surrogate ('\\ud800')")),
    "dpo lone surrogate": Case(lambda t, r: (_dpo(r, "--dpo-data", _jsonl(
        t, '{"prompt": "a\\udfff", "chosen": "b", "rejected": "c"}\n' * 3)), "holds a lone surrogate")),
    "dpo role an object": Case(lambda t, r: (_dpo(r, "--dpo-data", _jsonl(
        t, json.dumps({"prompt": [_msg({"x": 1})], "chosen": "b", "rejected": "c"}) + "\n")), "has role {'x': 1}")),
    "sft data a FIFO": Case(lambda t, r: (_sft(r, "--sft-data", _fifo(t, "sft.jsonl")),
                                             "is not a regular file or a directory")),
    "sft data a directory": Case(lambda t, r: (_sft(r, "--sft-data", t), "is a directory")),
    # Token files.
    "train ids beyond the vocabulary": Case(lambda t, r: (_pretrain(r, "--data", _vocab_id(t, r, "train"), "--out",
                                                                    t / "o"), "outside the vocabulary")),
    "val ids beyond the vocabulary": Case(lambda t, r: (["eval", r / "pretrain-hybrid", "--data",
                                                         _vocab_id(t, r, "val")], "outside the vocabulary")),
    "one-token val.bin": Case(lambda t, r: (["eval", r / "pretrain-hybrid", "--data", _with_tokens(t, r, "val", [0])],
                                            "holds 1 token: at least 2")),
    "empty val.bin": Case(lambda t, r: (["eval", r / "pretrain-hybrid", "--data", _with_tokens(t, r, "val", [])],
                                        "holds 0 tokens: at least 2")),
    # Unbounded inputs.
    "corpus a FIFO": Case(lambda t, r: (["prepare", "--corpus", _fifo(t), "--out", t / "d"],
                                        "is not a regular file or a directory")),
    "corpus /dev/zero": Case(lambda t, r: (["prepare", "--corpus", "/dev/zero", "--out", t / "d"],
                                           "is not a regular file or a directory")),
    "corpus a link to /dev/zero": Case(lambda t, r: (["prepare", "--corpus", _link(t, "/dev/zero"), "--out", t / "d"],
                                                     "is not a regular file or a directory")),
    "corpus over the size limit": Case(lambda t, r: (["prepare", "--corpus", _sparse(t, MAX_CORPUS_BYTES + 1),
                                                      "--out", t / "d"], "over the limit of 1,073,741,824")),
    "corpus folder over the size limit": Case(lambda t, r: (["prepare", "--corpus", _sparse_folder(t), "--out",
                                                             t / "d"], "over the limit")),
    "tokenizer.json a FIFO": Case(lambda t, r: (["eval", _fifo_in(t, r, "tokenizer.json")], "is a FIFO")),
    "config.json a FIFO": Case(lambda t, r: (["eval", _fifo_in(t, r, "config.json")], "is not a checkpoint")),
    "weights padded to a huge size": Case(lambda t, r: (["eval", _sparse_in(t, r, "model.safetensors")],
                                                        "more than its config.json's model can take")),
    "resume weights padded to a huge size": Case(lambda t, r: (_resume(r, _sparse_in(t, r, "model.safetensors")),
                                                               "more than its config.json's model can take")),
    "trainer state padded to a huge size": Case(lambda t, r: (_resume(r, _sparse_in(t, r, "trainer_state.pt")),
                                                              "more than this model's optimizer state can take")),
    "tokenizer.json over the size limit": Case(lambda t, r: (["eval", _sparse_in(t, r, "tokenizer.json")],
                                                             "over the limit")),
    # A file system that refuses writes.
    "pretrain read-only": Case(lambda t, r: (_pretrain(r, "--out", t / "new"), "read-only file system"),
                               code=1, fault="erofs"),
    "resume read-only": Case(lambda t, r: (_resume(r, _copy(t, r)), "read-only file system"), code=1, fault="erofs"),
    "prepare read-only": Case(lambda t, r: (["prepare", "--out", t / "d", "--vocab-size", "300"],
                                            "read-only file system"), code=1, fault="erofs"),
    "prepare --force read-only": Case(lambda t, r: (["prepare", "--run-dir", r, "--preset", "smoke", "--force"],
                                                    "read-only file system"), code=1, fault="erofs"),
    "prepare-chat read-only": Case(lambda t, r: (["prepare-chat", "--out", t / "c"], "read-only file system"),
                                   code=1, fault="erofs"),
    "bench --out read-only": Case(lambda t, r: (["bench", r / "pretrain-hybrid", "--no-peer", "--no-naive",
                                                 "--contexts", "8", "--batch-sizes", "1", "--new-tokens", "2",
                                                 "--repeats", "1", "--warmup", "0", "--out", t / "b.json"],
                                                "read-only file system"), code=1, fault="erofs"),
    "bench --out onto a user's file": Case(lambda t, r: (_bench_out(r, _jsonl(t, "mine\n", "notes.txt")),
                                                         "notes.txt exists and is not a bench result")),
    "bench --out onto a checkpoint's config": Case(lambda t, r: (_bench_out(r, _copy(t, r) / "config.json"),
                                                                 "config.json exists and is not a bench result")),
    "pretrain without permission": Case(lambda t, r: (_pretrain(r, "--out", t / "new"), "permission denied"),
                                        code=1, fault="eacces"),
    "pretrain onto a full disk": Case(lambda t, r: (_pretrain(r, "--out", t / "new", "--max-steps", "2"),
                                                    "no space left on device"), code=1, fault="enospc:1"),
}


def _in_cwd(t):
    (t / "notes.txt").write_text("mine\n")  # the test runs in t
    return "."


def _link(t, target):
    os.symlink(target, t / "link.txt")
    return t / "link.txt"


def _sparse_folder(t):
    d = t / "texts"
    d.mkdir()
    for name in ("a.txt", "b.txt"):
        _sparse(d, MAX_CORPUS_BYTES // 2 + 1, name)
    return d


def _verdict_onto_dir(t):
    argv = _verdict(t, "importance/pretrain-standard/importance.json", json.dumps({"recommendation": {
        "pattern": "AM", "same_as_deep": True, "deep_pattern": "AM"}}))
    (t / "rd" / "hypothesis.md").mkdir()
    return argv


def _bench_out(r, out):
    return ["bench", r / "pretrain-hybrid", "--no-peer", "--no-naive", "--contexts", "8", "--batch-sizes", "1",
            "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--out", out]


def _verdict(t, name, text):
    """`verdict` over a run directory holding one analysis result, ``name``, with ``text`` in it (None: a FIFO)."""
    (t / "rd" / name).parent.mkdir(parents=True)
    os.mkfifo(t / "rd" / name) if text is None else (t / "rd" / name).write_text(text)
    return ["verdict", "--run-dir", t / "rd"]


def _ablation(first_only=False, **change):
    """ablate.json of AAAA and AAMM, with ``change`` in each variant (in the first only: ``first_only``)."""
    variant = {"parameters": 1, "kv_bytes_per_token": 1, "decode_tok_s": 10.0,
               "val_bpb": {"mean": 2.0, "values": [2.0], "ci95": None}}
    return json.dumps({"decode": {"context": 8}, "variants": [
        {**variant, "spec": s, **(change if i == 0 or not first_only else {})} for i, s in enumerate(("AAAA", "AAMM"))
    ]})


def _sparse_in(t, r, name):
    ckpt = _copy(t, r)
    with open(ckpt / name, "r+b") as f:
        f.truncate(fsutil.JSON_LIMIT + 1)
    return ckpt


# -- faults -----------------------------------------------------------------------------------------

def _refusing_writes(monkeypatch, roots, code):
    """Make every write under ``roots`` fail as a read-only (EROFS) or forbidden (EACCES) file system would."""
    roots = [os.path.abspath(r) for r in roots]

    def under(path):
        if isinstance(path, int):
            return False
        p = os.path.abspath(os.fspath(path))
        return any(p == r or p.startswith(r + os.sep) for r in roots)

    def refuse(path):
        return OSError(code, os.strerror(code), os.fspath(path))

    real_open, real_os_open = builtins.open, os.open
    real = {name: getattr(os, name) for name in ("mkdir", "rename", "replace", "unlink", "remove", "rmdir")}

    def fake_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and under(file):
            raise refuse(file)
        return real_open(file, mode, *a, **k)

    def fake_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC) and under(path):
            raise refuse(path)
        return real_os_open(path, flags, *a, **k)

    def mkdir(path, *a, **k):
        if under(path):
            raise FileExistsError(errno.EEXIST, "File exists", path) if os.path.lexists(path) else refuse(path)
        return real["mkdir"](path, *a, **k)

    def two(name):
        def fake(src, dst, *a, **k):
            if under(src) or under(dst):
                raise refuse(src)
            return real[name](src, dst, *a, **k)
        return fake

    def one(name):
        def fake(path, *a, **k):
            if under(path) and "dir_fd" not in k:
                raise FileNotFoundError(errno.ENOENT, "No such file", path) if not os.path.lexists(path) \
                    else refuse(path)
            return real[name](path, *a, **k)
        return fake

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)
    for name in ("rename", "replace"):
        monkeypatch.setattr(os, name, two(name))
    for name in ("unlink", "remove", "rmdir"):
        monkeypatch.setattr(os, name, one(name))


def _disk_full_after(monkeypatch, ok_writes):
    """Let ``ok_writes`` files be written, then fail every write with ENOSPC, as a filling disk does."""
    real = fsutil._write_file
    count = [0]

    def write(path, data):
        count[0] += 1
        if count[0] > ok_writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(fsutil, "_write_file", write)


def _apply(fault, monkeypatch, roots):
    if fault is None:
        return
    if fault.startswith("enospc"):
        _disk_full_after(monkeypatch, int(fault.split(":")[1]) - 1)
    else:
        _refusing_writes(monkeypatch, roots, {"erofs": errno.EROFS, "eacces": errno.EACCES}[fault])


def snapshot(*roots):
    """Every entry under ``roots``: a file's bytes (hashed), a link's target, or its kind."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    out[p] = "link:" + os.readlink(p)
                elif stat.S_ISREG(st.st_mode):
                    with open(p, "rb") as f:
                        out[p] = hashlib.sha256(f.read()).hexdigest()
                else:
                    out[p] = "dir" if stat.S_ISDIR(st.st_mode) else "special"
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_line_and_changes_nothing(case, run_dir, tmp_path, capsys, monkeypatch):
    spec = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv, expected = spec.build(work, run_dir)
    before = snapshot(run_dir, work)
    capsys.readouterr()
    with monkeypatch.context() as m:
        _apply(spec.fault, m, [run_dir, work])
        code, err = run_bad(argv, capsys)
    lines = err.strip().splitlines()
    assert code == spec.code, err
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err and len(lines[0]) < 600
    assert snapshot(run_dir, work) == before  # every file that existed is byte-identical, and nothing was added


def test_the_catalogue_is_large():
    assert len(CASES) >= 80
