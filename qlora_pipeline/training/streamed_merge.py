"""Merging a LoRA adapter into a saved base one tensor at a time.

PEFT's `merge_and_unload` needs the whole base in memory, and with a 4-bit base the whole
dequantized model: more RAM than training needed, which is how large merges run out of memory.
Here the base's safetensors shards are read one tensor at a time, each adapted weight is
dequantized (if quantized) and merged with its adapter exactly as PEFT's merge computes it, and the
result is written in output shards of at most `max_shard_bytes`. Peak memory is about one output
shard plus the adapter, whatever the model's size. Hand-written because neither PEFT nor transformers streams a merge (Axolotl's merge
streams the same way); tests/test_merge.py checks it against PEFT's merge tensor by tensor.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from ..models.adapter_file import read_against
from ..models.checkpoint import INDEX, SINGLE
from ..models.methods import stored_weight

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 2 * 1024 ** 3


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

    def close(self) -> int:
        """The shards renamed as save_pretrained names them (with an index if several); their
        count."""
        if self.pending or not self.written:
            self.flush()
        count, weight_map = len(self.written), {}
        for i, (name, keys) in enumerate(self.written, start=1):
            final = SINGLE if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
            (self.out / name).rename(self.out / final)
            weight_map.update(dict.fromkeys(keys, final))
        if count > 1:  # a single file needs no index
            (self.out / INDEX).write_text(json.dumps(
                {"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2),
                encoding="utf-8")
        return count


def merge(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: torch.dtype,
          max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Write base + adapter merged into `out_dir` (weights, config without quantization,
    generation config), every floating tensor in `dtype`. Returns what was merged."""
    updates, checkpoint = read_against(adapter_dir, base_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer, merged, dequantized = ShardWriter(out_dir, max_shard_bytes), 0, 0
    for key in checkpoint.ordered_keys():
        # Each method reads its own storage (methods/*.stored_weight); None: stored unquantized.
        tensor = stored_weight(key, checkpoint.get, checkpoint.weight_map)
        dequantized += tensor is not None
        tensor = checkpoint.get(key) if tensor is None else tensor
        if key in updates:
            tensor = updates[key].apply(tensor)
            if not torch.isfinite(tensor).all():
                raise ValueError(f"merging the adapter into {key} gives non-finite weights; the "
                                 f"adapter is broken")
            merged += 1
        writer.add(key, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    shards = writer.close()
    write_config(Path(base_dir), out_dir, dtype)
    log.info("streamed merge: %d layers merged, %d dequantized, %d shard(s), %.1f MB",
             merged, dequantized, shards, writer.total / 1e6)
    return {"merged_layers": merged, "dequantized_layers": dequantized, "shards": shards,
            "bytes": writer.total, "max_shard_bytes": max_shard_bytes}


def write_config(base_dir: Path, out_dir: Path, dtype: torch.dtype) -> None:
    """The base's config as a plain full-precision model's, and its generation config."""
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    if (base_dir / "generation_config.json").exists():
        shutil.copy2(base_dir / "generation_config.json", out_dir / "generation_config.json")
