"""Stages of rules/report.smk: every score, training, check and analysis in one report, by
section (report/sections.py); and the quantization sweep's table."""

from __future__ import annotations

import logging
from pathlib import Path

from ..core.policy import Policy
from . import Input, Inputs, Output

log = logging.getLogger(__name__)


def report(*, files: Inputs, sections: dict, tables: dict, policy: Policy,
           **written: Output) -> None:
    """report.md and each section's CSV and plot (`written`: by output name, written together
    or not at all). `sections`: each section's files, all of them among `files` (declared, so
    that the job waits for them); `tables`: what a section reads by path (rules/common.smk's
    sweep and combination tables)."""
    from ..report import sections as report_sections

    text = report_sections.write(sections, tables, written)
    log.info("\n%s", text)


def quantization_sweep(*, quantization_report: Input, quantization_markdown: Input,
                       points: Inputs, table: Output, markdown: Output, plot: Output,
                       policy: Policy) -> None:
    """sweep.csv, sweep.png and the quantization report with the sweep's section (what the
    report includes when there is a sweep)."""
    from ..report.quantization import sweep_markdown, sweep_plot, sweep_rows

    frame = sweep_rows(quantization_report, points)
    frame.to_csv(table, index=False)
    sweep_plot(frame, plot)
    markdown.write_text(
        sweep_markdown(frame, Path(quantization_markdown).read_text(encoding="utf-8")),
        encoding="utf-8")
