"""matplotlib for files, not screens: every report plot is drawn with the Agg backend."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def figure(path, *grid: int, dpi: int = 100, **options) -> Iterator[tuple]:
    """(fig, axes) of plt.subplots(*grid, **options) for the block to draw on; then laid out,
    saved to `path` at `dpi` and closed. matplotlib.pyplot is imported here, on the Agg backend
    (a report job that draws nothing never pays for it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*grid, **options)
    yield fig, axes
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
