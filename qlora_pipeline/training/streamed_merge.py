"""Merging a LoRA adapter into a saved base one tensor at a time.

PEFT's `merge_and_unload` needs the whole base in memory, and with a 4-bit base the whole
dequantized model: more RAM than training needed, which is how large merges run out of memory.
Here the base's safetensors shards are read one tensor at a time, each adapted weight is
dequantized (if 4-bit) and merged with its adapter exactly as PEFT's merge computes it, and the
result is written in output shards of at most `max_shard_bytes`. Peak memory is about one output
shard plus the adapter, whatever the model's size. Hand-written because neither PEFT nor transformers streams a merge (Axolotl's merge
streams the same way); tests/test_merge.py checks it against PEFT's merge tensor by tensor.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError

log = logging.getLogger(__name__)

PREFIX = "base_model.model."
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# The parts bitsandbytes saves beside a 4-bit weight `<name>.weight`.
QUANT_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                  ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")
# adapter_config.json settings whose merge this module does not compute: refused, not ignored.
UNSUPPORTED = {"lora_bias": False, "alpha_pattern": {}, "modules_to_save": None,
               "layer_replication": None, "trainable_token_indices": None,
               "target_parameters": None, "use_qalora": False, "use_bdlora": None}
DEFAULT_SHARD_BYTES = 2 * 1024 ** 3


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
        factor = self.magnitude.float() / torch.linalg.norm(rows, dim=1)
        factor = factor.view(-1, 1)
        return (factor.T if self.fan_in_fan_out else factor) * merged


def read_adapter(adapter_dir: Path) -> dict[str, Update]:
    """Every adapted layer of a saved PEFT LoRA adapter, keyed by the base weight it changes."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    check_supported(config, adapter_dir)
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    layers: dict[str, dict] = {}
    for key, tensor in tensors.items():
        module, part = split_adapter_key(key, adapter_dir)
        layers.setdefault(module, {})[part] = tensor
    return {f"{module}.weight": update(module, parts, config, adapter_dir)
            for module, parts in layers.items()}


def check_supported(config: dict, adapter_dir: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise InputError(f"{adapter_dir}/adapter_config.json: peft_type is "
                         f"{config.get('peft_type')!r}; the streamed merge handles LORA only")
    for key, neutral in UNSUPPORTED.items():
        if config.get(key, neutral) not in (neutral, None, {}, [], False):
            raise InputError(f"{adapter_dir}/adapter_config.json: {key} = {config[key]!r}; the "
                             f"streamed merge does not compute it (expected {neutral!r})")


def split_adapter_key(key: str, adapter_dir: Path) -> tuple[str, str]:
    """'base_model.model.<module>.lora_A.weight' -> ('<module>', 'A')."""
    parts = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "magnitude"}
    for suffix, part in parts.items():
        if key.startswith(PREFIX) and key.endswith(suffix):
            return key[len(PREFIX):-len(suffix)], part
    raise InputError(f"{adapter_dir}/adapter_model.safetensors: tensor {key!r} is not a LoRA "
                     f"A, B or DoRA magnitude of a linear layer; the streamed merge cannot use it")


def update(module: str, parts: dict, config: dict, adapter_dir: Path) -> Update:
    if "A" not in parts or "B" not in parts:
        raise InputError(f"{adapter_dir}: layer {module} lacks lora_A or lora_B")
    rank = parts["A"].shape[0]  # rank_pattern may give each layer its own r
    alpha = config["lora_alpha"]
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return Update(parts["A"], parts["B"], scaling, bool(config.get("fan_in_fan_out")),
                  parts.get("magnitude"))


class Checkpoint:
    """A safetensors checkpoint (one file or indexed shards), read one tensor at a time."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        index = self.dir / INDEX
        if index.exists():
            self.weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        elif (self.dir / SINGLE).exists():
            from safetensors import safe_open

            with safe_open(self.dir / SINGLE, "pt") as handle:
                self.weight_map = dict.fromkeys(handle.keys(), SINGLE)
        else:
            raise InputError(f"{self.dir}: no {SINGLE} or {INDEX}; expected a safetensors "
                             f"checkpoint (save_pretrained with safe_serialization)")

    def ordered_keys(self) -> list[str]:
        """Every key, shard after shard (the files are read in order)."""
        order = {shard: i for i, shard in enumerate(dict.fromkeys(self.weight_map.values()))}
        return sorted(self.weight_map, key=lambda key: order[self.weight_map[key]])

    def get(self, key: str) -> torch.Tensor:
        """One tensor, copied out of its file. A tensor from safe_open is a view of the mapped
        file and keeps the mapping (and every page of it read so far) resident: copied and
        closed, memory holds only what the merge keeps, the pending output shard."""
        from safetensors import safe_open

        with safe_open(self.dir / self.weight_map[key], "pt") as handle:
            return handle.get_tensor(key).clone()


def is_quant_part(key: str) -> bool:
    return key.endswith(QUANT_SUFFIXES)


def dequantize(key: str, get, weight_map: dict) -> torch.Tensor | None:
    """The full-precision value of a 4-bit weight `key` (bitsandbytes NF4/FP4), or None when it
    is stored unquantized. The one place a quantization method's storage is read; another
    method plugs in here."""
    state_keys = [key + suffix for suffix in QUANT_SUFFIXES if key + suffix in weight_map]
    if not state_keys:
        return None
    from bitsandbytes.functional import QuantState, dequantize_4bit

    state = QuantState.from_dict({k[len(key) + 1:]: get(k) for k in state_keys},
                                 device=torch.device("cpu"))
    return dequantize_4bit(get(key), state)


class ShardWriter:
    """Output shards of at most `max_bytes` each, named and indexed as save_pretrained does."""

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out, self.max_bytes = Path(out_dir), max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        name = f"part-{len(self.written) + 1:05d}.safetensors"
        save_file(self.pending, self.out / name, metadata={"format": "pt"})
        self.written.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        if self.pending or not self.written:
            self.flush()
        if len(self.written) == 1:
            (self.out / self.written[0][0]).rename(self.out / SINGLE)
            return [SINGLE]
        count, weight_map, names = len(self.written), {}, []
        for i, (name, keys) in enumerate(self.written, start=1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            (self.out / name).rename(self.out / final)
            weight_map.update(dict.fromkeys(keys, final))
            names.append(final)
        (self.out / INDEX).write_text(json.dumps(
            {"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2),
            encoding="utf-8")
        return names


def merge(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: torch.dtype,
          max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Write base + adapter merged into `out_dir` (weights, config without quantization,
    generation config), every floating tensor in `dtype`. Returns what was merged."""
    updates = read_adapter(adapter_dir)
    checkpoint = Checkpoint(base_dir)
    missing = sorted(set(updates) - set(checkpoint.weight_map))
    if missing:
        raise InputError(f"{adapter_dir}: adapts {missing[:3]} which {base_dir} does not store "
                         f"(a tied or renamed weight?); expected weights among its checkpoint")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer, merged, dequantized = ShardWriter(out_dir, max_shard_bytes), 0, 0
    for key in checkpoint.ordered_keys():
        if is_quant_part(key):
            continue
        tensor = dequantize(key, checkpoint.get, checkpoint.weight_map)
        dequantized += tensor is not None
        tensor = checkpoint.get(key) if tensor is None else tensor
        if key in updates:
            tensor = checked(key, updates[key].apply(tensor))
            merged += 1
        writer.add(key, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    shards = writer.close()
    write_config(Path(base_dir), out_dir, dtype)
    log.info("streamed merge: %d layers merged, %d dequantized, %d shard(s), %.1f MB",
             merged, dequantized, len(shards), writer.total / 1e6)
    return {"merged_layers": merged, "dequantized_layers": dequantized, "shards": len(shards),
            "bytes": writer.total, "max_shard_bytes": max_shard_bytes}


def checked(key: str, tensor: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(tensor).all():
        raise ValueError(f"merging the adapter into {key} gives non-finite weights; the "
                         f"adapter is broken")
    return tensor


def write_config(base_dir: Path, out_dir: Path, dtype: torch.dtype) -> None:
    """The base's config as a plain full-precision model's, and its generation config."""
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    if (base_dir / "generation_config.json").exists():
        shutil.copy2(base_dir / "generation_config.json", out_dir / "generation_config.json")
