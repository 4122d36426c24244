"""Number formats shared by every report: a missing value is written "n/a", never a crash or "None"."""

from __future__ import annotations


def pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal: 0.123 -> "12.3%"."""
    return "n/a" if x is None else f"{100 * x:.1f}%"


def count(x: int | None) -> str:
    """An integer with thousands separators: 131072 -> "131,072"."""
    return "n/a" if x is None else f"{x:,}"


def sci(x: float | None) -> str:
    """Scientific notation with three significant figures: 1.5e12 -> "1.50e+12"."""
    return "n/a" if x is None else f"{x:.2e}"


def signed_interval(d: dict | None, digits: int = 4) -> str:
    """A difference's mean and its 95% interval, signed: "+0.0137 [-0.0071, +0.0346]"; the mean alone without an
    interval, "-" for none."""
    if not d:
        return "-"
    text = f"{d['mean']:+.{digits}f}"
    return text + (f" [{d['ci95'][0]:+.{digits}f}, {d['ci95'][1]:+.{digits}f}]" if d.get("ci95") else "")
