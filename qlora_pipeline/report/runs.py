"""Runs side by side: every finished run's scores in one table (`qlora-compare`).

A run is a config's outputs: `results/` for a config without a `run` name, `results/<run>/`
with one (layout.use_run). Comparing runs reads their finished reports (`report/scores.csv`
and `report/provenance.json`) and nothing else, so it sits outside every run's DAG: a command,
not a rule. Writes `results/runs.csv` (long: one row per run × score) and `results/runs.md`
(wide: one column per run, "value ± stderr"), and prints the latter.

    qlora-compare                      # every run found under results/
    qlora-compare rank8 rank16         # these runs (names, or folders holding report/)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from ..core.errors import InputError
from ..core.files import atomic_file, read_json

DEFAULT = "(unnamed)"  # the run of a config without `run`: results/ itself
KEYS = ["task", "benchmark", "metric", "variant"]


def find_runs(results: Path) -> dict[str, Path]:
    """{run name: its folder} for every finished run under `results` (one with a report)."""
    folders = [results, *sorted(results.iterdir())] if results.is_dir() else []
    # A file's report/scores.csv is no file either (is_file is False where a parent is a file).
    return {DEFAULT if p == results else p.name: p for p in folders
            if (p / "report/scores.csv").is_file()}


def resolve(names: list[str], results: Path) -> dict[str, Path]:
    """Runs named on the command line: a run name under `results`, or a folder."""
    runs = {}
    for name in names:
        folder = results / name if (results / name / "report").is_dir() else Path(name)
        if not (folder / "report/scores.csv").is_file():
            known = ", ".join(find_runs(results)) or "none"
            raise InputError(f"qlora-compare: run {name!r}: found no {folder}/report/scores.csv; "
                             f"expected a finished run (runs under {results}: {known})")
        runs[DEFAULT if folder.resolve() == results.resolve() else label(folder)] = folder
    return runs


def label(folder: Path) -> str:
    """A run's column name: its folder's name; another checkout's whole results/ folder is
    named with its parent (`other/results`)."""
    folder = folder.resolve()
    return f"{folder.parent.name}/{folder.name}" if folder.name == "results" else folder.name


def long_table(runs: dict[str, Path]) -> pd.DataFrame:
    """One row per run × score, with the commit and finish time of the run's report."""
    frames = []
    for name, folder in runs.items():
        scores = pd.read_csv(folder / "report/scores.csv")
        provenance = read_json(folder / "report/provenance.json")
        frames.append(scores.assign(run=name, commit=provenance.get("git_commit"),
                                    finished=provenance.get("finished")))
    return pd.concat(frames, ignore_index=True)


def wide_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Scores by (task, benchmark, metric, variant), one column per run (in the given order)."""
    cell = frame.assign(cell=[f"{v:.4g}" if pd.isna(s) else f"{v:.4g} ± {s:.2g}"
                              for v, s in zip(frame["value"], frame["stderr"])])
    wide = cell.pivot_table(index=KEYS, columns="run", values="cell", aggfunc="first",
                            sort=False)
    return wide.reindex(columns=list(dict.fromkeys(frame["run"]))).fillna("—").reset_index()


def markdown(frame: pd.DataFrame) -> str:
    runs = frame.drop_duplicates("run")
    header = "\n".join(f"- **{r.run}**: commit {r.commit}, finished {r.finished}"
                       for r in runs.itertuples())
    return (f"# Runs side by side\n\n{header}\n\n"
            f"{wide_table(frame).to_markdown(index=False)}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qlora-compare", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="*", help="run names or folders (default: every run)")
    parser.add_argument("--results", default="results", help="where runs live (default: %(default)s)")
    args = parser.parse_args(argv)  # None: sys.argv[1:]
    results = Path(args.results)
    try:
        runs = resolve(args.runs, results) if args.runs else find_runs(results)
        if not runs:
            raise InputError(f"qlora-compare: found no finished run under {results}/; expected "
                             f"report/scores.csv in it or in a folder of it (run snakemake first)")
    except InputError as err:
        print(err, file=sys.stderr)
        return 2
    frame = long_table(runs)
    text = markdown(frame)
    with atomic_file(results / "runs.csv") as handle:
        frame.to_csv(handle, index=False)
    with atomic_file(results / "runs.md") as handle:
        handle.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
