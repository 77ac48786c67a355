"""memory_model: the per-stage memory estimates (qlora_pipeline/core/memory.py) set against
what was measured, and the planning table of docs/cluster.md.

1. Planning (no inputs): per-GPU memory of QLoRA training for Llama 3.1 8B, 70B and 405B on
   one GPU, DDP (each GPU holds the whole model) and FSDP over 2, 4 and 8 GPUs, at the
   settings in SETTINGS; beside it the published figures our estimate can be checked against
   (PEFT's FSDP-QLoRA guide: Llama-2-70B on 2 GPUs, 35.6 GB per GPU without CPU offload;
   QLoRA: a 65B model trained on one 48 GB GPU).
2. Measured (a finished default run; skipped with --smoke): each model job's estimate against
   its measured peak, both as its log records them.

    python -m benchmarks.run --only memory_model
"""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks import support
from qlora_pipeline.core import layout, memory
from qlora_pipeline.models.methods import bnb4

GB = 1e9  # the published figures are in GB
SETTINGS = {"seq": 2048, "batch": 1, "lora": {"r": 16, "target_modules": "all-linear"}}
OPTIMIZER = "paged_adamw_8bit"  # the default on CUDA
NF4_BITS = bnb4.theoretical_bits({"double_quant": True})  # the default quantization
LLAMA = {  # config.json dimensions
    "Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "Llama-3.1-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
    "Llama-3.1-405B": dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                           num_attention_heads=128, num_key_value_heads=8, vocab_size=128256),
}
# Published set-ups, with the settings they state.
PUBLISHED = [
    {"source": "PEFT FSDP-QLoRA guide, no CPU offload", "model": "Llama-2-70B",
     "config": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                    num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
     "gpus": 2, "seq": 2048, "batch": 2, "lora": {"r": 8, "target_modules": "all-linear"},
     "published_gb": 35.6},
    {"source": "QLoRA paper: 65B on one 48 GB GPU", "model": "LLaMA-65B",
     "config": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                    num_attention_heads=64, num_key_value_heads=64, vocab_size=32000),
     "gpus": 1, "seq": 512, "batch": 1, "lora": {"r": 64, "target_modules": "all-linear"},
     "published_gb": 48.0},
]


def planned_shapes(config: dict, dtype_bytes: int = 2) -> memory.Shapes:
    """A Llama-style decoder (grouped-query attention, gated MLP) from its config alone: for
    planning a model not downloaded (docs/cluster.md's table)."""
    dims = memory.dimensions(config)
    h, kv = dims["hidden"], config.get("num_key_value_heads", dims["heads"])
    head_dim = h // dims["heads"]
    attention = 2 * h * h + 2 * h * kv * head_dim
    linear = dims["layers"] * (attention + 3 * h * dims["intermediate"])
    tied = config.get("tie_word_embeddings", False)
    other = dims["vocab"] * h * (1 if tied else 2) + dims["layers"] * 2 * h + h
    return memory.Shapes(**dims, linear_params=linear, other_params=other,
                         stored_bytes=(linear + other) * dtype_bytes,
                         largest_tensor=dims["vocab"] * h)


ESTIMATE_LOG = re.compile(r"memory estimate of (\w+): ([\d.]+) GiB")  # core/memory.check
PEAK_LOG = re.compile(r"rule \w+: done \(peak memory ([\d.]+) MB\)")  # jobs/runner.Job.run


def logged_estimates(results: Path) -> list[dict]:
    """Each model job of a finished run: its estimate (logged by `check`) against its
    measured peak (logged by the job runner), from its log. Snakemake's benchmark max_rss
    will not do: where a warm-start copy ran the stage, it measures only the job's script."""
    rows = []
    for log_path in sorted((Path(results) / "logs").rglob("*.log")):
        text = log_path.read_text(encoding="utf-8", errors="replace")
        estimates, peaks = ESTIMATE_LOG.findall(text), PEAK_LOG.findall(text)
        if not estimates or not peaks:
            continue
        estimate_mb, peak_mb = float(estimates[-1][1]) * 1024, float(peaks[-1])
        rows.append({"job": str(log_path.relative_to(Path(results) / "logs").with_suffix("")),
                     "estimate_mb": round(estimate_mb), "measured_mb": round(peak_mb),
                     "estimate_over_measured": round(estimate_mb / peak_mb, 2)})
    return rows


def training_gb(config: dict, gpus: int, seq: int, batch: int, lora: dict) -> float:
    """Per-GPU peak of QLoRA training on a CUDA GPU (bf16 compute, gradient checkpointing,
    memory-efficient attention), sharded over `gpus` with FSDP (1: one GPU, or DDP)."""
    shapes = planned_shapes(config)
    result = memory.estimate("train", shapes, weights="4bit", compute_bytes=2, fp_bytes=2,
                             batch=batch, seq=seq, lora=lora, training=True, checkpointing=True,
                             efficient_attention=True, shards=gpus, optimizer=OPTIMIZER,
                             bits=NF4_BITS)
    # "4bit" counts a load's transient fp32 tensor; the training loads the 4-bit checkpoint.
    return (result.total - shapes.largest_tensor * 4 // gpus) / GB


def planning() -> list[dict]:
    rows = []
    for name, config in LLAMA.items():
        row = {"model": name, "params_b": round(planned_shapes(config).params / 1e9, 1)}
        row["1 GPU / DDP"] = round(training_gb(config, 1, **SETTINGS), 1)
        for gpus in (2, 4, 8):
            row[f"FSDP {gpus}"] = round(training_gb(config, gpus, **SETTINGS), 1)
        rows.append(row)
    return rows


def published() -> list[dict]:
    return [{"source": p["source"], "model": p["model"], "gpus": p["gpus"], "seq": p["seq"],
             "batch": p["batch"], "r": p["lora"]["r"], "published_gb": p["published_gb"],
             "estimate_gb": round(training_gb(p["config"], p["gpus"], p["seq"], p["batch"],
                                              p["lora"]), 1)}
            for p in PUBLISHED]


def run(smoke: bool) -> dict:
    rows = [] if smoke else logged_estimates(support.REPO / layout.results())
    checks = published()
    ratios = [r["estimate_over_measured"] for r in rows]
    return {"name": "memory_model",
            "figure": round(checks[0]["estimate_gb"] / checks[0]["published_gb"], 2),
            "figure_label": "Llama-2-70B FSDP-QLoRA per GPU: estimate / PEFT's published",
            "goal": "none set: the estimate is an upper bound on this machine's stages",
            "met": None,
            "details": {"settings": SETTINGS, "planning": planning(), "published": checks,
                        "measured": rows,
                        "measured_ratio_range": [min(ratios), max(ratios)] if ratios else None}}


def table(rows: list[dict]) -> str:
    if not rows:
        return "(none)"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def markdown(result: dict) -> str:
    details = result["details"]
    return "\n\n".join([
        "# memory_model: estimated stage peaks against measured and published figures",
        f"QLoRA training, GB per GPU, at {details['settings']}, bf16 compute, {OPTIMIZER}, "
        f"gradient checkpointing, memory-efficient attention:", table(details["planning"]),
        "Against published figures:", table(details["published"]),
        "This machine's stages (estimate before loading vs the job's measured peak):",
        table(details["measured"])])
