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
    res = decode_speeds({"hybrid": smoke_model("AM"), "standard": smoke_model("AA")}, repeats=2, log=lambda *a: None)
    assert res["tok_s"]["hybrid"]["values"] == rates["AM"]
    ratios = res["ratios"]
    assert list(ratios) == ["hybrid", "standard"] and ratios["hybrid"] == {"ratio": 1.0, "ci95": [1.0, 1.0], "n": 2}
    expected = ratio_ci(rates["AA"], rates["AM"])
    assert ratios["standard"]["ratio"] == pytest.approx(expected["ratio"])
    assert ratios["standard"]["ci95"] == pytest.approx(expected["ci95"])
    assert len(res["order"]) == 2 and all(sorted(o) == ["hybrid", "standard"] for o in res["order"])
