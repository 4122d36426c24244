"""`hybrid-gpt export` (interop.exporter): bad input is one line and exit 2, refused before any weight is read and
leaving every file as it was; --overwrite replaces an earlier export only; a missing optional package names the
extra that installs it."""

import sys

import pytest
from data.chatml import chatml_tokenizer
from helpers import run_bad
from hf_models import our_model

from hybrid_gpt.checkpoint import save_checkpoint
from hybrid_gpt.cli import main
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.interop.exporter import export_model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{name: checkpoint}: a standard Llama, a hybrid Llama and a standard GPT-2, with the ChatML tokenizer."""
    root = tmp_path_factory.mktemp("export-ckpts")
    tok = chatml_tokenizer()
    out = {}
    for name, family, layers in (("llama", "llama", "AAAA"), ("hybrid", "llama", "AAMM"), ("gpt2", "gpt2", "AA")):
        out[name] = root / name
        save_checkpoint(out[name], our_model(family, layers, tok.vocab_size), tok, {"stage": "test"})
    return out


def _cli(*argv) -> int:
    return main([str(a) for a in argv])


def _snapshot(*roots):
    return {p: p.read_bytes() if p.is_file() else None for r in roots for p in sorted(r.rglob("*"))}


def _one_line(argv, capsys):
    code, err = run_bad(argv, capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (code, err)
    return err


def test_help_works(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--format {hf,gguf}" in out and "--overwrite" in out and "trust_remote_code" in out


def test_a_standard_model_exports_to_both_formats_through_the_cli(ckpts, tmp_path, capsys):
    assert _cli("export", ckpts["llama"], "--format", "hf", "--out", tmp_path / "hf") == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert _cli("export", ckpts["llama"], "--format", "gguf", "--out", tmp_path / "m.gguf") == 0
    assert "GGUF (llama)" in capsys.readouterr().out and (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"
    assert _cli("export", ckpts["hybrid"], "--format", "hf", "--out", tmp_path / "hy") == 0
    assert "trust_remote_code=True" in capsys.readouterr().out


def _bad_cases(ckpts, tmp):
    """(argv, what the line says), each against the files in ``tmp``: an earlier export of each format, a user's
    file named like a GGUF file, a directory named like one, another program's model directory."""
    hf, gguf_file, user, folder = tmp / "hf", tmp / "m.gguf", tmp / "notes.gguf", tmp / "dir.gguf"
    llama, hybrid = str(ckpts["llama"]), str(ckpts["hybrid"])
    return [
        (["export", tmp / "missing", "--format", "hf", "--out", tmp / "o"], "does not exist"),
        (["export", llama, "--format", "onnx", "--out", tmp / "o"], "invalid choice: 'onnx'"),
        (["export", llama, "--out", tmp / "o"], "the following arguments are required: --format"),
        (["export", llama, "--format", "hf"], "the following arguments are required: --out"),
        (["export", llama, "--format", "hf", "--out", hf], "already exists; pass --overwrite"),
        (["export", llama, "--format", "gguf", "--out", gguf_file], "already exists; pass --overwrite"),
        (["export", hybrid, "--format", "gguf", "--out", tmp / "h.gguf"], "llama.cpp has no per-token MLP mixer (M)"),
        (["export", ckpts["gpt2"], "--format", "gguf", "--out", tmp / "g.gguf"], "of the gpt2 family"),
        (["export", llama, "--format", "gguf", "--out", tmp / "model.bin"], "ends in .gguf"),
        (["export", llama, "--format", "hf", "--out", ckpts["hybrid"], "--overwrite"],
         "is not a Hugging Face model directory: it holds chat_template.json"),
        (["export", llama, "--format", "hf", "--out", tmp / "theirs", "--overwrite"], "not a hybrid-gpt export's"),
        (["export", llama, "--format", "hf", "--out", ckpts["llama"], "--overwrite"], "would replace the source"),
        (["export", llama, "--format", "hf", "--out", ckpts["llama"].parent, "--overwrite"],
         "would replace the source"),
        (["export", llama, "--format", "gguf", "--out", user, "--overwrite"], "is not a GGUF file"),
        (["export", llama, "--format", "gguf", "--out", folder, "--overwrite"], "is not a regular file"),
        (["export", llama, "--format", "hf", "--out", gguf_file, "--overwrite"], "is a file, not a"),
        (["export", llama, "--format", "hf", "--out", tmp / "o", "--dtype", "int8"], "invalid choice: 'int8'"),
    ]


def test_bad_input_is_one_line_and_touches_nothing(ckpts, tmp_path, capsys):
    assert _cli("export", ckpts["llama"], "--format", "hf", "--out", tmp_path / "hf") == 0
    assert _cli("export", ckpts["llama"], "--format", "gguf", "--out", tmp_path / "m.gguf") == 0
    (tmp_path / "notes.gguf").write_text("a week of notes\n")
    (tmp_path / "dir.gguf").mkdir()
    (tmp_path / "theirs").mkdir()  # a model someone downloaded: an export's file names, not our export
    (tmp_path / "theirs" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}\n')
    (tmp_path / "theirs" / "model.safetensors").write_bytes(b"weights")
    capsys.readouterr()
    before = _snapshot(tmp_path, ckpts["llama"].parent)
    for argv, expected in _bad_cases(ckpts, tmp_path):
        err = _one_line(argv, capsys)
        assert expected in err, (argv, err)
    assert _snapshot(tmp_path, ckpts["llama"].parent) == before


@pytest.mark.parametrize("fmt, out", [("hf", "hf"), ("gguf", "m.gguf")])
def test_overwrite_replaces_an_earlier_export(fmt, out, ckpts, tmp_path, capsys):
    out = tmp_path / out
    assert _cli("export", ckpts["llama"], "--format", fmt, "--out", out) == 0
    first = _snapshot(tmp_path)
    assert _cli("export", ckpts["llama"], "--format", fmt, "--out", out, "--dtype", "float16", "--overwrite") == 0
    second = _snapshot(tmp_path)
    assert set(second) == set(first) and second != first  # the same files, of other weights; no temporary left


def test_missing_packages_name_the_extra(ckpts, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with pytest.raises(HybridGPTError, match=r"needs `transformers`: install it with `uv sync --extra export`"):
        export_model(ckpts["llama"], "hf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    export_model(ckpts["hybrid"], "hf", tmp_path / "hy")  # ours alone: no transformers needed to write it
    assert (tmp_path / "hy" / "modeling_hybrid_gpt.py").is_file()
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(HybridGPTError, match=r"writing GGUF files needs the `gguf` package: .*--extra export"):
        export_model(ckpts["llama"], "gguf", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_float16_overflow_is_refused(tmp_path):
    import torch

    tok = chatml_tokenizer()
    model = our_model("llama", "AA", tok.vocab_size)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = 1e5
    save_checkpoint(tmp_path / "ckpt", model, tok, {"stage": "test"})
    for fmt, out in (("hf", "hf"), ("gguf", "m.gguf")):
        with pytest.raises(HybridGPTError, match="beyond float16's range"):
            export_model(tmp_path / "ckpt", fmt, tmp_path / out, "float16")
        assert not (tmp_path / out).exists()
