"""The adapter's spectrum while it trains: at each evaluation, the mean effective rank and
‖ΔW‖_F of each adapted module type, as one line of metrics.jsonl (the report plots them over
the steps, next to the loss).

From the live LoRA factors (analysis/spectrum.py: QR of B and Aᵀ, then an r×r SVD), so it costs
milliseconds per layer and never forms ΔW. DoRA's magnitude rescaling is left out here (its
update is not low-rank); the analyze_adapter stage computes that one exactly.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from transformers import TrainerCallback

from . import profile, spectrum


class AdapterMonitor(TrainerCallback):
    def __init__(self, path: Path):
        self.path = path

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        record = {"step": state.global_step, "adapter": snapshot(model)}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


@torch.no_grad()
def snapshot(model) -> dict[str, dict]:
    """{module type: {"effective_rank": mean, "fro": mean, "layers": n}} over the adapted layers."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for name, module in model.named_modules():
        factors = lora_factors(module)
        if factors is None:
            continue
        A, B, scaling = factors
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            continue  # a broken adapter: the loss guard stops the run, not this log
        S = spectrum.low_rank_svd(A, B, scaling)[1]
        groups[profile.parse_layer(name)[1]].append(spectrum.metrics(S))
    return {leaf: {"effective_rank": sum(m["effective_rank"] for m in rows) / len(rows),
                   "fro": sum(m["fro"] for m in rows) / len(rows), "layers": len(rows)}
            for leaf, rows in sorted(groups.items())}


def lora_factors(module):
    """(A, B, scaling) of a PEFT LoRA layer's active adapter, or None for any other module.
    An AdaLoRA layer's: (diag(E)·A, B, PEFT's scaling / ranknum), as models/adapter_file.py."""
    lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    names = getattr(module, "active_adapters", None)
    if isinstance(lora_a, torch.nn.ParameterDict) and names and names[0] in lora_a:
        name = names[0]
        return ((lora_a[name] * module.lora_E[name]).detach().float(),
                lora_b[name].detach().float(),
                float(module.scaling[name] / (module.ranknum[name] + 1e-5)))
    if not isinstance(lora_a, torch.nn.ModuleDict) or not names or names[0] not in lora_a:
        return None
    name = names[0]
    return (lora_a[name].weight.detach().float(), lora_b[name].weight.detach().float(),
            float(module.scaling[name]))
