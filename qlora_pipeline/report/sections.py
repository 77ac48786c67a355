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

from . import (adapters, combinations, compression, exports, merges, quantization,
               quantization_sweep, scores, sweeps, training)

# name: (module, its CSV output or None, its plot output or None). Output names are the
# report rule's (FILES gives their file names); the name is also its files' key in the rule.
SECTIONS = {
    "scores": (scores, "scores", "scores_plot"),
    "training": (training, None, "loss_plot"),
    "merges": (merges, None, None),
    "compression": (compression, None, None),
    "exports": (exports, None, None),
    "sweeps": (sweeps, "sweeps", "sweeps_plot"),
    "combinations": (combinations, "combinations", "overlap_plot"),
    "adapters": (adapters, None, "adapters_plot"),
    "quantization": (quantization, None, None),
    "quantization_sweep": (quantization_sweep, "quantization_sweep", "quantization_sweep_plot"),
}
# Output name: (file name, category in `snakemake --report`).
FILES = {"markdown": ("report.md", "Scores"), "scores": ("scores.csv", "Scores"),
         "scores_plot": ("scores.png", "Scores"), "loss_plot": ("loss.png", "Training"),
         "adapters_plot": ("adapters.png", "Adapters"), "sweeps": ("sweeps.csv", "Sweeps"),
         "sweeps_plot": ("sweeps.png", "Sweeps"),
         "combinations": ("combinations.csv", "Combinations"),
         "overlap_plot": ("overlap.png", "Combinations"),
         "quantization_sweep": ("quantization_sweep.csv", "Quantization"),
         "quantization_sweep_plot": ("quantization_sweep.png", "Quantization")}
TITLE = "# Fine-tuning report\n"


def outputs(sections: dict[str, list]) -> list[str]:
    """The output names of a report of these sections (those that have files)."""
    return ["markdown", *[name for key, (_, *written) in SECTIONS.items() if sections.get(key)
                          for name in written if name]]


def write(sections: dict[str, list], tables: dict, out: dict[str, Path]) -> str:
    """Every section with files, in order: its CSV and plot into `out` (by output name), its
    markdown into out["markdown"]; returns the markdown."""
    frames, parts = {}, [TITLE]
    for key, (module, csv, plot) in SECTIONS.items():
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
