"""What `make demo` prints when a run ends: one screen (at most SCREEN_LINES lines). The score
tables and the training table of report.md, then where everything else is: the whole report,
its HTML form, the plots, the GGUF files and the chat command. Everything stays in report.md.

    python -m qlora_pipeline.report.screen results        # a run's folder (config key `run`)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

SCREEN_LINES = 60
LAST_SECTION = "## Training"  # the score tables come before it (sections.py's order)


def tables(markdown: str) -> list[str]:
    """report.md's sections up to the training table's, headings and tables only (no prose, no
    images: the plots are named below)."""
    kept = []
    for section in re.split(r"(?m)^(?=## )", markdown)[1:]:
        lines = section.splitlines()
        kept += [lines[0], *(line for line in lines[1:] if line.startswith("|")), ""]
        if lines[0] == LAST_SECTION:
            break
    return kept


def where(run: Path) -> list[str]:
    report = run / "report"
    plots = sorted(p.name for p in report.glob("*.png"))
    gguf = sorted(str(p) for p in (run / "models" / "gguf").glob("*/*.gguf"))
    return [
        f"Report:  {report / 'report.md'} (every section; CSVs beside it)",
        "HTML:    snakemake --report report.html   (the report and its plots in one file)",
        f"Plots:   {report}/{{{','.join(plots)}}}" if plots else "Plots:   none",
        *(f"GGUF:    {path}" for path in gguf),
        "Chat:    make chat TASK=<task> VARIANT=<variant>" + (", or make chat GGUF=<a file above>"
                                                             if gguf else ""),
    ]


def screen(run: Path) -> str:
    found, paths = tables((run / "report" / "report.md").read_text(encoding="utf-8")), where(run)
    if len(found) + len(paths) > SCREEN_LINES:  # many tasks: their tables stay in report.md
        found = [*found[:SCREEN_LINES - len(paths) - 1],
                 f"... (more in {run / 'report' / 'report.md'})"]
    return "\n".join([*found, *paths])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    run = Path(args[0] if args else "results")
    if not (run / "report" / "report.md").is_file():
        print(f"{run}/report/report.md not found; expected a finished run's folder",
              file=sys.stderr)
        return 2
    print(screen(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
