"""The adapter analyses (analysis/): per adapter its rank, the rank it needed and the rank
recommended, each analysis's own tables, and one figure: where the update is (layer × module
heatmaps of ‖ΔW‖_F and of effective rank), how its singular values fall (normalised spectra
per module type) and how it changes with depth."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..core.files import read_json
from ..core.layout import parse_layer
from .common import each_json, figure

PANELS = 4


def rows(files: list, table: dict | None = None, frames: dict | None = None) -> pd.DataFrame:
    return pd.DataFrame([{"task": summary["task"], "adapter": summary["kind"], "r": summary["r"],
                          "layers": summary["layers_analyzed"],
                          "effective_rank": mean_effective_rank(summary),
                          "recommended_r": summary["recommendation"]["uniform"],
                          "folder": str(folder)}
                         for folder, summary in each_json(sorted(map(Path, files)),
                                                          "summary.json")])


def mean_effective_rank(analysis: dict) -> float:
    """An adapter's effective rank averaged over its adapted layers, from its analysis's
    summary.json (by_module: each module type's mean and layer count; every type has a layer)."""
    by_module = analysis["summary"]["by_module"]
    layers = sum(m["layers"] for m in by_module.values())
    return sum(m["effective_rank"] * m["layers"] for m in by_module.values()) / layers


def markdown(frame: pd.DataFrame, table: dict | None = None) -> str:
    sections = [(Path(folder) / "analysis.md").read_text(encoding="utf-8")
                for folder in frame["folder"]]
    return "\n".join(["## Adapters", "",
                      "Each trained adapter's update ΔW, layer by layer (results/analysis/).", "",
                      frame.drop(columns="folder").to_markdown(index=False, floatfmt=".3g"), "",
                      "![adapters](adapters.png)", "", *sections])


def plot(frame: pd.DataFrame, files: list, table: dict | None, path: Path) -> None:
    height = max(len(frame), 1)
    with figure(path, height, PANELS, dpi=90, figsize=(4.2 * PANELS, 3.4 * height)) as (fig, axes):
        for row, (folder, summary) in zip(axes, each_json(frame["folder"], "summary.json")):
            layers = read_json(folder / "layers.json")
            title = f"{summary['task']} {summary['kind']}"
            heatmap(fig, row[0], layers, "fro", f"{title}: ‖ΔW‖_F")
            heatmap(fig, row[1], layers, "effective_rank",
                    f"{title}: effective rank (r={summary['r']})")
            spectra(row[2], summary["summary"]["spectra"], f"{title}: σ_i / σ_1")
            depth_profile(row[3], layers, f"{title}: by depth")


def heatmap(fig, ax, layers: dict, metric: str, title: str) -> None:
    indices, modules, matrix = grid(layers, metric)
    values = [[float("nan") if v is None else v for v in row] for row in matrix]
    image = ax.imshow(values, aspect="auto", origin="lower", cmap="viridis")
    ax.set(title=title, xlabel="module", ylabel="layer")
    ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(indices))[::max(1, len(indices) // 8)],
                  indices[::max(1, len(indices) // 8)], fontsize=7)
    fig.colorbar(image, ax=ax, fraction=0.046)


def spectra(ax, spectra_by_module: dict, title: str) -> None:
    for module, values in spectra_by_module.items():
        ax.plot(range(1, len(values) + 1), values, marker=".", label=module)
    ax.set(title=title, xlabel="i", ylabel="mean σ_i / σ_1", ylim=(0, 1.05))
    ax.legend(fontsize=6)


def depth_profile(ax, layers: dict, title: str) -> None:
    """Mean relative update ‖ΔW‖_F/‖W0‖_F (or ‖ΔW‖_F) per layer index, per module type."""
    metric = "relative_norm" if any(m.get("relative_norm") is not None for m in layers.values()) \
        else "fro"
    indices, modules, matrix = grid(layers, metric)
    for j, module in enumerate(modules):
        points = [(i, row[j]) for i, row in zip(indices, matrix) if row[j] is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=module)
    ax.set(title=title, xlabel="layer", ylabel="‖ΔW‖_F/‖W0‖_F" if metric == "relative_norm"
           else "‖ΔW‖_F")
    ax.legend(fontsize=6)


def grid(records: dict[str, dict],
         metric: str) -> tuple[list[int], list[str], list[list[float | None]]]:
    """(layer indices, module names, matrix[layer][module]) of one metric for a heatmap; None
    where a module is not adapted in that layer. Weights outside the numbered blocks are left
    out; several weights in one cell (a mixture of experts' experts) give their mean."""
    cells: dict[tuple[int, str], list[float]] = {}
    for key, rec in records.items():
        index, module = parse_layer(key)
        found = rec.get(metric)
        found = found["count"] if isinstance(found, dict) else found  # intruders
        if index is not None:
            cell = cells.setdefault((index, module), [])
            if found is not None:
                cell.append(found)
    layers = sorted({index for index, _ in cells})
    modules = sorted({module for _, module in cells})
    means = {cell: sum(values) / len(values) for cell, values in cells.items() if values}
    matrix = [[means.get((index, module)) for module in modules] for index in layers]
    return layers, modules, matrix
