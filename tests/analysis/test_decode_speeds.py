import pytest
from helpers import smoke_model

from hybrid_gpt.analysis.ablate import decode_speeds
from hybrid_gpt.infer import bench
from hybrid_gpt.stats import ratio_ci


def test_decode_speeds_gives_paired_ratios_against_the_first_model(monkeypatch):
    rates = {"AM": [100.0, 300.0], "AA": [50.0, 100.0]}
    count = {}

    def fake(decoder, tokens, n, device):
        name = decoder.model.config.layers
        count[name] = count.get(name, 0) + 1
        return rates[name][count[name] - 1 - 1] if count[name] > 1 else 1.0  # the first call is the warm-up

    monkeypatch.setattr(bench, "decode_rate", fake)
    res = decode_speeds({"hybrid": smoke_model("AM"), "standard": smoke_model("AA")}, repeats=2)
    assert res["tok_s"]["hybrid"]["values"] == rates["AM"]
    ratios = res["ratios"]
    assert list(ratios) == ["hybrid", "standard"] and ratios["hybrid"] == {"ratio": 1.0, "ci95": [1.0, 1.0], "n": 2}
    expected = ratio_ci(rates["AA"], rates["AM"])
    assert ratios["standard"]["ratio"] == pytest.approx(expected["ratio"])
    assert ratios["standard"]["ci95"] == pytest.approx(expected["ci95"])
    assert len(res["order"]) == 2 and all(sorted(o) == ["hybrid", "standard"] for o in res["order"])


def test_ablate_json_keeps_the_paired_ratios_and_values(monkeypatch):
    """_decode_speeds stores the ratios against the first variant and every repeat's value (they pair)."""
    from hybrid_gpt import checkpoint
    from hybrid_gpt.analysis.ablate import Variant, _decode_speeds

    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda path, device: (smoke_model(str(path)), None, None))
    variants = [Variant("AA", "AA", 0), Variant("AM", "AM", 0)]
    dec = _decode_speeds(variants, {"AA": {1: "AA"}, "AM": {1: "AM"}}, 1, "cpu", 2)
    assert set(dec["ratios"]) == {"AA", "AM"} and dec["ratios"]["AA"]["ratio"] == 1.0
    assert all(len(v) == 2 for v in dec["tok_s_values"].values()) and dec["tok_s"]["AM"] > 0
    expected = ratio_ci(dec["tok_s_values"]["AM"], dec["tok_s_values"]["AA"])
    assert dec["ratios"]["AM"]["ratio"] == pytest.approx(expected["ratio"])
