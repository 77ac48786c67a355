"""What the sections have in common: their folders' JSON files read, matplotlib figures for
files, not screens (every report plot is drawn with the Agg backend), and markdown as report.md
and the quantization report show it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..core.files import read_json


def each_json(folders: Iterable, name: str) -> list[tuple[Path, dict]]:
    """(folder, its JSON file `name` read) for each of the folders, in their order."""
    return [(Path(folder), read_json(Path(folder) / name)) for folder in folders]


@contextmanager
def figure(path, *grid: int, dpi: int = 100, **options) -> Iterator[tuple]:
    """(fig, axes) of plt.subplots(*grid, squeeze=False, **options) for the block to draw on
    (axes always a 2-D array, however many panels); then laid out, saved to `path` at `dpi` and
    closed. matplotlib.pyplot is imported here, on the Agg backend (a report job that draws
    nothing never pays for it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*grid, squeeze=False, **options)
    yield fig, axes
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def paragraphs(*blocks: str) -> str:
    """Markdown blocks (a heading, a paragraph, a table, an image) a blank line apart, ending
    with a newline."""
    return "\n\n".join(blocks) + "\n"


def pipe_table(header: list[str], rows: Iterable[list]) -> str:
    """A markdown table of cells already formatted, unpadded (`| a | b |`; pandas' to_markdown
    pads every column to its width)."""
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(map(str, row)) + " |" for row in rows)])
