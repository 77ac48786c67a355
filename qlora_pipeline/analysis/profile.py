"""Where an adapter changed the model: its per-layer metrics grouped by module type (q_proj,
down_proj, ...) and by depth, the mean spectrum of each module type, and a layer × module grid
for a heatmap. Read from weight names alone, so any architecture whose decoder blocks are
numbered (model.layers.<i>, gpt_neox.layers.<i>, transformer.h.<i>, ...) is profiled.
"""

from __future__ import annotations

from itertools import zip_longest

from ..core.layout import parse_layer

BANDS = ("shallow", "middle", "deep")
MEANS = ("fro", "effective_rank", "stable_rank", "rank_90", "relative_norm", "intruders")


def depth_band(index: int, num_layers: int) -> str:
    """Thirds of the stack by index·3 // num_layers: 'shallow' (0), 'middle' (1), 'deep' (2);
    with 30 layers 0-9, 10-19 and 20-29 (a count not divisible by 3 leaves the middle or last
    band one layer short)."""
    if not 0 <= index < num_layers:
        raise ValueError(f"layer index {index}: expected 0 <= index < {num_layers}")
    return BANDS[index * 3 // num_layers]


def stats(records: list[dict]) -> dict:
    """Layer count and the mean of each of MEANS over the layers that have it (None if none)."""
    out: dict = {"layers": len(records)}
    for metric in MEANS:
        # Each record's metric as a number (for 'intruders' its count), where it has one.
        found = [rec[metric] for rec in records if rec.get(metric) is not None]
        values = [v["count"] if isinstance(v, dict) else v for v in found]
        out[metric] = sum(values) / len(values) if values else None
    return out


def mean_spectrum(records: list[dict]) -> list[float]:
    """Mean over layers of S_i / S_max for i < the layer's rank; a zero update has no shape and
    is skipped. Layers of different ranks (rank_pattern) average over those reaching i."""
    spectra = []
    for rec in records:
        S = rec["singular_values"][:rec["rank"]]
        top = max(S, default=0.0)
        if top > 0:
            spectra.append([s / top for s in S])
    # The i-th column: the layers reaching i (zip_longest fills the others with None).
    columns = [[v for v in column if v is not None] for column in zip_longest(*spectra)]
    return [sum(column) / len(column) for column in columns]


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
    return {"by_module": {module: stats(modules[module]) for module in sorted(modules)},
            "by_depth": {band: stats(bands[band]) for band in BANDS if band in bands},
            # A module type whose every layer is a zero update has no mean spectrum.
            "spectra": {m: s for m in sorted(modules) if (s := mean_spectrum(modules[m]))},
            "layers": len(records)}
