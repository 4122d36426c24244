"""--overwrite (and every other replacement of a directory) never deletes what the command did not write,
at any depth: for each command that writes directories, a user's file one, two and three levels down, a
user's directory and a user's symbolic link are refused through the CLI, in one line naming it, and every
file is left byte-identical (issue 27, class 1). Also: output names as long as the file system takes work
(class 6: the hidden siblings' names once passed the limit after the work was done)."""

import os
import shutil
from dataclasses import dataclass

import pytest
from helpers import run_bad
from test_bad_inputs_data import run_dir, snapshot  # noqa: F401 (run_dir: the module's private run directory)

from hybrid_gpt import fsutil
from hybrid_gpt.analysis.ablate import ABLATE_FILES
from hybrid_gpt.analysis.distill import DISTILL_FILES
from hybrid_gpt.analysis.importance import IMPORTANCE_FILES
from hybrid_gpt.analysis.probe import PROBE_FILES
from hybrid_gpt.analysis.retrofit import RETROFIT_FILES
from hybrid_gpt.analysis.static import STATIC_FILES
from hybrid_gpt.checkpoint import CHECKPOINT_FILES
from hybrid_gpt.data.chat_data import CHAT_FILES
from hybrid_gpt.data.tokens import DATA_FILES
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import claimed_dir, foreign_entries, output_dir
from hybrid_gpt.interop.hf_export import HF_EXPORT_FILES


@dataclass
class Command:
    argv: object  # (run_dir, out) -> the command line that replaces ``out``
    spec: tuple  # the tree spec it is checked against
    own: tuple  # files it writes, relative to its output: what a previous output of it holds
    chain: tuple = ()  # the directories of its own that nest, outermost first: where a user's file may hide


CKPT = ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl")
STATIC_FLAGS = ["--context", "32", "--train-tokens", "4096", "--stop-tokens", "1024", "--eval-tokens", "1024",
                "--widths", "8", "--short-context", "16"]
RETROFIT_FLAGS = ["--quick", "--ks", "0,2", "--eval-context", "32", "--eval-tokens", "256", "--passkey-contexts",
                  "24", "--speed-contexts", "24", "--decode-tokens", "8", "--tokens-per-row", "32"]

COMMANDS = {
    "pretrain": Command(lambda r, o: ["pretrain", "--run-dir", r, "--preset", "smoke", "--no-progress", "--out", o,
                                      "--overwrite"], CHECKPOINT_FILES, CKPT),
    "sft": Command(lambda r, o: ["sft", "--run-dir", r, "--preset", "smoke", "--model-type", "hybrid",
                                 "--no-progress", "--out", o, "--overwrite"], CHECKPOINT_FILES, CKPT),
    "dpo": Command(lambda r, o: ["dpo", "--run-dir", r, "--preset", "smoke", "--init", r / "pretrain-hybrid",
                                 "--no-progress", "--out", o, "--overwrite"], CHECKPOINT_FILES, CKPT),
    "import": Command(lambda r, o: ["import", r / "pretrain-hybrid", "--out", o, "--overwrite"],
                      CHECKPOINT_FILES, CKPT),
    "export": Command(lambda r, o: ["export", r / "pretrain-hybrid", "--format", "hf", "--out", o, "--overwrite"],
                      HF_EXPORT_FILES, ("config.json", "model.safetensors", "tokenizer.json",
                                        "modeling_hybrid_gpt.py")),
    "distill": Command(lambda r, o: ["distill", r / "pretrain-standard", "--layers", "AM", "--out", o,
                                     "--overwrite"], DISTILL_FILES,
                       ("distill.json", "distill-mse.png", *(f"distilled/{n}" for n in CKPT),
                        "drop-finetuned/config.json"), ("distilled",)),
    "retrofit": Command(lambda r, o: ["retrofit", r / "pretrain-standard", *RETROFIT_FLAGS, "--out", o,
                                      "--overwrite"], RETROFIT_FILES,
                        ("retrofit.json", "retrofit.md", "retrofit-pareto-32.png",
                         *(f"arms/deepest-k2-drop/{n}" for n in CKPT)), ("arms", "deepest-k2-drop")),
    "prepare": Command(lambda r, o: ["prepare", "--out", o, "--force", "--vocab-size", "300"], DATA_FILES,
                       ("meta.json", "tokenizer.json", "train.bin", "val.bin")),
    "prepare-chat": Command(lambda r, o: ["prepare-chat", "--out", o, "--force"], CHAT_FILES,
                            ("meta.json", "sft_train.jsonl", "dpo_val.jsonl")),
    "probe": Command(lambda r, o: ["probe", "--run-dir", r, "--preset", "smoke", "--steps", "1", "--out", o],
                     PROBE_FILES, ("probe.json", "probe.md", "probe-accuracy.png")),
    "ablate": Command(lambda r, o: ["ablate", "--run-dir", r, "--preset", "smoke", "--steps", "1", "--out", o],
                      ABLATE_FILES, ("ablate.json", "calibration-1.json",
                                     *(f"AAMM-steps1-seed1/{n}" for n in (*CKPT, "trainer_state.pt"))),
                      ("AAMM-steps1-seed1",)),
    "importance": Command(lambda r, o: ["importance", r / "pretrain-standard", "--max-tokens", "64", "--out", o],
                          IMPORTANCE_FILES, ("importance.json", "importance-layers.png")),
    "static": Command(lambda r, o: ["static", r / "pretrain-standard", *STATIC_FLAGS, "--out", o, "--overwrite"],
                      STATIC_FILES, ("static.json", "state.json", "static-r2.png", "fits/mlp8-block1.safetensors",
                                     "captures/32-train/in-1.npy", "captures/32-train/done.json",
                                     "captures/32-eval/out-1.npy"), ("captures", "32-train")),
}


def _plant(out, command: Command, kind: str) -> str:
    """Put a user's entry into ``out`` (a previous output of ``command``), as deep in the command's own
    directories as they go; returns the path that the refusal must name."""
    chain = list(command.chain)
    if kind == "link-file":  # a link named as one of the command's files, to a user's file outside
        own = next(p for p in command.own if p.count("/") == len(chain))
        (out / own).unlink()
        (out.parent / "precious.txt").write_text("a user's file, reached through a link\n")
        os.symlink(out.parent / "precious.txt", out / own)
        return own
    if kind == "link-dir":  # a link named as the command's own directory, to a user's directory
        (out.parent / "precious").mkdir()
        (out.parent / "precious" / "config.json").write_text("{}\n")
        link = out.joinpath(*chain) if chain else out / "mine"
        if chain:
            shutil.rmtree(link)
        os.symlink(out.parent / "precious", link, target_is_directory=True)
        return "/".join(chain) if chain else "mine"
    leaf, depth = kind.split("-depth")
    where = chain[:int(depth) - 1]
    mine = ["mine"] * (int(depth) - 1 - len(where))  # below the command's own directories: a user's directory
    path = out.joinpath(*where, *mine, "notes.txt" if leaf == "file" else "myexp")
    path.parent.mkdir(parents=True, exist_ok=True)
    if leaf == "dir":
        path.mkdir()
        (path / "x.txt").write_text("an experiment of mine\n")
    else:
        path.write_text("a week of notes\n")
    if mine:
        return "/".join([*where, "mine"]) + "/"
    return "/".join([*where, path.name]) + ("/" if leaf == "dir" else "")


PLANTS = ["file-depth1", "file-depth2", "file-depth3", "dir-depth2", "link-file", "link-dir"]


@pytest.mark.parametrize("kind", PLANTS)
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_replacing_refuses_a_users_entry_at_any_depth(name, kind, run_dir, tmp_path, capsys,  # noqa: F811
                                                      monkeypatch):
    command = COMMANDS[name]
    work = tmp_path / "work"
    out = work / "out"
    for rel in command.own:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"written by hybrid-gpt\n")
    assert foreign_entries(out, command.spec) == []  # the previous output alone would be replaced
    named = _plant(out, command, kind)
    monkeypatch.chdir(work)
    before = snapshot(run_dir, work)
    code, err = run_bad(command.argv(run_dir, out), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "is not a" in lines[0] and f"holds {named}" in lines[0] and "left untouched" in lines[0], err
    assert "Traceback" not in err
    assert snapshot(run_dir, work) == before  # every file byte-identical, nothing added


# -- the tree spec itself ------------------------------------------------------------------------------

SPEC = ("a.json", "runs/*/config.json", "runs/*/model.safetensors")


def _tree(root, *files):
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("ours")


def test_our_hidden_siblings_at_any_depth_are_ours_and_other_kinds_are_not(tmp_path):
    out = tmp_path / "out"
    _tree(out, "a.json", ".a.json.tmp-123", "runs/x/config.json", "runs/x/.model.safetensors.tmp-9",
          "runs/.x.lock", "runs/.y.tmp-77/config.json", "runs/y.old/model.safetensors")
    (out / "runs" / "empty").mkdir()  # holds nothing to lose
    assert foreign_entries(out, SPEC) == []
    _tree(out, "runs/x/config.json/inside.txt".replace("config.json", "model.safetensors2"),
          ".b.json.tmp-1", "runs/.y.tmp-77/notes.txt", "runs/.x.tmp-1x")
    (out / "a.json").unlink()
    (out / "a.json").mkdir()  # a directory where the spec has a file
    os.mkfifo(out / "runs" / "x" / "config.json.fifo")
    assert foreign_entries(out, SPEC) == [".b.json.tmp-1", "a.json/", "runs/.x.tmp-1x", "runs/.y.tmp-77/notes.txt",
                                          "runs/x/config.json.fifo", "runs/x/model.safetensors2/"]


def test_a_link_is_never_followed_nor_deleted(tmp_path):
    mine = tmp_path / "mine"
    _tree(mine, "config.json", "model.safetensors")
    out = tmp_path / "out"
    _tree(out, "a.json", "runs/x/config.json")
    os.symlink(mine, out / "runs" / "y")  # a link to a user's directory that looks like ours
    with pytest.raises(HybridGPTError, match=r"it holds runs/y; it is left untouched"):
        with output_dir(out, allowed=SPEC, what="test output", overwrite=True):
            pass
    assert (out / "runs" / "y").is_symlink() and sorted(p.name for p in mine.iterdir()) == ["config.json",
                                                                                           "model.safetensors"]


def test_an_out_that_is_a_link_to_our_directory_replaces_only_the_link(tmp_path):
    real = tmp_path / "real"
    _tree(real, "a.json")
    os.symlink(real, tmp_path / "out")
    with output_dir(tmp_path / "out", allowed=SPEC, what="test output", overwrite=True) as tmp:
        (tmp / "a.json").write_text("new")
    assert (real / "a.json").read_text() == "ours" and (tmp_path / "out" / "a.json").read_text() == "new"
    assert not (tmp_path / "out").is_symlink()


def test_in_place_overwrite_deletes_only_after_the_whole_tree_is_checked(tmp_path):
    out = tmp_path / "out"
    _tree(out, "a.json", "runs/x/config.json", "runs/x/deep/notes.txt")
    with pytest.raises(HybridGPTError, match="runs/x/deep/"):
        with claimed_dir(out, allowed=SPEC, what="test output", overwrite=True, in_place=True):
            pass
    assert (out / "runs" / "x" / "deep" / "notes.txt").read_text() == "ours"
    (out / "runs" / "x" / "deep" / "notes.txt").unlink()
    (out / "runs" / "x" / "deep").rmdir()
    with claimed_dir(out, allowed=SPEC, what="test output", overwrite=True, in_place=True):
        assert not out.exists()  # the writer fills it afresh
    with claimed_dir(out, allowed=SPEC, what="test output", resume=True, in_place=True):
        pass  # nothing to delete; resume never deletes
    _tree(out, "a.json")
    with claimed_dir(out, allowed=SPEC, what="test output", resume=True, in_place=True):
        assert (out / "a.json").is_file()


def test_the_previous_version_of_a_swap_is_checked_before_the_work(tmp_path):
    _tree(tmp_path, "out/a.json", "out.old/a.json", "out.old/runs/x/notes.txt")
    with pytest.raises(HybridGPTError, match="out.old is not a test output: it holds runs/x/notes.txt"):
        with claimed_dir(tmp_path / "out", allowed=SPEC, what="test output", overwrite=True):
            raise AssertionError("the work started")
    assert (tmp_path / "out.old" / "runs" / "x" / "notes.txt").read_text() == "ours"


# -- output names as long as the file system takes ------------------------------------------------------

@pytest.mark.parametrize("length", [242, 245, 255])
def test_an_output_name_as_long_as_the_file_system_takes_is_written_and_locked(tmp_path, length):
    limit = fsutil.name_max(tmp_path)
    final = tmp_path / ("x" * min(length, limit))
    with output_dir(final, allowed=("a.txt",), what="test output") as tmp:
        assert len(os.fsencode(tmp.name)) <= limit
        (tmp / "a.txt").write_text("1")
    with output_dir(final, allowed=("a.txt",), what="test output", overwrite=True) as tmp:
        (tmp / "a.txt").write_text("2")
    fsutil.write_text(final / "b.txt", "atomic")
    fsutil.write_text(tmp_path / ("z" * (min(length, limit))), "a file of a long name")
    assert (final / "a.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([final.name, "z" * min(length, limit)])


def test_hidden_siblings_of_long_names_are_cut_at_a_character_and_stay_distinct(tmp_path):
    a, b = tmp_path / ("é" * 120 + "a"), tmp_path / ("é" * 120 + "b")  # 241 bytes, é is two
    names = [fsutil._temp(p).name for p in (a, b)] + [fsutil._lock(p).name for p in (a, b)]
    names += [fsutil._old(p).name for p in (a, b)]
    assert len(set(names)) == 6 and all(len(os.fsencode(n)) <= fsutil.name_max(tmp_path) for n in names)
    assert all(n.encode("utf-8") for n in names)  # no half character
    assert fsutil._lock(tmp_path / "short").name == ".short.lock" and fsutil._old(tmp_path / "s").name == "s.old"


def test_a_pretrain_into_a_245_character_out_finishes(run_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / ("r" * 245)
    code, err = run_bad(["pretrain", "--run-dir", run_dir, "--preset", "smoke", "--no-progress", "--out", out,
                         "--max-steps", "2", "--eval-interval", "2"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl", "model.safetensors",
                                                     "tokenizer.json", "trainer_state.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary or lock left


def test_an_out_name_longer_than_the_file_system_takes_is_refused_before_any_work(run_dir, tmp_path,  # noqa: F811
                                                                                 capsys):
    code, err = run_bad(["probe", "--run-dir", run_dir, "--preset", "smoke", "--out", tmp_path / ("p" * 256)], capsys)
    assert code == 2 and "--out: has a name of 256 bytes; its file system takes names of at most 255" in err, err
    assert len(err.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []
