"""The one markdown-table helper: every table the toolkit writes is built here."""

from __future__ import annotations


def markdown_table(headers: list[str], rows: list[list[str]], *, padded: bool = False) -> str:
    """A GitHub-flavoured markdown table of ``headers`` over ``rows`` (cells already formatted as text).
    ``padded``: the rule under the headers written ``| --- | --- |`` rather than ``|---|---|`` (the two render
    alike; the pages written with the padded rule keep it, so that regenerating them changes no byte)."""
    cells = ["---"] * len(headers)
    rule = "| " + " | ".join(cells) + " |" if padded else "|" + "|".join(cells) + "|"
    return "\n".join(["| " + " | ".join(headers) + " |", rule] + ["| " + " | ".join(row) + " |" for row in rows])
