"""The report's tables, from a results dict made up here (the pipeline test writes a real one)."""

import pytest

from hybrid_gpt.report import (
    _speed_sentence,
    dpo_paired_lines,
    headline_table,
    mcnemar_p,
    paired_accuracy,
    summarize,
)
from hybrid_gpt.stats import mean_ci

QUALITY = ["pretrain_val_loss", "pretrain_val_bpb", "dpo_val_loss", "dpo_val_bpb", "sft_val_loss",
           "dpo_val_rewards/accuracies", "dpo_val_rewards/margins"]


def made_up_results(standard_loss: float, hybrid_loss: float) -> dict:
    def figures(loss):
        return {**{k: 1.0 for k in QUALITY}, "dpo_val_loss": loss, "parameters": 1000, "kv_bytes_per_token": 64,
                "pretrain_train_seconds": 10.0, "pretrain_train_tokens_per_sec": 100.0}

    def rows(speed):
        return [{"context": 128, "batch": 1, "prefill_ms": {"median": 1 / speed},
                 "decode_tok_s": {"median": speed}, "kv_cache_bytes": 1024}]

    return {"seeds": [1],
            "per_seed": {"standard": {"1": figures(standard_loss)}, "hybrid": {"1": figures(hybrid_loss)}},
            "bench": {"config": {"contexts": [128]},
                      "models": {"standard": {"rows": rows(100.0)}, "hybrid": {"rows": rows(120.0)}}}}


def loss_row(results: dict) -> list[str]:
    table = headline_table(results, summarize(results))
    header = next(line for line in table.splitlines() if line.startswith("| metric"))
    row = next(line for line in table.splitlines() if line.startswith("| final validation loss"))
    return [c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]


def test_a_worse_loss_is_not_shown_as_an_improvement():
    header, row = loss_row(made_up_results(5.0478, 5.1050))
    column = row[header.index("hybrid vs standard")]
    assert column == "0.0572 higher (worse)" and "+" not in column
    assert "improvement" not in header
    _, row = loss_row(made_up_results(5.1050, 5.0478))
    assert row[header.index("hybrid vs standard")] == "0.0572 lower (better)"


def test_paired_accuracy_on_constructed_pairs():
    # 10 pairs: both right on 5, only hybrid on 3, only standard on 1, neither on 1; one pair scored by one model.
    standard = [1, 1, 1, 1, 1, -1, -1, -1, 0.5, -2, None]
    hybrid = [2, 2, 2, 2, 2, 0.1, 0.1, 0.1, -0.5, -1, 3]
    p = paired_accuracy(standard, hybrid)
    assert p["pairs"] == 10 and p["standard_accuracy"] == 0.6 and p["hybrid_accuracy"] == 0.8
    assert p["only_hybrid_right"] == 3 and p["only_standard_right"] == 1
    d = [0] * 5 + [1] * 3 + [-1, 0]  # hybrid right - standard right, per pair
    assert p["difference"]["mean"] == pytest.approx(0.2)
    assert p["difference"]["ci95"] == pytest.approx(mean_ci(d)["ci95"]) and "values" not in p["difference"]
    assert p["mcnemar_p"] == pytest.approx(2 * (1 + 4) / 16)  # binomial(4, 1/2): P(X <= 1), both tails
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(5, 5) == 1.0 and mcnemar_p(20, 0) == pytest.approx(2 / 2 ** 20)
    tie = paired_accuracy([0.0, 1.0], [0.0, -1.0])  # a zero margin does not rank the chosen reply first
    assert tie["standard_accuracy"] == 0.5 and tie["hybrid_accuracy"] == 0.0
    assert paired_accuracy([1.0, None], [None, 1.0]) is None  # no pair scored by both: nothing to pair


def test_report_pairs_seeds_and_says_when_pairs_were_not_recorded():
    results = made_up_results(5.0, 5.1)
    results["seeds"] = [1, 2, 3]
    for mt in ("standard", "hybrid"):
        results["per_seed"][mt] = {s: dict(results["per_seed"][mt]["1"]) for s in ("1", "2", "3")}
    margins = {"standard": {"1": [1, 1, -1, -1], "2": [1, -1, -1, -1]},
               "hybrid": {"1": [1, 1, 1, -1], "2": [1, 1, 1, -1]}}
    for mt, by_seed in margins.items():
        for seed, m in by_seed.items():
            results["per_seed"][mt][seed]["dpo_val_pair_margins"] = m
    paired = summarize(results)["dpo_paired"]
    assert paired["per_seed"]["3"] == "not recorded"  # an older run: reported, not an error
    assert [paired["per_seed"][s]["difference"]["mean"] for s in ("1", "2")] == [0.25, 0.5]
    assert paired["across_seeds"] == mean_ci([0.25, 0.5])
    text = "\n".join(dpo_paired_lines(paired))
    assert "| 3 | not recorded |" in text and "Across 2 seed(s): hybrid - standard reward accuracy = +0.375 ±" in text
    for mt in ("standard", "hybrid"):
        for seed in ("1", "2"):
            results["per_seed"][mt][seed].pop("dpo_val_pair_margins")
    paired = summarize(results)["dpo_paired"]
    assert paired["across_seeds"] is None and "not recorded for any seed" in "\n".join(dpo_paired_lines(paired))


def test_speed_rows_show_the_benchs_interval_when_it_has_one():
    results = made_up_results(5.0, 5.1)
    table = headline_table(results, summarize(results))
    assert "| 1.20x as fast |" in table  # no ratio rows (an older bench): the ratio of the medians, no interval
    results["bench"]["ratios"] = {"hybrid/standard": [
        {"context": 128, "batch": 1, "decode_speedup": 1.25, "decode_speedup_ci95": [1.1, 1.4],
         "prefill_speedup": 1.3, "prefill_speedup_ci95": None}]}
    summary = summarize(results)
    table = headline_table(results, summary)
    assert "| 1.25x [1.10, 1.40] as fast |" in table and "| 1.30x as fast |" in table
    assert "decodes 1.25x [1.10, 1.40] as fast" in _speed_sentence(summary)
