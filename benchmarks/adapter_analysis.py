"""Time and peak memory of the adapter analysis on a Llama-3-8B-shaped adapter (r 64, every
linear layer of 32 layers): the low-rank metrics, then with intruder dimensions.

    python -m benchmarks.adapter_analysis [--smoke]
    python -m benchmarks.adapter_analysis measure ADAPTER SHAPE.json INTRUDERS  # prints JSON

The adapter is written to disk (random A and B, as merge_memory.synthetic_adapter) and read as
the stage reads it. The base is synthetic too, and never whole: each layer's W0 is drawn from
its own seed when the analysis asks for it (analysis/adapter.analyze_updates' base_weight), so
drawing 7.5B random weights takes ~80 s here: it stands in for reading a checkpoint and is
timed apart (base_draw_seconds) from the analysis itself (seconds, the figure).
Each mode runs in its own process; peak RSS (VmHWM, reset after the imports) is reported
beside the RSS after imports. Goals (issue 13): low-rank metrics < 60 s on 2 cores; with
intruder dimensions < 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

from benchmarks.merge_memory import linear_layers, llama, reset_peak, status_mb, synthetic_adapter

REPO = Path(__file__).resolve().parent.parent
LLAMA3_8B = llama(4096, 14336, 32, 32, 8, 128256)
SMOKE = llama(64, 128, 2, 4, 2, 256)
RANK, SMOKE_RANK = 64, 4
SETTINGS = {"energy": 0.9, "saturation": 0.9,
            "intruders": {"enabled": False, "k": 10, "reference": 40, "threshold": 0.5}}
GOALS = {"low_rank": 60.0, "intruders": 600.0}


def base_weight(shape: dict, spent: list[float]):
    """key -> W0 [out×in], drawn from a seed of its own (the same weight however often asked);
    the seconds spent drawing are added to spent[0]."""
    sizes = {f"{module}.weight": size for module, size in linear_layers(shape).items()}

    def weight(key: str) -> torch.Tensor:
        started = time.perf_counter()
        fan_in, fan_out = sizes[key]
        generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        drawn = torch.randn(fan_out, fan_in, generator=generator) * 0.02
        spent[0] += time.perf_counter() - started
        return drawn
    return weight


def measure(adapter: Path, shape: dict, intruders: bool) -> dict:
    """One analysis in this process: seconds and peak RSS after the imports."""
    from qlora_pipeline.analysis import adapter as analysis
    from qlora_pipeline.models.adapter_file import read_adapter

    settings = {**SETTINGS, "intruders": {**SETTINGS["intruders"], "enabled": intruders}}
    reset_peak()
    baseline, start, drawing = status_mb("VmRSS"), time.perf_counter(), [0.0]
    updates = read_adapter(adapter)
    r = int(json.loads((adapter / "adapter_config.json").read_text())["r"])
    result = analysis.analyze_updates(updates, base_weight(shape, drawing), r,
                                      lambda layers: shape["num_hidden_layers"], settings)
    total = time.perf_counter() - start
    counts = [m["intruders"]["count"] for m in result["layers"].values() if m["intruders"]]
    # The figure: the analysis without the synthetic base's draw, which stands in for reading
    # a checkpoint (a disk's speed, not the analysis's); both are reported.
    return {"mode": "intruders" if intruders else "low_rank", "seconds": total - drawing[0],
            "total_seconds": total, "base_draw_seconds": drawing[0],
            "layers": result["layers_analyzed"], "threads": torch.get_num_threads(),
            "baseline_rss_mb": baseline, "peak_rss_mb": status_mb("VmHWM"),
            "intruders_total": sum(counts) if intruders else None,
            "uniform_rank": result["recommendation"]["uniform"]}


def measured(adapter: Path, shape: dict, intruders: bool) -> dict:
    result = subprocess.run([sys.executable, "-m", "benchmarks.adapter_analysis", "measure",
                             str(adapter), json.dumps(shape), str(int(intruders))], cwd=REPO,
                            check=True, capture_output=True, text=True)
    row = json.loads(result.stdout.strip().splitlines()[-1])
    row["added_mb"] = row["peak_rss_mb"] - row["baseline_rss_mb"]
    return row


def run(smoke: bool = False) -> dict:
    shape, rank = (SMOKE, SMOKE_RANK) if smoke else (LLAMA3_8B, RANK)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter"
        synthetic_adapter(shape, adapter, rank)
        adapter_mb = (adapter / "adapter_model.safetensors").stat().st_size / 1e6
        rows = {}
        for intruders in (False, True):
            row = measured(adapter, shape, intruders)
            rows[row["mode"]] = row
            print(f"adapter_analysis: {row['mode']}: {row['seconds']:.1f} s "
                  f"(+{row['base_draw_seconds']:.1f} s drawing the base), "
                  f"+{row['added_mb']:.0f} MB over {row['baseline_rss_mb']:.0f} MB", flush=True)
    largest = max(a * b for a, b in linear_layers(shape).values()) * 4 / 1e6
    met = None if smoke else all(rows[mode]["seconds"] < goal for mode, goal in GOALS.items())
    return {"name": "adapter_analysis",
            "figure": round(rows["low_rank"]["seconds"], 1),
            "figure_label": "seconds for the low-rank metrics of a Llama-3-8B-shaped adapter "
                            "(without drawing the synthetic base)",
            "figure_text": (f"low-rank {rows['low_rank']['seconds']:.0f} s, with intruders "
                            f"{rows['intruders']['seconds']:.0f} s"),
            "goal": "low-rank metrics < 60 s, with intruder dimensions < 600 s (2 cores)",
            "met": met,
            "details": {"shape": shape, "rank": rank, "adapter_mb": adapter_mb,
                        "largest_base_layer_mb": largest, "rows": rows}}


def markdown(result: dict) -> str:
    details = result["details"]
    lines = [f"# adapter_analysis: {result['figure_text']}", "",
             f"Goal: {result['goal']}.", "",
             (f"Llama-shaped adapter {details['shape']}, r {details['rank']}, "
              f"{details['adapter_mb']:.0f} MB on disk; largest base layer "
              f"{details['largest_base_layer_mb']:.0f} MB in float32."), "",
             ("| mode | analysis, s | drawing the base, s | total, s | layers | threads "
              "| RSS after imports (MB) | added peak (MB) |"),
             "|---|---|---|---|---|---|---|---|"]
    for row in details["rows"].values():
        lines.append(f"| {row['mode']} | {row['seconds']:.1f} | {row['base_draw_seconds']:.1f} "
                     f"| {row['total_seconds']:.1f} | {row['layers']} | {row['threads']} | "
                     f"{row['baseline_rss_mb']:.0f} | {row['added_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    one = sub.add_parser("measure")
    one.add_argument("adapter", type=Path)
    one.add_argument("shape", type=json.loads)
    one.add_argument("intruders", type=int)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "measure":
        print(json.dumps(measure(args.adapter, args.shape, bool(args.intruders))))
    else:
        print(json.dumps(run(args.smoke), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
