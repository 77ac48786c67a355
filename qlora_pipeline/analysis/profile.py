"""Where an adapter changed the model: its per-layer metrics grouped by module type (q_proj,
down_proj, ...) and by depth, the mean spectrum of each module type, and a layer × module grid
for a heatmap. Read from weight names alone, so any architecture whose decoder blocks are
numbered (model.layers.<i>, gpt_neox.layers.<i>, transformer.h.<i>, ...) is profiled.
"""

from __future__ import annotations

import re

# The container of the numbered blocks: Llama/Mistral/Qwen/NeoX "layers", GPT-2/Falcon "h",
# BERT-style "layer", and "blocks". The first such index in a name is the decoder block's.
BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)")
BANDS = ("shallow", "middle", "deep")
MEANS = ("fro", "effective_rank", "stable_rank", "rank_90", "relative_norm", "intruders")


def parse_layer(key: str) -> tuple[int | None, str]:
    """'model.layers.12.self_attn.q_proj.weight' -> (12, 'q_proj'); (None, leaf) for a
    weight outside the numbered blocks."""
    name = key.removesuffix(".weight")
    match = BLOCK.search(name)
    return (int(match.group(1)) if match else None), name.rsplit(".", 1)[-1]


def depth_band(index: int, num_layers: int) -> str:
    """Thirds of the stack by index·3 // num_layers: 'shallow' (0), 'middle' (1), 'deep' (2);
    with 30 layers 0-9, 10-19 and 20-29 (a count not divisible by 3 leaves the middle or last
    band one layer short)."""
    if not 0 <= index < num_layers:
        raise ValueError(f"layer index {index}: expected 0 <= index < {num_layers}")
    return BANDS[index * 3 // num_layers]


def value(record: dict, metric: str) -> float | None:
    """A record's metric as a number: the intruder count for 'intruders', None when absent."""
    found = record.get(metric)
    return found["count"] if isinstance(found, dict) else found


def stats(records: list[dict]) -> dict:
    """Layer count and the mean of each of MEANS over the layers that have it (None if none)."""
    out: dict = {"layers": len(records)}
    for metric in MEANS:
        values = [v for v in (value(rec, metric) for rec in records) if v is not None]
        out[metric] = sum(values) / len(values) if values else None
    return out


def mean_spectrum(records: list[dict]) -> list[float]:
    """Mean over layers of S_i / S_max for i < the layer's rank; a zero update has no shape and
    is skipped. Layers of different ranks (rank_pattern) average over those reaching i."""
    sums: list[float] = []
    counts: list[int] = []
    for rec in records:
        S = rec["singular_values"][:rec["rank"]]
        top = max(S, default=0.0)
        if top <= 0:
            continue
        for i, s in enumerate(S):
            if i == len(sums):
                sums.append(0.0)
                counts.append(0)
            sums[i] += s / top
            counts[i] += 1
    return [total / n for total, n in zip(sums, counts, strict=True)]


def summarize(records: dict[str, dict], num_layers: int) -> dict:
    """records: {weight key: spectrum.layer_metrics(...)}. Stats by module (sorted by name) and
    by depth band (shallow, middle, deep; only those present; weights outside the numbered
    blocks count in by_module only), and each module's mean spectrum."""
    modules: dict[str, list[dict]] = {}
    bands: dict[str, list[dict]] = {}
    for key, rec in records.items():
        index, module = parse_layer(key)
        modules.setdefault(module, []).append(rec)
        if index is not None:
            bands.setdefault(depth_band(index, num_layers), []).append(rec)
    spectra = {module: mean_spectrum(modules[module]) for module in sorted(modules)}
    return {"by_module": {module: stats(modules[module]) for module in sorted(modules)},
            "by_depth": {band: stats(bands[band]) for band in BANDS if band in bands},
            "spectra": {module: spectrum for module, spectrum in spectra.items() if spectrum},
            "layers": len(records)}


def grid(records: dict[str, dict],
         metric: str) -> tuple[list[int], list[str], list[list[float | None]]]:
    """(layer indices, module names, matrix[layer][module]) of one metric for a heatmap; None
    where a module is not adapted in that layer. Weights outside the numbered blocks are left
    out; several weights in one cell (a mixture of experts' experts) give their mean."""
    cells: dict[tuple[int, str], list[float]] = {}
    for key, rec in records.items():
        index, module = parse_layer(key)
        found = value(rec, metric)
        if index is not None:
            cells.setdefault((index, module), [])
            if found is not None:
                cells[(index, module)].append(found)
    layers = sorted({index for index, _ in cells})
    modules = sorted({module for _, module in cells})
    matrix = [[mean(cells.get((index, module))) for module in modules] for index in layers]
    return layers, modules, matrix


def mean(values: list[float] | None) -> float | None:
    return sum(values) / len(values) if values else None
