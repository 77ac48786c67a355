"""What quantizing the base cost: the quantize stage's weight-level numbers and the validation
perplexity of the full-precision and the quantized base (the quantization_report stage's
report.md, which this section of the report shows), and with a `quantization_sweep` every
method measured: bits per parameter against the change in perplexity, task by task."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..core.files import read_json
from ..models import methods
from .plotting import figure


def rows(files: list, table: dict | None = None, frames: dict | None = None) -> pd.DataFrame:
    """The quantization report's summary (`files`: its report.json, and its markdown, with
    the sweep's section when there is one)."""
    found = {Path(f).suffix: f for f in files}
    return pd.DataFrame([{**read_json(found[".json"])["summary"], "markdown": found[".md"]}])


def markdown(frame: pd.DataFrame, table: dict | None = None) -> str:
    text = Path(frame["markdown"].iloc[0]).read_text(encoding="utf-8")
    return text.replace("# Quantization report", "## Quantization", 1)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _numerics_row(check: dict | None) -> list[str]:
    """The run-time check that the quantized layers compute x @ deq(W)^T (numerics.py)."""
    if not check:
        return []
    worst = max(check["max_relative_gap"].values())
    return [f"| quantized layers vs x @ deq(W)^T after an eval pass (output, input gradient), "
            f"largest relative gap | {worst:.1e} over {check['layers_checked']} layers "
            f"(tolerance {check['tolerance']:g}, {check['compute_dtype']}) |"]


def report_markdown(report: dict) -> str:
    s = report["summary"]
    scheme = s["scheme"]
    lines = [
        "# Quantization report",
        "",
        f"Scheme: **{scheme}**, compute dtype {s['compute_dtype']}.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| quantized layers | {s['quantized_layers']} ({s['quantized_params']:,} parameters) |",
        f"| bits per quantized parameter (stored, all constants) | {s['bits_per_param_measured']:.4f} |",
        f"| bits per quantized parameter (theory) | {s['bits_per_param_theoretical']:.4f} |",
        f"| size on disk, full precision | {_mib(s['size_bytes_full_precision'])} |",
        f"| size on disk, quantized | {_mib(s['size_bytes_quantized'])} |",
        f"| relative weight error ‖W − deq(Q(W))‖/‖W‖, mean / max | "
        f"{s['relative_error_mean']:.4f} / {s['relative_error_max']:.4f} |",
        *_numerics_row(report.get("numerics_check")),
        "",
        f"Theory (docs/quantization.md): {methods.of(s['method']).THEORY}. Layers kept in full precision "
        "(embeddings, norms, the output head) are not counted above but are in the size on "
        "disk.",
        "",
    ]
    if "perplexity" in report:
        lines += ["## Validation perplexity (answer tokens)", "",
                  f"| task | full precision | {s['method']} | change |", "|---|---|---|---|"]
        for task, r in report["perplexity"].items():
            fp, q = r["full_precision"]["perplexity"], r["quantized"]["perplexity"]
            lines.append(f"| {task} | {fp:.3f} | {q:.3f} | {100 * (q / fp - 1):+.1f}% |")
        lines.append("")
    worst = sorted(report["layers"], key=lambda r: -r["relative_error"])[:10]
    lines += ["## Layers with the largest relative error", "",
              "| layer | shape | bits/param | relative error |", "|---|---|---|---|"]
    lines += [f"| {r['layer']} | {'×'.join(map(str, r['shape']))} | {r['bits_per_param']:.3f} | "
              f"{r['relative_error']:.4f} |" for r in worst]
    return "\n".join(lines) + "\n"


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


def sweep_rows(quantization_report: str | Path, points: list) -> pd.DataFrame:
    """One row per method, sorted by bits per parameter: the configured method's from the
    quantization report (whose full-precision perplexity every change is measured from),
    then each sweep point's."""
    report = read_json(quantization_report)
    full = {task: r["full_precision"] for task, r in report["perplexity"].items()}
    rows = [_row(report["summary"]["method"], report["summary"],
                 {task: r["quantized"] for task, r in report["perplexity"].items()}, full, True)]
    for path in points:
        point = read_json(Path(path) / "report.json")
        rows.append(_row(point["label"], point["summary"], point["perplexity"], full, False))
    return pd.DataFrame(rows).sort_values("bits_per_param", kind="stable").reset_index(drop=True)


def sweep_plot(frame: pd.DataFrame, path: str | Path) -> None:
    with figure(path, dpi=120, figsize=(6.5, 4)) as (_, ax):
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


def sweep_markdown(frame: pd.DataFrame, quantization_md: str) -> str:
    """The quantization report followed by the sweep's section."""
    return (quantization_md.rstrip("\n") + "\n\n## Bits per parameter against perplexity\n\n"
            "Each method of `quantization_sweep` quantized from the same base and measured, "
            "not trained (results/quantization/sweep/); change: validation perplexity of the "
            "answer tokens against full precision's. Bits per parameter: stored, every "
            "constant counted; theory: docs/quantization.md.\n\n"
            + frame.to_markdown(index=False, floatfmt=".4g")
            + "\n\n![bits per parameter against perplexity](../quantization/sweep.png)\n")
