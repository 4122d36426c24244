"""The one markdown-table helper: its two rules and its rows."""

from hybrid_gpt.present.tables import markdown_table


def test_a_table_has_its_headers_a_rule_and_one_line_per_row():
    assert markdown_table(["a", "b"], [["1", "2"], ["", "x"]]).splitlines() == [
        "| a | b |", "|---|---|", "| 1 | 2 |", "|  | x |"]


def test_the_padded_rule():
    assert markdown_table(["a", "b", "c"], [], padded=True).splitlines() == ["| a | b | c |", "| --- | --- | --- |"]
