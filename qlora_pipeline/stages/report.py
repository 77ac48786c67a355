"""Stage of rules/report.smk: every score in one table, per-task tables, training curves,
merge checks and the quantization report, in one place."""

from __future__ import annotations

import logging
from pathlib import Path

from ..outputs import stage_outputs
from ..policy import Policy

log = logging.getLogger(__name__)


def report(*, results: list, adapters: list, analyses: list, compressions: list, merged: list,
           quantization, scores, markdown, scores_plot, loss_plot, adapters_plot, provenance,
           policy: Policy, sweep_results: list = (), sweep_adapters: list = (),
           sweep_analyses: list = (), sweep_tables: dict | None = None, sweeps=None,
           sweeps_plot=None, combined: list = (), combination_table: dict | None = None,
           combinations=None, overlap_plot=None, exports: list = ()) -> None:
    """scores.csv, report.md and the plots (written together or not at all); with sweep
    points (`sweep_tables`: rules/common.smk's sweep_table per task), their section,
    sweeps.csv and sweeps.png; with combinations (`combination_table`), theirs,
    combinations.csv and overlap.png; with GGUF exports (`exports`), their table. Those files
    are declared inputs, read by path."""
    from ..analysis.plots import plot_adapters
    from ..evaluation import combination_report, reporting, sweep_report

    outputs = {"scores": scores, "markdown": markdown, "scores_plot": scores_plot,
               "loss_plot": loss_plot, "adapters_plot": adapters_plot, "provenance": provenance,
               **({"sweeps": sweeps, "sweeps_plot": sweeps_plot} if sweep_results else {}),
               **({"combinations": combinations, "overlap_plot": overlap_plot}
                  if combined else {})}
    inputs = {"quantization": quantization, **{f"results{i}": p for i, p in enumerate(results)},
              **{f"adapter{i}": p for i, p in enumerate(adapters)},
              **{f"analysis{i}": p for i, p in enumerate(analyses)},
              **{f"compressed{i}": p for i, p in enumerate(compressions)},
              **{f"sweep{i}": p for i, p in enumerate(sweep_results)},
              **{f"combined{i}": p for i, p in enumerate(combined)},
              **{f"export{i}": p for i, p in enumerate(exports)}}
    with stage_outputs("report", outputs, config={}, inputs=inputs, policy=policy) as out:
        frame = reporting.scores(results)
        frame.to_csv(out["scores"], index=False)
        reporting.plot_losses(adapters, out["loss_plot"])
        reporting.plot_scores(frame, out["scores_plot"])
        plot_adapters(analyses, out["adapters_plot"])
        sweeps_md = ""
        if sweep_results:
            points = sweep_report.points_table(sweep_tables)
            points.to_csv(out["sweeps"], index=False)
            sweep_report.plot(points, out["sweeps_plot"])
            sweeps_md = sweep_report.markdown(points, sweep_tables)
        combinations_md = ""
        if combined:
            matrix = combination_report.matrix(combination_table)
            matrix.to_csv(out["combinations"], index=False)
            overlap = combination_report.overlaps(combination_table)
            combination_report.plot_overlap(overlap, out["overlap_plot"])
            combinations_md = combination_report.markdown(matrix, combination_table, overlap)
        text = reporting.markdown(frame, reporting.training_rows(adapters),
                                  reporting.merge_rows(merged),
                                  Path(quantization).read_text(encoding="utf-8"),
                                  reporting.analysis_sections(analyses),
                                  reporting.compression_rows(compressions, frame), sweeps_md,
                                  combinations_md, reporting.export_rows(exports))
        out["markdown"].write_text(text, encoding="utf-8")
    log.info("\n%s", text)


def quantization_sweep(*, quantization_report, quantization_markdown, points: list, table,
                       markdown, plot, provenance, policy: Policy) -> None:
    """sweep.csv, sweep.png and the quantization report with the sweep's section (what the
    report includes when there is a sweep)."""
    from ..evaluation import quantization_sweep as qsweep

    inputs = {"quantization_report": quantization_report,
              **{f"point{i}": p for i, p in enumerate(points)}}
    outputs = {"table": table, "markdown": markdown, "plot": plot, "provenance": provenance}
    with stage_outputs("quantization_sweep", outputs, config={}, inputs=inputs,
                       policy=policy) as out:
        frame = qsweep.table(quantization_report, points)
        frame.to_csv(out["table"], index=False)
        qsweep.plot(frame, out["plot"])
        out["markdown"].write_text(
            qsweep.markdown(frame, Path(quantization_markdown).read_text(encoding="utf-8")),
            encoding="utf-8")
