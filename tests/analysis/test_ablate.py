import json

import pytest
from helpers import quiet

from hybrid_gpt.analysis.ablate import matched_hidden, parse_variants, run_ablate, sentences
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.model.gpt import GPTConfig
from hybrid_gpt.presets import get_preset

CPU = get_preset("cpu")


def _params(layers, h=0):
    return GPTConfig(vocab_size=4096, block_size=CPU["block_size"], n_embd=CPU["n_embd"], n_head=CPU["n_head"],
                     layers=layers, mlp_hidden=h).num_params()


def test_matched_hidden_gives_the_standard_models_parameter_count():
    h = matched_hidden(CPU, 4096, "AAMM")
    target = _params("AAAA")
    # The closest width: one more or one less would be further from the standard's count.
    assert abs(_params("AAMM", h) - target) <= min(abs(_params("AAMM", h + 1) - target),
                                                  abs(_params("AAMM", h - 1) - target))
    assert abs(_params("AAMM", h) - target) / target < 0.001
    assert h > CPU["n_embd"] // 4  # much wider than the tiny default


def test_variants_parse_and_refuse_nonsense():
    vs = parse_variants(["AAAA", "aamm", "AAMM:64", "AAMM:matched", "AA"], CPU, 4096)
    assert [v.slug for v in vs] == ["AAAA", "AAMM", "AAMM-h64", f"AAMM-h{matched_hidden(CPU, 4096, 'AAMM')}", "AA"]
    for bad, msg in (["AAXM"], "layer pattern"), (["AANN:64"], "no M block"), (["AAMM", "AAMM"], "repeats"), \
                    (["AAAA:matched"], "no M block"), (["AAMM:-3"], "layer pattern"):
        with pytest.raises(HybridGPTError, match=msg):
            parse_variants(bad, CPU, 4096)


def test_ablate_trains_every_variant_and_seed_then_reports(smoke_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run / "data", run_dir / "data")
    result = run_ablate(run_dir=run_dir, preset="smoke", patterns=["AA", "AM", "AN"], seeds=[1, 2], steps=4,
                        device="cpu", bench_repeats=1, log=quiet)
    out = run_dir / "ablate"
    assert json.loads((out / "ablate.json").read_text()) == json.loads(json.dumps(result))
    assert [e["spec"] for e in result["variants"]] == ["AA", "AM", "AN"]
    for e in result["variants"]:
        assert e["val_bpb"]["n"] == 2 and e["val_bpb"]["ci95"] is not None and e["decode_tok_s"] > 0
        assert e["steps"] == 4 and len(e["checkpoints"]) == 2
    kv = {e["spec"]: e["kv_bytes_per_token"] for e in result["variants"]}
    assert kv["AA"] == 2 * kv["AM"] and kv["AN"] == kv["AM"]
    md = (out / "ablate.md").read_text()
    assert md.startswith("## ") and "ablate-pareto.png" in md and "Ranked by mean bits per byte" in md
    assert (out / "ablate-pareto.png").read_bytes()[:4] == b"\x89PNG"
    # A second call finds every run complete and trains nothing.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/model.safetensors")}
    again = run_ablate(run_dir=run_dir, preset="smoke", patterns=["AA", "AM", "AN"], seeds=[1, 2], steps=4,
                       device="cpu", bench_repeats=1, log=quiet)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/model.safetensors")} == stamps
    assert [e["val_bpb"] for e in again["variants"]] == [e["val_bpb"] for e in result["variants"]]


def test_time_budget_gives_cheaper_variants_more_steps(smoke_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run / "data", run_dir / "data")
    result = run_ablate(run_dir=run_dir, preset="smoke", patterns=["AAAA", "A"], seeds=[1], steps=3,
                        budget="time", device="cpu", bench_repeats=1, log=quiet)
    cal = result["calibration"]
    assert cal["steps"]["AAAA"] == 3 and cal["reference"] == "AAAA"
    rates = cal["tokens_per_sec"]
    assert cal["steps"]["A"] == max(1, round(3 * rates["A"] / rates["AAAA"]))
    assert (run_dir / "ablate" / "calibration-3.json").is_file()


def test_sentences_answer_the_default_questions():
    def variant(spec, values):
        from hybrid_gpt.analysis.stats import mean_ci

        return {"spec": spec, "layers": spec.split(":")[0], "val_bpb": mean_ci(values), "decode_tok_s": 100.0,
                "mlp_hidden": 32, "parameters": 1000}

    result = {"variants": [variant("AAAA", [2.30, 2.31, 2.29]), variant("AAMM", [2.31, 2.32, 2.30]),
                           variant("AANN", [2.31, 2.32, 2.305]), variant("AA", [2.60, 2.61, 2.62])],
              "decode": {"context": 128}}
    text = "\n".join(sentences(result))
    assert "What the per-token MLP adds over dropping the attention" in text
    assert "AAMM - AANN" in text and "within noise" in text
    assert "AA - AAMM = +0.3000" in text and "AA is measurably worse" in text
    assert "MMAA" not in text  # absent variants are not judged
