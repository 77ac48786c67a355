"""The report's combination section: every task of a combination scored with the quantized
base, every such task's adapter and every combination of it (combinations.csv), the retention of
each combination, the best method per set of tasks, and the tasks' subspace overlaps
(overlap.png). Paths come from rules/common.smk's combination_table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..core.files import read_json
from ..core.layout import COMBINED, Variant, parse_layer
from .common import figure, paragraphs, pipe_table
from .sweeps import own_score

BASE = "quantized"  # the base every combined adapter was trained on, and is scored on
BASE_LABEL = "quantized base"
KINDS = {BASE: "base", COMBINED: "combined"}  # the others: "own" or "other task"


def rows(files: list, table: dict, frames: dict | None = None) -> pd.DataFrame:
    """One row per task × adapter: the task's own metric, its gain over the quantized base and,
    for a combination, its retention (combined − base) / (own adapter − base), left empty where
    the own adapter gained nothing (a ratio of noise)."""
    rows = []
    for task, variants in sorted(table["results"].items()):
        scores = {v: own_score(read_json(path)) for v, path in variants.items()}
        metric, base, _ = scores[BASE]
        own = scores["qlora"][1]
        for variant, (_, value, stderr) in scores.items():
            found = Variant.parse(variant)
            kind = KINDS.get(found.kind) or \
                ("own" if found.source in (None, task) else "other task")
            combined = kind == "combined"
            rows.append({
                "task": task, "metric": metric,
                "adapter": BASE_LABEL if kind == "base" else found.source or task, "kind": kind,
                "method": table["combinations"][found.source]["method"] if combined else None,
                "score": value, "stderr": stderr,
                "gain": None if variant == BASE else value - base,
                "retention": (value - base) / (own - base) if combined and own > base else None})
    return pd.DataFrame(rows)


def matrix_markdown(frame: pd.DataFrame, table: dict) -> str:
    """Tasks as rows, adapters as columns: score (gain over the quantized base; retention).
    Columns: the base, the task adapters by name, then the combinations in config order."""
    singles = sorted(set(frame.loc[frame["kind"].isin(["own", "other task"]), "adapter"]))
    order = [BASE_LABEL, *singles, *table["combinations"]]
    cells = frame.assign(cell=[cell(row) for row in frame.itertuples()]).pivot_table(
        index=["task", "metric"], columns="adapter", values="cell", aggfunc="first")
    cells = cells.reindex(columns=order).fillna("")
    return pipe_table(["task", "metric", *order], [[*key, *row] for key, row in cells.iterrows()])


def cell(row) -> str:
    """The score, and in parentheses its gain and retention where it has them (a row with a
    retention, a combination's, always has a gain)."""
    extra = [f"{value:{spec}}" for value, spec in ((row.gain, "+.3f"), (row.retention, ".0%"))
             if pd.notna(value)]
    return f"{row.score:.3f}" + (f" ({', '.join(extra)})" if extra else "")


def best_methods(frame: pd.DataFrame, table: dict) -> pd.DataFrame:
    """Per set of tasks combined: each combination's mean retention and gain over its tasks,
    best first (retention where every task's own adapter gained, else gain)."""
    rows = []
    for name, combination in table["combinations"].items():
        own = frame[(frame["adapter"] == name) & frame["task"].isin(combination["tasks"])]
        rows.append({"tasks": " + ".join(combination["tasks"]), "combination": name,
                     "method": combination["method"],
                     "weights": ", ".join(f"{w:g}" for w in combination["weights"]),
                     "mean_gain": own["gain"].astype(float).mean(),
                     "stderr": own["stderr"].astype(float).mean(),
                     "mean_retention": own["retention"].astype(float).mean()
                     if own["retention"].notna().all() else None})
    best = pd.DataFrame(rows)
    best["_key"] = best["mean_retention"].fillna(best["mean_gain"]).astype(float)
    best = best.sort_values(["tasks", "_key"], ascending=[True, False], ignore_index=True)
    best["best"] = ~best.duplicated("tasks")
    return best.drop(columns="_key")


def infos(table: dict) -> dict[str, dict]:
    """Each combination's combination.json, by the combination's name."""
    return {name: read_json(Path(combination["adapter"]) / "combination.json")
            for name, combination in table["combinations"].items()}


def details(table: dict) -> pd.DataFrame:
    """Each combination's size and exactness."""
    return pd.DataFrame([{"combination": name, "method": info["method"],
                          "rank": f"{info['rank']['min']}..{info['rank']['max']}",
                          "parameters": f"{sum(info['parameters']['sources'].values()):,} -> "
                                        f"{info['parameters']['combined']:,}",
                          "error_vs_definition_max": info["relative_error"]["max"],
                          "distance_from_sum_mean": info["from_sum"]["mean"]}
                         for name, info in infos(table).items()])


def overlaps(table: dict) -> pd.DataFrame:
    """Every task pair's per-layer overlap, once per pair and layer."""
    rows = [{**record, "depth": parse_layer(record["layer"])[0] or 0,
             "module": record["layer"].rsplit(".", 1)[-1]}
            for info in infos(table).values() for record in info["overlap"]]
    frame = pd.DataFrame(rows, columns=["pair", "layer", "overlap", "max_cosine", "random",
                                        "depth", "module"])
    return frame.drop_duplicates(["pair", "layer"], ignore_index=True)


def overlap_markdown(frame: pd.DataFrame) -> str:
    summary = frame.groupby(["pair", "module"], as_index=False).agg(
        layers=("overlap", "size"), mean_overlap=("overlap", "mean"),
        max_overlap=("overlap", "max"), random_level=("random", "mean"))
    summary["pair"] = summary["pair"].str.replace("|", " & ", regex=False)
    return summary.to_markdown(index=False, floatfmt=".3f")


def plot(frame: pd.DataFrame, files: list, table: dict, path: Path) -> None:
    """One heatmap per task pair: module type × depth, coloured by overlap."""
    frame = overlaps(table)
    pairs = sorted(frame["pair"].unique()) or ["none"]
    # One colour scale for every pair, up to the largest overlap: trained adapters overlap by
    # a few tenths at most, which a 0-1 scale would leave all dark.
    top = max(0.05, float(frame["overlap"].max()) if len(frame) else 0.0)
    with figure(path, len(pairs), 1, figsize=(10, 2.6 * len(pairs))) as (fig, axes):
        for ax, pair in zip(axes[:, 0], pairs):
            group = frame[frame["pair"] == pair]
            if group.empty:
                ax.set_axis_off()
                continue
            grid = group.pivot_table(index="module", columns="depth", values="overlap")
            image = ax.imshow(grid.to_numpy(), vmin=0, vmax=top, aspect="auto", cmap="viridis")
            ax.set(yticks=range(len(grid.index)), yticklabels=list(grid.index), xlabel="layer",
                   title=f"{pair.replace('|', ' & ')}: mean overlap "
                         f"{group['overlap'].mean():.3f} "
                         f"(random subspaces ≈ {group['random'].mean():.3f})")
            ax.set_xticks(range(len(grid.columns)), [str(c) for c in grid.columns], fontsize=7)
            fig.colorbar(image, ax=ax, label="mean cos² of principal angles")


def markdown(frame: pd.DataFrame, table: dict) -> str:
    overlap = overlaps(table)
    return paragraphs(
        "## Combinations",
        "Each combination (results/adapters/combined/<name>/) scored on its tasks on the "
        "quantized base, beside every task's own QLoRA adapter and the other tasks' "
        "(interference). Cells: the task's own metric (gain over the quantized base; for a "
        "combination, retention = (combined − base) / (own adapter − base)). "
        "combinations.csv holds every row.",
        matrix_markdown(frame, table), "### Best method per set of tasks",
        "Ranked by mean retention over the tasks (by mean gain where an own adapter gained "
        "nothing). Means closer than about twice `stderr` (the scores' mean standard error) "
        "are not told apart by these test splits.",
        best_methods(frame, table).to_markdown(index=False, floatfmt=".3f"),
        "### Combined adapters",
        "Error against the method's own definition (0 for cat and sum, the Eckart–Young cut "
        "for the others) and distance from the plain weighted sum Σ wᵢΔWᵢ, relative, per "
        "layer.", details(table).to_markdown(index=False, floatfmt=".3g"),
        "### Subspace overlap between task adapters",
        "Mean squared cosine of the principal angles between the column spaces of two tasks' "
        "ΔW, per layer both adapt; random subspaces of the same ranks give `random_level`.",
        overlap_markdown(overlap) if not overlap.empty else "No layer is adapted by two tasks.",
        "![overlap](overlap.png)")
