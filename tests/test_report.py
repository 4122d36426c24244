"""The report's tables, from a results dict made up here (the pipeline test writes a real one)."""

from hybrid_gpt.report import headline_table, summarize

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
