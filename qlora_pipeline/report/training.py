"""Each task's trained adapters: steps, validation loss before and after, time, throughput,
memory and size (their summary.json), and the curves: training and validation loss over the
steps, with the adapter's effective rank at each evaluation below (metrics.jsonl)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..core.files import read_jsonl
from .common import each_json, figure, paragraphs

KEYS = ("steps", "eval_loss_initial", "eval_loss_best", "train_seconds", "tokens_per_second",
        "peak_memory_mb", "trainable_params", "trainable_pct")
# metrics.jsonl's losses: (column, line style, label)
CURVES = (("loss", "-", "train"), ("eval_loss", "o--", "validation"))


def rows(files: list, table: dict | None = None, frames: dict | None = None) -> pd.DataFrame:
    frame = pd.DataFrame([{"task": folder.parent.name, "adapter": folder.name,
                           **{k: summary.get(k) for k in KEYS}}
                          for folder, summary in each_json(files, "summary.json")])
    # A LoftQ/PiSSA adapter (its initial/ saved beside it) starts from the base's weights.
    frame.attrs["initialised"] = any((Path(d) / "initial").is_dir() for d in files)
    return frame


def markdown(frame: pd.DataFrame, table: dict | None = None) -> str:
    before = ("Validation loss before training is the quantized base's (the adapter starts at "
              "zero)" + ("; a LoftQ or PiSSA adapter's is its base's with the initial adapter "
                         "(docs/initialisation.md)" if frame.attrs.get("initialised") else "")
              + ".")
    return paragraphs("## Training", frame.to_markdown(index=False, floatfmt=".4g"), before,
                      "![losses](loss.png)")


def plot(frame: pd.DataFrame, files: list, table: dict | None, path: Path) -> None:
    """Per task: the losses over the steps (recovery continues after QLoRA) and below them the
    adapter's mean effective rank per module type at each evaluation."""
    tasks = sorted({Path(d).parent.name for d in files})
    with figure(path, 2, len(tasks), figsize=(5 * len(tasks), 7)) as (_, axes):
        for ax, rank_ax, task in zip(axes[0], axes[1], tasks):
            offset = 0
            for directory in sorted((Path(d) for d in files if Path(d).parent.name == task),
                                    key=lambda d: d.name != "qlora"):
                path = directory / "metrics.jsonl"
                found = pd.DataFrame(read_jsonl(path)) if path.exists() else pd.DataFrame()
                if found.empty:
                    continue
                for column, style, kind in CURVES:
                    if column in found:
                        points = found.dropna(subset=[column])
                        ax.plot(points["step"] + offset, points[column], style,
                                label=f"{directory.name} {kind}")
                ranks(rank_ax, found, directory.name, offset)
                offset += int(found["step"].max())
            ax.set(title=task, xlabel="step", ylabel="loss")
            ax.legend(fontsize=7)
            rank_ax.set(title=f"{task}: adapter effective rank", xlabel="step",
                        ylabel="mean effective rank")
            if rank_ax.lines:
                rank_ax.legend(fontsize=6)


def ranks(ax, found: pd.DataFrame, label: str, offset: int) -> None:
    """Mean effective rank per module type at each evaluation (analysis/monitor.py)."""
    records = found.dropna(subset=["adapter"]).to_dict("records") if "adapter" in found else []
    for module in sorted({m for r in records for m in r["adapter"]}):
        points = [(r["step"], r["adapter"][module]["effective_rank"]) for r in records
                  if module in r["adapter"]]
        ax.plot([p[0] + offset for p in points], [p[1] for p in points], "o-",
                label=f"{label} {module}")
