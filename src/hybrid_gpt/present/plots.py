"""The one plotting module: every PNG the toolkit writes goes through `save_plot`, so all plots share one
backend (Agg, no screen needed), one resolution and one atomic write."""

from __future__ import annotations

from pathlib import Path

from hybrid_gpt.fsutil import atomic_path


def save_plot(path: Path, draw) -> str:
    """Call ``draw(plt)`` for a figure and write it to ``path`` as PNG, atomically; returns the file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw(plt)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path.name


def smooth(values, window: int) -> list[float]:
    """Trailing moving average over ``window`` values (fewer at the start), for noisy per-step curves."""
    out = []
    for i in range(len(values)):
        lo = max(0, i - window + 1)
        out.append(sum(values[lo:i + 1]) / (i + 1 - lo))
    return out
