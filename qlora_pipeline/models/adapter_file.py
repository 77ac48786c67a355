"""A saved PEFT LoRA adapter read as plain tensors, one update per adapted layer, without
PEFT or the model: what the streamed merge and the adapter analysis compute from.

ΔW = scaling·B·A (α/r, or α/√r with rsLoRA; r per layer, so rank_pattern adapters work), and
DoRA's magnitude where the adapter has one. An AdaLoRA adapter (B·diag(E)·A, its kept triplets)
is read as the LoRA update it equals: A' = diag(E)·A and PEFT's scaling α / (init_r + 1e-5)
(ranknum, which stays init_r after pruning). Settings whose effect this module does not compute
are refused, not ignored (UNSUPPORTED).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import torch

from ..core.errors import InputError
from .checkpoint import Checkpoint

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
# adapter_config.json settings whose update this module does not compute: refused, not ignored.
UNSUPPORTED = {"lora_bias": False, "alpha_pattern": {}, "modules_to_save": None,
               "layer_replication": None, "trainable_token_indices": None,
               "target_parameters": None, "use_qalora": False, "use_bdlora": None}
# The settings read here, of the types PEFT writes them: PEFT does not check them on loading.
SETTINGS = {"type": "object", "required": ["peft_type", "r", "lora_alpha"], "properties": {
    "r": {"type": "integer", "minimum": 1}, "init_r": {"type": "integer", "minimum": 1},
    "lora_alpha": {"type": "number"}, "use_rslora": {"type": ["boolean", "null"]},
    "use_dora": {"type": ["boolean", "null"]}, "fan_in_fan_out": {"type": ["boolean", "null"]},
    "target_modules": {"type": ["array", "string", "null"], "items": {"type": "string"}},
    "rank_pattern": {"type": ["object", "null"]},
    "base_model_name_or_path": {"type": ["string", "null"]}}}
# AdaLoRA's own settings: its schedule, which a written LoRA adapter no longer has.
ADALORA_ONLY = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2",
                "orth_reg_weight", "total_step")


@dataclass
class Update:
    """One adapted layer: ΔW = scaling·B·A (transposed with fan_in_fan_out); DoRA's magnitude."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    fan_in_fan_out: bool
    magnitude: torch.Tensor | None = None

    def delta(self) -> torch.Tensor:
        # PEFT's get_delta_weight, in float32 (PEFT also upcasts bf16/fp16 on the CPU).
        delta = self.B.float() @ self.A.float()
        return (delta.T if self.fan_in_fan_out else delta) * self.scaling

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """W + ΔW, or DoRA's m·(W + ΔW)/‖W + ΔW‖ (row norms of the unmerged sum, as PEFT)."""
        merged = weight.float() + self.delta()
        if self.magnitude is None:
            return merged
        rows = merged.T if self.fan_in_fan_out else merged
        factor = (self.magnitude.float() / torch.linalg.norm(rows, dim=1)).view(-1, 1)
        return (factor.T if self.fan_in_fan_out else factor) * merged


def read_adapter(adapter_dir: Path) -> dict[str, Update]:
    """Every adapted layer of a saved PEFT LoRA adapter, keyed by the base weight it changes."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = check(adapter_dir)
    layers: dict[str, dict] = {}
    for key, tensor in load_file(adapter_dir / WEIGHTS).items():
        module, part = split_adapter_key(key, adapter_dir)
        layers.setdefault(module, {})[part] = tensor
    return {f"{module}.weight": update(module, parts, config, adapter_dir)
            for module, parts in layers.items()}


def read_config(adapter_dir: Path) -> dict:
    """adapter_config.json as a mapping, or one line naming the file."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise InputError(f"{path}: not readable as JSON ({err}); expected a saved adapter's "
                         f"settings (PEFT's save_pretrained)") from None
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(SETTINGS).iter_errors(config))
    if error is not None:
        key = ".".join(map(str, error.absolute_path)) or "<top level>"
        raise InputError(f"{path}: key '{key}': {error.message}; expected a saved adapter's "
                         f"settings (PEFT's save_pretrained)")
    return config


def check(adapter_dir: Path, base_dir: Path | None = None) -> dict:
    """A saved adapter's settings, once its files are whole and, given its base's folder, its
    factors fit that base's weights; else one line naming the file. PEFT itself fails on these
    in a traceback deep in loading (a size mismatch, a safetensors header error)."""
    from safetensors import SafetensorError, safe_open

    config = read_config(adapter_dir)
    check_supported(config, adapter_dir)
    path = Path(adapter_dir) / WEIGHTS
    try:
        with safe_open(path, "pt") as handle:
            shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    except (OSError, SafetensorError) as err:
        raise InputError(f"{path}: not a readable safetensors file ({err}); expected the "
                         f"adapter's weights, whole") from None
    layers: dict[str, dict] = {}
    for key, shape in shapes.items():
        module, part = split_adapter_key(key, adapter_dir)
        layers.setdefault(module, {})[part] = shape
    for module, parts in layers.items():
        a, b = parts.get("A", []), parts.get("B", [])
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise InputError(f"{path}: layer {module}: lora_A {a or 'missing'}, lora_B "
                             f"{b or 'missing'}; expected matrices [r, in] and [out, r]")
    if base_dir is not None:
        check_shapes(shapes, config, path, Checkpoint(base_dir))
    return config


def check_shapes(shapes: dict, config: dict, path: Path, base: Checkpoint) -> None:
    """Each factor against the base weight it changes: lora_A [r, in], lora_B [out, r]
    (in and out swapped in a fan_in_fan_out layer's weight, as PEFT's Conv1D)."""
    from safetensors import safe_open

    stored = {}
    for shard in set(base.weight_map.values()):  # headers only: no tensor is read
        with safe_open(base.dir / shard, "pt") as handle:
            stored |= {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    for key, shape in shapes.items():
        module, part = split_adapter_key(key, path.parent)
        weight = f"{module}.weight"
        if part not in ("A", "B") or len(stored.get(weight, ())) != 2:
            continue  # a weight the base lacks: read_against names it
        out, fan_in = stored[weight]
        if config.get("fan_in_fan_out"):
            out, fan_in = fan_in, out
        side, size = (1, fan_in) if part == "A" else (0, out)
        if shape[side] != size:
            raise InputError(f"{path}: {key} has shape {shape}, but {base.dir}'s {weight} is "
                             f"[{out}, {fan_in}]; expected an adapter trained on this base")


def read_against(adapter_dir: Path, base_dir: Path) -> tuple[dict[str, Update], Checkpoint]:
    """The adapter's updates and the base checkpoint they apply to, read one tensor at a time;
    an adapter of weights the base does not store is refused."""
    updates = read_adapter(adapter_dir)
    checkpoint = Checkpoint(base_dir)
    missing = sorted(set(updates) - set(checkpoint.ordered_keys()))
    if missing:
        raise InputError(f"{adapter_dir}: adapts {missing[:3]} which {base_dir} does not store "
                         f"(another model, or a tied or renamed weight?); expected weights "
                         f"among its checkpoint")
    return updates, checkpoint


def max_rank(config: dict) -> int:
    """The largest rank a layer of this adapter can have: r, AdaLoRA's init_r."""
    return int(config["init_r"] if config.get("peft_type") == "ADALORA" else config["r"])


def as_lora(config: dict) -> dict:
    """The settings of LoRA factors written from this adapter's updates (compression,
    combination): an AdaLoRA adapter's without its schedule, as a LoRA adapter of rank init_r."""
    if config.get("peft_type") != "ADALORA":
        return config
    return {**{k: v for k, v in config.items() if k not in ADALORA_ONLY}, "peft_type": "LORA",
            "r": config["init_r"], "rank_pattern": {}}


def check_supported(config: dict, adapter_dir: Path) -> None:
    if config.get("peft_type") not in ("LORA", "ADALORA"):
        raise InputError(f"{adapter_dir}/adapter_config.json: peft_type is "
                         f"{config.get('peft_type')!r}; expected a LoRA or AdaLoRA adapter")
    for key, neutral in UNSUPPORTED.items():
        if config.get(key, neutral) not in (neutral, None, {}, [], False):
            raise InputError(f"{adapter_dir}/adapter_config.json: {key} = {config[key]!r}; its "
                             f"update is not computed here (expected {neutral!r})")


def split_adapter_key(key: str, adapter_dir: Path) -> tuple[str, str]:
    """'base_model.model.<module>.lora_A.weight' -> ('<module>', 'A'); AdaLoRA's
    '<module>.lora_A' -> ('<module>', 'A') and its '<module>.lora_E' -> ('<module>', 'E')."""
    parts = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "magnitude",
             ".lora_A": "A", ".lora_B": "B", ".lora_E": "E"}
    for suffix, part in parts.items():
        if key.startswith(PREFIX) and key.endswith(suffix):
            return key[len(PREFIX):-len(suffix)], part
    raise InputError(f"{adapter_dir}/adapter_model.safetensors: tensor {key!r} is not a LoRA "
                     f"A, B or DoRA magnitude of a linear layer; expected one")


def scaling(config: dict, rank: int) -> float:
    """PEFT's LoRA scaling of a layer of this rank: lora_alpha / rank, / √rank with rsLoRA."""
    return config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)


def update(module: str, parts: dict, config: dict, adapter_dir: Path) -> Update:
    if "A" not in parts or "B" not in parts:
        raise InputError(f"{adapter_dir}: layer {module} lacks lora_A or lora_B")
    if config.get("peft_type") == "ADALORA":
        if "E" not in parts:
            raise InputError(f"{adapter_dir}: AdaLoRA layer {module} lacks lora_E")
        # PEFT's get_delta_weight: B @ (A * E) · lora_alpha / (ranknum + 1e-5)
        return Update(parts["A"] * parts["E"], parts["B"],
                      config["lora_alpha"] / (config["init_r"] + 1e-5),
                      bool(config.get("fan_in_fan_out")))
    rank = parts["A"].shape[0]  # rank_pattern may give each layer its own r
    return Update(parts["A"], parts["B"], scaling(config, rank),
                  bool(config.get("fan_in_fan_out")), parts.get("magnitude"))
