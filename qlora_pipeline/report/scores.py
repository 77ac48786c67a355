"""Every score in one table (scores.csv: task × variant × benchmark × metric), per-task tables
with each variant's gain over the full-precision base, and a bar plot."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from ..core.files import read_json
from ..core.layout import SCORED_KINDS, Variant, lm_eval_name
from .common import figure, paragraphs, pipe_table

COLUMNS = ["task", "variant", "benchmark", "metric", "value", "stderr"]


def variant_order(variant: str) -> tuple[int, str]:
    """Kinds in pipeline order (base first: gains are shown against it), then by name."""
    return SCORED_KINDS.index(Variant.parse(variant).kind), variant


def numeric_metrics(metrics: dict, no_stderr: float | None = None) -> Iterator[tuple]:
    """(metric, value, stderr) for each numeric metric of one benchmark's lm-eval results
    (keys '<metric>,<filter>'); stderr is `no_stderr` where the results give none."""
    for key, value in metrics.items():
        if "," in key and "_stderr" not in key and isinstance(value, (int, float)):
            metric, filter_name = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            yield (metric, float(value),
                   float(stderr) if isinstance(stderr, (int, float)) else no_stderr)


def score_rows(results_file: str | Path) -> list[dict]:
    """One row per (benchmark, metric) of one variant × task results.json."""
    data = read_json(results_file)
    task = data["task"]
    return [{"task": task, "variant": data["variant"],
             "benchmark": task if benchmark == lm_eval_name(task) else benchmark,
             "metric": metric, "value": value, "stderr": stderr}
            for benchmark, metrics in data["results"].items()
            for metric, value, stderr in numeric_metrics(metrics)]


def rows(files: list, table: dict | None = None, frames: dict | None = None) -> pd.DataFrame:
    frame = pd.DataFrame([row for f in files for row in score_rows(f)], columns=COLUMNS)
    return frame.sort_values(["task", "benchmark", "metric", "variant"],
                             key=lambda c: c.map(variant_order) if c.name == "variant" else c,
                             ignore_index=True)


def task_table(frame: pd.DataFrame) -> str:
    """Variants as columns; each tuned variant's cell shows its gain over `base`."""
    wide = frame.pivot_table(index=["benchmark", "metric"], columns="variant", values="value")
    wide = wide[sorted(wide.columns, key=variant_order)]
    return pipe_table(["benchmark", "metric", *wide.columns], [
        [*key, *(cell(value, row.get("base"), variant) for variant, value in row.items())]
        for key, row in wide.iterrows()])


def cell(value: float, base: float | None, variant: str) -> str:
    """A score, and its gain over the base (`None`: no base scored) unless it is the base's."""
    gain = "" if variant == "base" or base is None else f" ({value - base:+.3f})"
    return f"{value:.3f}{gain}"


def markdown(frame: pd.DataFrame, table: dict | None = None) -> str:
    return paragraphs("Scores from lm-evaluation-harness on each task's test split; a tuned "
                      "variant's cell shows its gain over the full-precision base in parentheses.",
                      *(block for task, group in frame.groupby("task")
                        for block in (f"## {task}", task_table(group))),
                      "![scores](scores.png)")


def plot(frame: pd.DataFrame, files: list, table: dict | None, path: Path) -> None:
    groups = list(frame.groupby(["task", "benchmark", "metric"]))
    width = max(len(groups), 1)
    with figure(path, 1, width, figsize=(4 * width, 3.5)) as (_, axes):
        for ax, ((task, benchmark, metric), group) in zip(axes[0], groups):
            ax.bar(group["variant"], group["value"],
                   yerr=group["stderr"].fillna(0).astype(float), capsize=3)
            top = 1.05 if group["value"].max() <= 1 else 105  # chrF and BLEU are out of 100
            ax.set(title=f"{task}: {benchmark}", ylabel=metric, ylim=(0, top))
            ax.tick_params(axis="x", rotation=30)
