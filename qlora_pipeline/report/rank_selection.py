"""The report's Rank selection section: does AdaLoRA's budget go where the spectrum said it
should? Per layer, the rank AdaLoRA kept (its adapter's rank_pattern.json) beside the rank
the analysis recommends for a plain LoRA adapter of the same task (the smallest rank keeping
a share of ‖ΔW‖_F², analysis/recommend.py), by module type and depth third, with Spearman's
rank correlation over the layers.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..core.files import read_json
from ..core.layout import parse_layer
from .common import figure, paragraphs


def plain(lora: dict) -> bool:
    """A LoRA training that starts at zero: what the recommendation was made for."""
    return lora.get("type", "lora") == "lora" and lora.get("init", True) is True


def pairs(rows: dict[str, dict]) -> list[tuple[str, str]]:
    """(AdaLoRA training, plain LoRA training) among one task's scored trainings ({id: {"lora":
    its block, ...}}, the task's own first, as the table lists it): each AdaLoRA training
    beside the task's own training where that is plain, else the first plain sweep point of
    the same r; both adapting the same layers."""
    found = []
    for training, row in rows.items():
        lora = row["lora"]
        if lora.get("type") != "adalora":
            continue
        same = [other for other, o in rows.items() if plain(o["lora"])
                and (other == "own" or o["lora"]["r"] == lora["r"])
                and all(o["lora"][key] == lora[key] for key in ("target_modules",
                                                                "layers_to_transform"))]
        if same:
            found.append((training, same[0]))
    return found


DEPTHS = ("shallow", "middle", "deep", "other")  # other: outside the numbered blocks


def depth_band(index: int, num_layers: int) -> str:
    """analysis/profile.depth_band's thirds, which the report may not import (a sibling layer;
    moving it to core would rerun every job): tests/test_init_rank.py holds the two equal."""
    return DEPTHS[index * 3 // num_layers]


def module_path(key: str) -> str:
    """A layer's module path (model.layers.0.self_attn.q_proj), whether written with PEFT's
    saved-name prefix or a weight suffix. Written here: models/adapter_file.PREFIX imports
    torch, which the report's environment does not have."""
    return key.removeprefix("base_model.model.").removesuffix(".weight")


def layer_ranks(adapter: Path, analysis: Path) -> pd.DataFrame:
    """Per layer both adapters adapt: module, depth third (of the deepest adapted layer + 1,
    as the analysis counts depth when the model's config gives none), AdaLoRA's final rank,
    the recommended rank."""
    kept = {module_path(k): v for k, v in
            read_json(adapter / "rank_pattern.json")["ranks"].items()}
    recommended = {module_path(k): v for k, v in
                   read_json(analysis / "summary.json")["recommendation"]["per_layer"].items()}
    layers = [key for key in recommended if key in kept]
    if not layers:
        raise ValueError(f"{adapter}/rank_pattern.json: no layer in common with "
                         f"{analysis}/summary.json's recommendation; expected the same layers")
    indices = {key: parse_layer(key)[0] for key in layers}
    depth = max((i for i in indices.values() if i is not None), default=0) + 1
    return pd.DataFrame([{"layer": key, "module": parse_layer(key)[1],
                          "depth": "other" if indices[key] is None else
                          depth_band(indices[key], depth),
                          "adalora_rank": kept[key], "recommended_rank": recommended[key]}
                         for key in layers])


def spearman(ranks: pd.DataFrame) -> float:
    """Spearman's rho: Pearson's correlation of the average ranks, which is what
    scipy.stats.spearmanr computes; pandas alone, as the report's environment has no scipy.
    NaN where either side is constant."""
    return ranks["adalora_rank"].rank().corr(ranks["recommended_rank"].rank())


def rows(files: list, tables: dict, frames: dict | None = None) -> pd.DataFrame:
    """One row per layer of each (AdaLoRA, plain LoRA) pair of each task: task, adalora,
    lora (their training ids), then layer_ranks' columns. `tables`: {task: rules/common.smk's
    init_rank_table}."""
    found = []
    for task, table in tables.items():
        trainings = table["rows"]
        for adalora, lora in pairs(trainings):
            ranks = layer_ranks(Path(trainings[adalora]["adapter"]),
                                Path(trainings[lora]["analysis"]))
            found.append(ranks.assign(task=task, adalora=adalora, lora=lora))
    columns = ["task", "adalora", "lora", "layer", "module", "depth", "adalora_rank",
               "recommended_rank"]
    return pd.concat(found, ignore_index=True)[columns]


def markdown(frame: pd.DataFrame, tables: dict) -> str:
    parts = ["## Rank selection",
             "Does AdaLoRA's budget go where the spectrum said it should? Per layer, the rank "
             "AdaLoRA kept at the end of training (rank_pattern.json) beside the rank the "
             "analysis recommends for a plain LoRA adapter of the task (the smallest keeping "
             "the configured share of ‖ΔW‖_F²), averaged by module type and depth third; "
             "Spearman's ρ compares their order over the layers. rank_selection.csv holds "
             "every layer, rank_selection.png plots one against the other.",
             "![rank selection](rank_selection.png)"]
    for (task, adalora, lora), ranks in frame.groupby(["task", "adalora", "lora"], sort=False):
        rows = tables[task]["rows"]
        budget = read_json(Path(rows[adalora]["adapter"]) / "rank_pattern.json")["budget"]
        energy = read_json(Path(rows[lora]["analysis"]) / "summary.json")["recommendation"]
        table = ranks.groupby(["module", "depth"]).agg(
            layers=("layer", "size"), adalora_rank=("adalora_rank", "mean"),
            recommended_rank=("recommended_rank", "mean")).reset_index().sort_values(
            ["module", "depth"], key=lambda c: c.map(DEPTHS.index) if c.name == "depth" else c)
        parts += [f"### {task}: AdaLoRA {adalora} against the recommendation for {lora} "
                  f"(energy {energy['energy']})",
                  table.to_markdown(index=False, floatfmt=".3g"),
                  f"Budget {budget}, ranks kept {ranks['adalora_rank'].sum()} over "
                  f"{len(ranks)} layers; Spearman's ρ = {spearman(ranks):.3f}."]
    return paragraphs(*parts)


def plot(frame: pd.DataFrame, files: list, tables: dict, path: Path) -> None:
    """Per pair: AdaLoRA's final rank against the recommended rank, one point per layer,
    coloured by module type."""
    groups = list(frame.groupby(["task", "adalora", "lora"], sort=False))
    with figure(path, 1, len(groups), figsize=(4.5 * len(groups), 4)) as (_, axes):
        for ax, ((task, adalora, lora), ranks) in zip(axes[0], groups):
            for module, layers in ranks.groupby("module"):
                ax.scatter(layers["recommended_rank"], layers["adalora_rank"], label=module,
                           alpha=0.7)
            ax.set(title=f"{task}: ρ = {spearman(ranks):.2f}",
                   xlabel=f"recommended rank ({lora})", ylabel=f"AdaLoRA rank ({adalora})")
            ax.legend(fontsize="small")
