"""A saved safetensors checkpoint (one file or indexed shards) read one tensor at a time, and
the full-precision value of a stored quantized weight (any method: methods/): what the
streamed merge and the adapter analysis read a base through, so that memory never holds more
than one layer of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.errors import InputError
from ..core.memory import safetensors_header
from .methods import logical_keys, stored_weight

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Checkpoint:
    """A safetensors checkpoint (one file or indexed shards), read one tensor at a time."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        index = self.dir / INDEX
        if index.exists():
            self.weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        elif (self.dir / SINGLE).exists():
            # Its keys sorted, as safetensors' safe_open(...).keys() gives them.
            self.weight_map = dict.fromkeys(sorted(safetensors_header(self.dir / SINGLE)), SINGLE)
        else:
            raise InputError(f"{self.dir}: no {SINGLE} or {INDEX}; expected a safetensors "
                             f"checkpoint (save_pretrained with safe_serialization)")

    def ordered_keys(self) -> list[str]:
        """The model's keys, shard after shard (the files are read in order): a quantized
        weight once, as `<layer>.weight`, whatever its method stores for it."""
        order = {shard: i for i, shard in enumerate(dict.fromkeys(self.weight_map.values()))}
        stored = sorted(self.weight_map, key=lambda key: order[self.weight_map[key]])
        return logical_keys(stored, self.weight_map)

    def get(self, key: str) -> torch.Tensor:
        """One tensor, copied out of its file. A tensor from safe_open is a view of the mapped
        file and keeps the mapping (and every page of it read so far) resident: copied and
        closed, memory holds only what the merge keeps, the pending output shard."""
        from safetensors import safe_open

        with safe_open(self.dir / self.weight_map[key], "pt") as handle:
            return handle.get_tensor(key).clone()

    def weight(self, key: str) -> torch.Tensor:
        """`key`'s full-precision value: dequantized if stored quantized, else as stored."""
        value = stored_weight(key, self.get, self.weight_map)
        return self.get(key) if value is None else value
