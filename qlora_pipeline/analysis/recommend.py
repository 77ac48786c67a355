"""A LoRA rank for the next run, read from a trained adapter's spectra: per layer the smallest
rank that keeps a share of the update's energy ‖ΔW‖_F², and the layers whose update already
fills its r directions (there r was too small, and a smaller rank would lose more). Printed as
a task-config snippet, so the recommendation is one paste away from being tried.
"""

from __future__ import annotations

from collections import Counter

import yaml

from .spectrum import energy_rank


def recommend(records: dict[str, dict], r: int, energy: float = 0.9,
              saturation: float = 0.9) -> dict:
    """records: {weight key: spectrum.layer_metrics(...)}; r: the adapter's configured rank.

    uniform is the largest per-layer rank, so one r keeps the share in every layer; the
    snippet sets it and gives each layer that needs less its own rank in lora.rank_pattern.
    lora.alpha is left as it is: scaling = alpha/r then changes with the rank, as it does
    for any change of r. A layer is saturated when its entropy effective rank is at least
    saturation × its own rank (r unless a rank_pattern gave it another)."""
    if not records:
        raise ValueError("no adapted layers to recommend a rank from")
    per_layer = {key.removesuffix(".weight"): max(1, energy_rank(rec["singular_values"], energy))
                 for key, rec in records.items()}
    uniform = max(per_layer.values())
    saturated = [key.removesuffix(".weight") for key, rec in records.items()
                 if rec["effective_rank"] >= saturation * rec.get("rank", r)]
    # PEFT matches rank_pattern keys as regexes, re.match(rf"(.*\.)?({key})$", module name):
    # a module path is such a key. Its dots match any character, which selects no other
    # layer: module names differ in their words and digits, not in what stands for a dot.
    pattern = {key: rank for key, rank in per_layer.items() if rank < uniform}
    snippet = yaml.safe_dump({"lora": {"r": uniform, "rank_pattern": pattern}},
                             sort_keys=False)
    warning = (f"{len(saturated)} of {len(records)} layers are saturated (entropy effective rank "
               f"at least {saturation:.0%} of their rank, r = {r}): the adapter uses nearly all "
               f"of its directions there, so r is likely too small for this task; try a larger r"
               ) if saturated else None
    return {"energy": energy, "r": r, "per_layer": per_layer, "uniform": uniform,
            "histogram": dict(sorted(Counter(per_layer.values()).items())),
            "saturated": saturated, "warning": warning, "snippet": snippet}
