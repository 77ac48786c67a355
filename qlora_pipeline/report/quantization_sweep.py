"""With a `quantization_sweep`: every method measured (rule quantization_sweep_point) beside the
configured one, bits per parameter against the change in validation perplexity from full
precision, task by task (quantization_sweep.csv, quantization_sweep.png)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..core.files import read_json
from .common import each_json, figure


def _row(label: str, summary: dict, perplexity: dict, full: dict, configured: bool) -> dict:
    row = {"method": label + (" (configured)" if configured else ""),
           "scheme": summary["scheme"],
           "bits_per_param": summary["bits_per_param_measured"],
           "bits_per_param_theory": summary["bits_per_param_theoretical"],
           "size_mib": round(summary["size_bytes_quantized"] / 2 ** 20, 1),
           "weight_error_mean": round(summary["relative_error_mean"], 4)}
    for task, value in perplexity.items():
        fp = full[task]["perplexity"]
        row[f"{task}_perplexity"] = round(value["perplexity"], 3)
        row[f"{task}_change_pct"] = round(100 * (value["perplexity"] / fp - 1), 2)
    return row


def rows(files: list, table: dict | None = None, frames: dict | None = None) -> pd.DataFrame:
    """One row per method, sorted by bits per parameter: the configured method's from the
    quantization report (`files[0]`, whose full-precision perplexity every change is measured
    from), then each sweep point's (the folders after it)."""
    report = read_json(files[0])
    full = {task: r["full_precision"] for task, r in report["perplexity"].items()}
    rows = [_row(report["summary"]["method"], report["summary"],
                 {task: r["quantized"] for task, r in report["perplexity"].items()}, full, True),
            *(_row(point["label"], point["summary"], point["perplexity"], full, False)
              for _, point in each_json(files[1:], "report.json"))]
    return pd.DataFrame(rows).sort_values("bits_per_param", kind="stable").reset_index(drop=True)


def plot(frame: pd.DataFrame, files: list, table: dict | None, path: Path) -> None:
    with figure(path, dpi=120, figsize=(6.5, 4)) as (_, [[ax]]):  # one panel
        for column in [c for c in frame.columns if c.endswith("_change_pct")]:
            ax.plot(frame["bits_per_param"], frame[column], marker="o",
                    label=column.removesuffix("_change_pct"))
        for index, row in frame.iterrows():
            ax.annotate(row["method"].removesuffix(" (configured)"),
                        (row["bits_per_param"], frame.filter(like="_change_pct").loc[index].max()),
                        textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xlabel("bits per quantized parameter (stored, every constant)")
        ax.set_ylabel("validation perplexity vs full precision (%)")
        ax.legend(title="task")


def markdown(frame: pd.DataFrame, table: dict | None = None) -> str:
    return ("## Bits per parameter against perplexity\n\n"
            "Each method of `quantization_sweep` quantized from the same base and measured, "
            "not trained (results/quantization/sweep/); change: validation perplexity of the "
            "answer tokens against full precision's. Bits per parameter: stored, every "
            "constant counted; theory: docs/quantization.md.\n\n"
            + frame.to_markdown(index=False, floatfmt=".4g")
            + "\n\n![bits per parameter against perplexity](quantization_sweep.png)\n")
