"""The report's sections, in the order report.md shows them. Each is a module of one shape:

    rows(files, table, frames) -> DataFrame   its files read (table: what it reads by path,
                                              the sweeps' and combinations'; frames: the rows
                                              of the sections before it)
    markdown(rows, table) -> str              its part of report.md
    plot(rows, files, table, path)            optional: its figure

A section whose files are absent (no sweep, no combination, no export) is left out; a
section's CSV is its rows as they are. A new report is one more module and one more entry here.
"""

from __future__ import annotations

from pathlib import Path

from . import (adapters, combinations, compression, exports, init_rank, merges, quantization,
               quantization_sweep, rank_selection, scores, sweeps, training)

# name: (module, its CSV output or None, its plot output or None, the category of its files in
# `snakemake --report`). Output names are the report rule's (FILES gives their file names); the
# name is also its files' key in the rule.
SECTIONS = {
    "scores": (scores, "scores", "scores_plot", "Scores"),
    "training": (training, None, "loss_plot", "Training"),
    "merges": (merges, None, None, None),
    "compression": (compression, None, None, None),
    "exports": (exports, None, None, None),
    "sweeps": (sweeps, "sweeps", "sweeps_plot", "Sweeps"),
    "init_rank": (init_rank, "init_rank", "init_rank_plot", "Initialisation and rank"),
    "rank_selection": (rank_selection, "rank_selection", "rank_selection_plot",
                       "Initialisation and rank"),
    "combinations": (combinations, "combinations", "overlap_plot", "Combinations"),
    "adapters": (adapters, None, "adapters_plot", "Adapters"),
    "quantization": (quantization, None, None, None),
    "quantization_sweep": (quantization_sweep, "quantization_sweep", "quantization_sweep_plot",
                           "Quantization"),
}
# Output name: (file name, category in `snakemake --report`): a CSV output's file is <name>.csv,
# a plot output's <name less _plot>.png.
FILES = {"markdown": ("report.md", "Scores"), **{
    name: (name.removesuffix("_plot") + (".png" if name.endswith("_plot") else ".csv"), category)
    for _, csv, plot, category in SECTIONS.values() for name in (csv, plot) if name}}
TITLE = "# Fine-tuning report\n"


def outputs(sections: dict[str, list]) -> list[str]:
    """The output names of a report of these sections (those that have files)."""
    return ["markdown", *[name for key, (_, csv, plot, _) in SECTIONS.items() if sections.get(key)
                          for name in (csv, plot) if name]]


def write(sections: dict[str, list], tables: dict, out: dict[str, Path]) -> str:
    """Every section with files, in order: its CSV and plot into `out` (by output name), its
    markdown into out["markdown"]; returns the markdown."""
    frames, parts = {}, [TITLE]
    for key, (module, csv, plot, _) in SECTIONS.items():
        files = sections.get(key)
        if not files:
            continue
        table = tables.get(key)
        frames[key] = frame = module.rows(files, table, frames)
        if csv:
            frame.to_csv(out[csv], index=False)
        if plot:
            module.plot(frame, files, table, out[plot])
        parts.append(module.markdown(frame, table))
    text = "\n".join(parts)
    Path(out["markdown"]).write_text(text, encoding="utf-8")
    return text
