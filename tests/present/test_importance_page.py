"""Layer importance's page and plot from a small fixed importance.json."""

import json

from hybrid_gpt.present.importance import render_importance_markdown, write_outputs


def _layer(n, sim, drop, mean):
    return {"layer": n, "similarity": sim, "drop": {"loss": 2 + drop, "loss_increase": drop, "bpb_increase": drop / 2},
            "mean": {"loss": 2 + mean, "loss_increase": mean, "bpb_increase": mean / 2}}


def _joint(drop, mean):
    return {"drop": {"loss_increase": drop}, "mean": {"loss_increase": mean}}


RESULT = {"checkpoint": "runs/x/pretrain-standard", "layers": "AAAA", "settings": {"context": 128},
          "data": {"source": "the plays"}, "intact": {"tokens": 4096, "bytes": 12000, "loss": 2.0, "bpb": 1.5},
          "per_layer": [_layer(1, 0.8, 0.5, 0.3), _layer(2, 0.95, 0.1, 0.2), _layer(3, 0.9, 0.05, 0.01)],
          "ranking": {"by_similarity": [2, 3, 1], "by_drop": [3, 2, 1], "by_mean": [3, 2, 1], "orders_agree": False,
                      "spearman": 0.5, "least_important_agree": True},
          "recommendation": {"k": 2, "replace": [2, 3], "pattern": "AMMA", "deep_replace": [3, 4],
                             "deep_pattern": "AAMM", "same_as_deep": False,
                             "joint": {"recommended": _joint(0.2, 0.1), "deep": _joint(0.3, 0.2)}},
          "plot": "importance-layers.png"}


def test_the_page_has_the_layers_the_orders_and_the_recommendation():
    lines = render_importance_markdown(RESULT).splitlines()
    assert lines[0] == "## Layer importance: pretrain-standard (AAAA)"
    assert lines[2].startswith("Over 4,096 validation tokens (12,000 bytes) of the plays in windows of 128 tokens, ")
    assert "| 2 | 0.9500 | 2.1000 | +0.1000 | +0.0500 | 2.2000 | +0.2000 | +0.1000 |" in lines
    orders = next(line for line in lines if line.startswith("From least to most important"))
    assert "The similarity and drop orders disagree (Spearman rank correlation +0.50)" in orders
    assert ("Replacing a layer's attention by its mean output costs less than dropping it in 2 of 3 attention "
            "layers.") in lines
    assert "| 3, 4 | `AAMM` | +0.3000 | +0.2000 |" in lines
    assert "Dropped together, the recommended choice costs 0.1000 nats/token less." in lines
    assert lines[-1] == "![layer importance](importance-layers.png)"


def test_write_outputs(tmp_path):
    write_outputs(dict(RESULT), tmp_path)
    assert json.loads((tmp_path / "importance.json").read_text()) == RESULT
    assert (tmp_path / "importance.md").read_text() == render_importance_markdown(RESULT)
    assert (tmp_path / "importance-layers.png").stat().st_size > 1000
