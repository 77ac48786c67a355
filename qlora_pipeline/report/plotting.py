"""matplotlib for files, not screens: every report plot is drawn with the Agg backend."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported when a plot is drawn: a report job that
    draws nothing never pays for it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
