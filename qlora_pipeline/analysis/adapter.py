"""One saved adapter analysed against the base it was trained on, one layer at a time.

The adapter is small (its A and B); the base is read a tensor at a time from its checkpoint
(models/checkpoint.py dequantizes a 4-bit weight there, the one place a quantization method's
storage is read), so memory holds one base layer whatever the model's size.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..core.files import read_json
from ..models.adapter_file import Update, max_rank, read_against
from . import profile, recommend, spectrum

log = logging.getLogger(__name__)


def analyze(adapter_dir, base_dir, settings: dict, device: str = "cpu") -> dict:
    """analyze_updates on a saved adapter and the base checkpoint it was trained on."""
    started = time.perf_counter()
    updates, checkpoint = read_against(adapter_dir, base_dir)
    r = max_rank(read_json(Path(adapter_dir) / "adapter_config.json"))
    result = analyze_updates(updates, checkpoint.weight, r,
                             lambda layers: num_layers(Path(base_dir), layers), settings, device)
    result["seconds"] = round(time.perf_counter() - started, 2)
    log.info("analysed %d layers of %s in %.1f s", len(updates), adapter_dir, result["seconds"])
    return result


def analyze_updates(updates: dict[str, Update], base_weight: Callable[[str], torch.Tensor],
                    r: int, depth: Callable[[dict], int], settings: dict,
                    device: str = "cpu") -> dict:
    """{"layers": {weight key: layer metrics}, "summary": profile.summarize, "recommendation":
    recommend.recommend, "r", "layers_analyzed"}. base_weight(key) gives one base weight at a
    time (a checkpoint's reader; a benchmark's generator); depth(layers) the model's number of
    layers. The SVDs run on `device` (the job's policy: a GPU where there is one), one layer
    there at a time."""
    intruders = settings["intruders"]
    intruder_cfg = ({k: intruders[k] for k in ("k", "reference", "threshold")}
                    if intruders["enabled"] else None)
    layers = {key: spectrum.layer_metrics(on(update, device),
                                          base_weight(key).to(device).float(), intruder_cfg)
              for key, update in updates.items()}
    return {"r": r, "layers_analyzed": len(layers),
            "summary": profile.summarize(layers, depth(layers)),
            "recommendation": recommend.recommend(layers, r, settings["energy"],
                                                  settings["saturation"]),
            "layers": layers}


def on(update: Update, device: str) -> Update:
    magnitude = update.magnitude.to(device) if update.magnitude is not None else None
    return dataclasses.replace(update, A=update.A.to(device), B=update.B.to(device),
                               magnitude=magnitude)


def num_layers(base_dir: Path, layers: dict) -> int:
    """The model's depth from its config (the adapter may skip layers), else the deepest
    adapted layer + 1."""
    config = read_json(base_dir / "config.json")
    depth = config.get("num_hidden_layers") or config.get("n_layer")
    if depth:
        return int(depth)
    # A weight outside the numbered blocks (index None) counts as index 0: no deeper.
    return max((profile.parse_layer(key)[0] or 0 for key in layers), default=0) + 1
