"""Issue 27, class 2: no figure is computed on data that is not the model's. Every command that reads a
model's tokens goes through checkpoint.checkpoint_data (the data must be of the model's own tokenizer) before
any work; bench scores each model on its own data; a checkpoint finds its data through what config.json
records, wherever it was written."""

import json
import shutil
from pathlib import Path

import pytest
from helpers import run_bad, smoke_config, smoke_model, tiny_chat_files
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid_gpt.checkpoint import checkpoint_data, checkpoint_data_dir, load_checkpoint, save_checkpoint
from hybrid_gpt.cli import main
from hybrid_gpt.data.corpus import Corpus, Document
from hybrid_gpt.data.tokens import prepare_data
from hybrid_gpt.fsutil import write_json
from hybrid_gpt.infer.bench import BenchConfig
from hybrid_gpt.model.gpt import GPT
from hybrid_gpt.train.evaluate import evaluate_lm


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """A run directory whose data has another tokenizer (280 tokens) and a model of it (random weights:
    which data it is scored on is what matters here), at other/model."""
    root = tmp_path_factory.mktemp("other-tokenizer")
    text = "".join(f"A{i % 5}:\nline {i} of it, and {i * 7 % 13} more\n\n" for i in range(400))
    corpus = Corpus(train=[Document("a", text[: len(text) // 2])], val=[Document("b", text[len(text) // 2:])],
                    source="other corpus")
    prepare_data(corpus, root / "data", 280)
    from hybrid_gpt.data.tokens import TokenData

    data = TokenData.open(root / "data")
    model = smoke_model("AA", vocab_size=data.tokenizer.vocab_size)
    save_checkpoint(root / "model", model, data.tokenizer,
                    {"stage": "pretrain", "model_type": "other", "data_dir": str((root / "data").resolve())})
    return root


def _boom(*a, **k):
    raise AssertionError("a model ran before the inputs were checked")


@pytest.mark.parametrize("order", ["ours first", "other first"])
def test_bench_scores_every_model_on_its_own_data(pretrained, other, order, capsys):
    """The case of the issue: the second model's bits per byte were measured on the first one's tokens (5.78
    where the real figure is 4.23), and with the order swapped the run ended in an IndexError."""
    paths = [pretrained / "pretrain-standard", other / "model"]
    if order == "other first":
        paths.reverse()
    code = main(["bench", *map(str, paths), "--dtypes", "float32,bfloat16", "--json", "--contexts", "16",
                 "--new-tokens", "4", "--repeats", "1", "--warmup", "0", "--batch-sizes", "1", "--no-peer",
                 "--no-naive"])
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    tokens = BenchConfig().quality_tokens
    for path, name in ((pretrained / "pretrain-standard", "standard"), (other / "model", "other")):
        model, tok, training = load_checkpoint(path)
        own = evaluate_lm(model, checkpoint_data(path, tok, training).val, tok.token_byte_lengths(), tokens)["bpb"]
        assert res["quality"][name]["bpb_float32"] == pytest.approx(own, rel=1e-6), name
        assert f"{name}@bfloat16" in res["quality"]


def test_bench_without_a_models_data_skips_its_quality_before_timing(pretrained, other, tmp_path, capsys):
    lone = tmp_path / "lone"
    shutil.copytree(other / "model", lone)
    cfg = json.loads((lone / "config.json").read_text())
    cfg["training"]["data_dir"] = str(tmp_path / "gone")
    (lone / "config.json").write_text(json.dumps(cfg))
    assert main(["bench", str(pretrained / "pretrain-standard"), str(lone), "--dtypes", "float32,bfloat16",
                 "--contexts", "16", "--new-tokens", "4", "--repeats", "1", "--warmup", "0", "--batch-sizes", "1",
                 "--no-peer", "--no-naive"]) == 0
    out = capsys.readouterr().out
    assert out.index("quality of other: skipped") < out.index("context")  # said before the measurements
    assert "quality standard@bfloat16" in out and "quality other" not in out.replace("quality of other", "")


@pytest.mark.parametrize("command", ["eval", "importance", "distill", "static", "retrofit"])
def test_every_reader_refuses_data_of_another_tokenizer_before_any_work(pretrained, other, command, tmp_path,
                                                                        capsys, monkeypatch):
    ckpt = pretrained / "pretrain-standard"
    extra = {"importance": ["--out", tmp_path / "imp"], "distill": ["--layers", "AM", "--out", tmp_path / "d"],
             "static": ["--out", tmp_path / "s", "--context", "32", "--short-context", "0"],
             "retrofit": ["--quick", "--chat-data", tmp_path, "--out", tmp_path / "r", "--eval-context", "32",
                          "--tokens-per-row", "32", "--passkey-contexts", "32", "--speed-contexts", "32",
                          "--decode-tokens", "4", "--ks", "0,1"]}.get(command, [])
    if command == "retrofit":
        sft, _ = tiny_chat_files(tmp_path)
        sft.rename(tmp_path / "sft_val.jsonl")
    monkeypatch.setattr(GPT, "forward", _boom)
    code, err = run_bad([command, ckpt, "--data", other / "data", *extra], capsys)
    assert code == 2 and "tokenizer" in err and "differs" in err and len(err.strip().splitlines()) == 1, err
    assert not any(p.name in ("imp", "d", "s", "r") for p in tmp_path.iterdir())


def test_probe_checks_each_checkpoints_data_before_training(pretrained, other, tmp_path, capsys, monkeypatch):
    """`probe --checkpoints X` trained every probe model, then said "no prepared data"."""
    lone = tmp_path / "lone"
    shutil.copytree(other / "model", lone)
    cfg = json.loads((lone / "config.json").read_text())
    del cfg["training"]["data_dir"]
    (lone / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(GPT, "forward", _boom)
    code, err = run_bad(["probe", "--preset", "smoke", "--run-dir", pretrained, "--checkpoints", lone,
                         "--out", tmp_path / "p", "--steps", "1"], capsys)
    assert code == 2 and f"no prepared data for the checkpoint {lone}" in err and "--data" in err, err
    assert not (tmp_path / "p").exists()


def test_a_finetuned_checkpoint_written_anywhere_finds_its_data(pretrained, tmp_path, capsys):
    """`eval` of a checkpoint written with --out outside the run directory looked for <out>/../data, although
    the chain of config.json files (sft's init -> the pretrained model's data_dir) records where it is."""
    sft, _ = tiny_chat_files(tmp_path)
    out = tmp_path / "far" / "away" / "sft"
    argv = ["sft", "--preset", "smoke", "--run-dir", pretrained, "--init", pretrained / "pretrain-standard",
            "--sft-data", sft, "--out", out, "--max-steps", "1", "--eval-interval", "1"]
    assert main([str(a) for a in argv]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--eval-tokens", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 64


def _chain(tmp_path, n: int, recorded: set[int], cycle: bool) -> list:
    """n checkpoints, each fine-tuned from the one before (config.json alone); those in ``recorded`` record a
    data directory of their own. With ``cycle`` the first names the last as its init."""
    paths = [tmp_path / f"c{i}" for i in range(n)]
    for i, path in enumerate(paths):
        training = {"stage": "sft"}
        if i:
            training["init"] = str(paths[i - 1])
        elif cycle:
            training["init"] = str(paths[-1])
        if i in recorded:
            (tmp_path / f"data{i}").mkdir(exist_ok=True)
            (tmp_path / f"data{i}" / "meta.json").write_text("{}")
            training["data_dir"] = str(tmp_path / f"data{i}")
        path.mkdir(exist_ok=True)
        write_json(path / "config.json", {"model": smoke_config("AA").to_dict(), "training": training})
    return paths


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 6), recorded=st.sets(st.integers(0, 5)), cycle=st.booleans())
def test_the_data_found_is_the_nearest_recorded_up_the_chain(tmp_path_factory, n, recorded, cycle):
    tmp = tmp_path_factory.mktemp("chain")
    paths = _chain(tmp, n, recorded, cycle)
    training = json.loads((paths[-1] / "config.json").read_text())["training"]
    nearest = max((i for i in recorded if i < n), default=None)  # a cycle ends the walk, never loops
    expected = tmp / f"data{nearest}" if nearest is not None else paths[-1].parent / "data"
    assert checkpoint_data_dir(paths[-1], training) == expected


@pytest.mark.parametrize("kind, files", [
    ("a chat data directory", ["meta.json", "sft_train.jsonl", "sft_val.jsonl"]),
    ("a chat data directory", ["meta.json", "dpo_train.jsonl"]),
    ("a checkpoint", ["config.json", "model.safetensors"]),
])
def test_data_of_another_kind_is_named_not_called_damaged(pretrained, tmp_path, kind, files, capsys):
    """`importance --data CHAT_DIR` said "meta.json is damaged... re-run prepare --force": the wrong diagnosis."""
    for name in files:
        (tmp_path / "x" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "x" / name).write_text('{"files": {}}' if name == "meta.json" else "")
    for command in (["importance", pretrained / "pretrain-standard", "--out", tmp_path / "imp"],
                    ["eval", pretrained / "pretrain-standard"]):
        code, err = run_bad([*command, "--data", tmp_path / "x"], capsys)
        assert code == 2 and f"is {kind}" in err and "not prepared token data" in err, err
        assert "written by `hybrid-gpt prepare`" in err
        assert "damaged" not in err


def test_token_ids_of_the_other_order_never_reach_an_embedding(pretrained, other):
    """The IndexError of the swapped bench: the larger vocabulary's ids index past the smaller embedding.
    checkpoint_data refuses the pairing in either direction."""
    from hybrid_gpt.errors import HybridGPTError

    for model_dir, data_dir in ((pretrained / "pretrain-standard", other / "data"),
                                (other / "model", pretrained / "data")):
        _, tok, training = load_checkpoint(model_dir)
        with pytest.raises(HybridGPTError, match="differs"):
            checkpoint_data(model_dir, tok, training, data_dir)


def test_a_relative_recorded_data_dir_is_found_from_where_it_was_given(tmp_path, monkeypatch):
    """Older retrofit arms recorded the data directory as the user typed it (relative to where it ran)."""
    (tmp_path / "work" / "run" / "data").mkdir(parents=True)
    (tmp_path / "work" / "run" / "data" / "meta.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "work")
    ckpt = tmp_path / "elsewhere" / "arm"
    assert checkpoint_data_dir(ckpt, {"data_dir": "run/data"}) == Path("run/data")
    assert checkpoint_data_dir(ckpt, {"data_dir": "nowhere/data"}) == ckpt.parent / "data"
