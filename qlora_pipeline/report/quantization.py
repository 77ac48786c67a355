"""What quantizing the base cost: the quantize stage's weight-level numbers and the validation
perplexity of the full-precision and the quantized base (the quantization_report stage's
report.md, which this section of the report shows)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..core.files import read_json
from ..models import methods
from .common import paragraphs, pipe_table


def rows(files: list, table: dict | None = None, frames: dict | None = None) -> pd.DataFrame:
    """The quantization report's summary (`files`: its report.json and its markdown)."""
    found = {Path(f).suffix: f for f in files}
    return pd.DataFrame([{**read_json(found[".json"])["summary"], "markdown": found[".md"]}])


def markdown(frame: pd.DataFrame, table: dict | None = None) -> str:
    text = Path(frame["markdown"].iloc[0]).read_text(encoding="utf-8")
    return text.replace("# Quantization report", "## Quantization", 1)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _numerics_row(check: dict | None) -> list[list[str]]:
    """The run-time check that the quantized layers compute x @ deq(W)^T (numerics.py)."""
    if not check:
        return []
    worst = max(check["max_relative_gap"].values())
    return [["quantized layers vs x @ deq(W)^T after an eval pass (output, input gradient), "
             "largest relative gap", f"{worst:.1e} over {check['layers_checked']} layers "
             f"(tolerance {check['tolerance']:g}, {check['compute_dtype']})"]]


def report_markdown(report: dict) -> str:
    s = report["summary"]
    blocks = [
        "# Quantization report",
        f"Scheme: **{s['scheme']}**, compute dtype {s['compute_dtype']}.",
        pipe_table(["measure", "value"], [
            ["quantized layers", f"{s['quantized_layers']} ({s['quantized_params']:,} parameters)"],
            ["bits per quantized parameter (stored, all constants)",
             f"{s['bits_per_param_measured']:.4f}"],
            ["bits per quantized parameter (theory)", f"{s['bits_per_param_theoretical']:.4f}"],
            ["size on disk, full precision", _mib(s["size_bytes_full_precision"])],
            ["size on disk, quantized", _mib(s["size_bytes_quantized"])],
            ["relative weight error ‖W − deq(Q(W))‖/‖W‖, mean / max",
             f"{s['relative_error_mean']:.4f} / {s['relative_error_max']:.4f}"],
            *_numerics_row(report.get("numerics_check"))]),
        f"Theory (docs/quantization.md): {methods.of(s['method']).THEORY}. Layers kept in full "
        "precision (embeddings, norms, the output head) are not counted above but are in the "
        "size on disk.",
    ]
    if "perplexity" in report:
        perplexity = {task: (r["full_precision"]["perplexity"], r["quantized"]["perplexity"])
                      for task, r in report["perplexity"].items()}
        blocks += ["## Validation perplexity (answer tokens)", pipe_table(
            ["task", "full precision", s["method"], "change"],
            [[task, f"{fp:.3f}", f"{q:.3f}", f"{100 * (q / fp - 1):+.1f}%"]
             for task, (fp, q) in perplexity.items()])]
    worst = sorted(report["layers"], key=lambda r: -r["relative_error"])[:10]
    blocks += ["## Layers with the largest relative error", pipe_table(
        ["layer", "shape", "bits/param", "relative error"],
        [[r["layer"], "×".join(map(str, r["shape"])), f"{r['bits_per_param']:.3f}",
          f"{r['relative_error']:.4f}"] for r in worst])]
    return paragraphs(*blocks)
