"""Decode speed against context, presented from a small fixed summary: the table, the crossings, the plot's levels."""

from hybrid_gpt.present.longcontext import plot_speed_context, render_markdown

CROSSINGS = {"1.25": {"estimate": 3000, "clears_from": 4096, "predicted": 2048},
             "1.5": {"estimate": None, "clears_from": None, "predicted": None}}
SUMMARY = {"weights": "random", "weights_note": "random weights of the cpu shape", "pair": "AAMM / AAAA",
           "batches": {"1": {"series": [{"context": 1024, "ratio": 1.1, "ci95": [1.0, 1.2], "predicted": 1.12},
                                        {"context": 4096, "ratio": 1.4, "ci95": None}],
                             "prediction": [{"context": 1024, "predicted": 1.12}], "crossings": CROSSINGS}}}


def test_the_page_has_a_table_per_batch_and_the_crossings():
    md = render_markdown({"cpu": SUMMARY, "none": {"batches": {}}}, "speed.png")
    assert md.startswith("## Decode speed against context\n\n![speed vs context](speed.png)\n")
    assert ("**cpu, AAMM / AAAA, batch 1** (random weights):\n\n| context | measured (95% CI) | predicted |\n"
            "| --- | --- | --- |\n| 1,024 | 1.10x [1.00, 1.20] | 1.12x |\n| 4,096 | 1.40x | - |\n") in md
    assert ("- reaches 1.25x: measured at about 3,000 (interval clear of it from 4,096); predicted from 2,048\n"
            "- reaches 1.5x: measured at about not within the contexts measured") in md
    assert "`cpu`: random weights of the cpu shape.\n" in md and "`none`: no speedup between two float32" in md


def test_the_plot_or_none(tmp_path):
    assert plot_speed_context({"none": {"batches": {}}}, tmp_path / "a.png") is None
    assert plot_speed_context({"cpu": SUMMARY}, tmp_path / "a.png") == "a.png"
    assert (tmp_path / "a.png").stat().st_size > 1000
