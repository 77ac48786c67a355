"""The adapter analyses as one figure for the report: per adapter, where the update is (layer ×
module heatmaps of ‖ΔW‖_F and of effective rank), how its singular values fall (normalised
spectra per module type) and how it changes with depth; and the effective rank over training."""

from __future__ import annotations

from pathlib import Path

from ..outputs import read_json, read_jsonl
from . import profile

PANELS = 4


def plot_adapters(analysis_dirs: list, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dirs = sorted(map(Path, analysis_dirs))
    fig, axes = plt.subplots(max(len(dirs), 1), PANELS, figsize=(4.2 * PANELS, 3.4 * max(len(dirs), 1)),
                             squeeze=False)
    for row, directory in zip(axes, dirs):
        layers = read_json(directory / "layers.json")
        summary = read_json(directory / "summary.json")
        title = f"{summary['task']} {summary['kind']}"
        heatmap(fig, row[0], layers, "fro", f"{title}: ‖ΔW‖_F")
        heatmap(fig, row[1], layers, "effective_rank", f"{title}: effective rank (r={summary['r']})")
        spectra(row[2], summary["summary"]["spectra"], f"{title}: σ_i / σ_1")
        depth_profile(row[3], layers, f"{title}: by depth")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


def heatmap(fig, ax, layers: dict, metric: str, title: str) -> None:
    indices, modules, matrix = profile.grid(layers, metric)
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
    indices, modules, matrix = profile.grid(layers, metric)
    for j, module in enumerate(modules):
        points = [(i, row[j]) for i, row in zip(indices, matrix) if row[j] is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=module)
    ax.set(title=title, xlabel="layer", ylabel="‖ΔW‖_F/‖W0‖_F" if metric == "relative_norm"
           else "‖ΔW‖_F")
    ax.legend(fontsize=6)


def plot_rank_over_steps(ax, adapter_dir: Path, label: str, offset: int = 0) -> bool:
    """Mean effective rank per module type at each evaluation (training/adapter_monitor.py),
    steps shifted by `offset` (recovery continues after QLoRA)."""
    path = Path(adapter_dir) / "metrics.jsonl"
    records = [r for r in read_jsonl(path) if "adapter" in r] if path.exists() else []
    if not records:
        return False
    modules = sorted({m for r in records for m in r["adapter"]})
    for module in modules:
        points = [(r["step"], r["adapter"][module]["effective_rank"]) for r in records
                  if module in r["adapter"]]
        ax.plot([p[0] + offset for p in points], [p[1] for p in points], "o-",
                label=f"{label} {module}")
    return True
