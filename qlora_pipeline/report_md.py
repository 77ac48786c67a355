"""Markdown renderings of the pipeline's JSON reports."""

from __future__ import annotations


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _numerics_row(check: dict | None) -> list[str]:
    """The run-time check that the 4-bit layers compute x @ deq(W)^T (models/numerics.py)."""
    if not check:
        return []
    worst = max(check["max_relative_gap"].values())
    return [f"| 4-bit layers vs x @ deq(W)^T after an eval pass (output, input gradient), "
            f"largest relative gap | {worst:.1e} over {check['layers_checked']} layers "
            f"(tolerance {check['tolerance']:g}, {check['compute_dtype']}) |"]


def quantization_markdown(report: dict) -> str:
    s = report["summary"]
    lines = [
        "# Quantization report",
        "",
        f"Scheme: **{s['quant_type'].upper()}**, double quantization "
        f"**{'on' if s['double_quant'] else 'off'}**, compute dtype {s['compute_dtype']}.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| quantized layers | {s['quantized_layers']} ({s['quantized_params']:,} parameters) |",
        f"| bits per quantized parameter (stored, all constants) | {s['bits_per_param_measured']:.4f} |",
        f"| bits per quantized parameter (theory) | {s['bits_per_param_theoretical']:.4f} |",
        f"| size on disk, full precision | {_mib(s['size_bytes_full_precision'])} |",
        f"| size on disk, 4-bit | {_mib(s['size_bytes_4bit'])} |",
        f"| relative weight error ‖W − deq(Q(W))‖/‖W‖, mean / max | "
        f"{s['relative_error_mean']:.4f} / {s['relative_error_max']:.4f} |",
        *_numerics_row(report.get("numerics_check")),
        "",
        "Theory: NF4 stores 4 bits per weight plus one fp32 absmax per 64 weights (4.5 bits); "
        "double quantization stores that absmax in 8 bits with one fp32 per 256 blocks "
        "(≈4.127 bits). Layers kept in full precision (embeddings, norms, the output head) "
        "are not counted above but are in the size on disk.",
        "",
    ]
    if "perplexity" in report:
        lines += ["## Validation perplexity (answer tokens)", "",
                  "| task | full precision | 4-bit | change |", "|---|---|---|---|"]
        for task, r in report["perplexity"].items():
            fp, q = r["full_precision"]["perplexity"], r["4bit"]["perplexity"]
            lines.append(f"| {task} | {fp:.3f} | {q:.3f} | {100 * (q / fp - 1):+.1f}% |")
        lines.append("")
    worst = sorted(report["layers"], key=lambda r: -r["relative_error"])[:10]
    lines += ["## Layers with the largest relative error", "",
              "| layer | shape | bits/param | relative error |", "|---|---|---|---|"]
    lines += [f"| {r['layer']} | {'×'.join(map(str, r['shape']))} | {r['bits_per_param']:.3f} | "
              f"{r['relative_error']:.4f} |" for r in worst]
    return "\n".join(lines) + "\n"
