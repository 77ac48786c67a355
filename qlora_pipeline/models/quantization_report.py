"""What quantizing the base cost: validation perplexity of the full-precision and the
quantized base on every task, next to the quantize stage's weight-level numbers, as JSON and
markdown."""

from __future__ import annotations

import gc
import logging

from ..policy import Policy
from . import perplexity, quantization

log = logging.getLogger(__name__)


def perplexities(base_dir, quantized_dir, validation: dict, max_examples: int,
                 policy: Policy) -> dict[str, dict]:
    """task -> {"full_precision": ..., "quantized": ...}; one model in memory at a time."""
    loaders = {"full_precision": lambda: quantization.load_full_precision(base_dir, policy,
                                                                          offload=True),
               "quantized": lambda: quantization.load_quantized(quantized_dir, policy)}
    results: dict[str, dict] = {task: {} for task in validation}
    for variant, load in loaders.items():
        model = load()
        for task, examples in validation.items():
            results[task][variant] = perplexity.perplexity(model, examples, max_examples)
            log.info("%s %s: %s", task, variant, results[task][variant])
        del model
        gc.collect()
    return results


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


THEORY = {
    "nf4": "4 bits per weight plus one fp32 absmax per 64 weights (4.5 bits); double "
           "quantization stores that absmax in 8 bits with one fp32 per 256 blocks (≈4.127 bits)",
    "int8": "8 bits per weight plus one fp32 scale per output row of n_in weights (8 + 32/n_in)",
    "hqq": "the bits packed as hqq packs them (3 bits: ten to an int32, 3.2) plus a scale and a "
           "zero per group in the compute dtype (+ 2·32/group_size in float32, 2·16/group_size "
           "in bf16)",
}
THEORY["fp4"] = THEORY["nf4"]


def markdown(report: dict) -> str:
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
        f"Theory (docs/quantization.md): {THEORY[s['method']]}. Layers kept in full precision "
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
