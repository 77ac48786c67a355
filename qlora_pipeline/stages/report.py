"""Stage of rules/report.smk: every score, training, check and analysis in one report, by
section (report/sections.py)."""

from __future__ import annotations

import logging
from ..core.policy import Policy
from . import Inputs, Output

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
