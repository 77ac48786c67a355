"""Quantizing the base: bitsandbytes 4-bit (NF4/FP4, optional double quantization), saved as a
checkpoint that later stages load without quantizing again, and measured. Every loader of a
model (quantized or full precision) is here, so that "full precision" means one thing."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import torch

from ..policy import Policy, torch_dtype
from . import numerics

log = logging.getLogger(__name__)
BLOCKSIZE = 64  # transformers' 4-bit blocksize (not configurable there)
BITS = 4  # NF4 and FP4 alike: one 4-bit code per weight


def bnb_config(cfg: dict, policy: Policy):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg["quant_type"],
        bnb_4bit_use_double_quant=cfg["double_quant"],
        bnb_4bit_compute_dtype=policy.compute_dtype(cfg["compute_dtype"]),
        llm_int8_skip_modules=cfg["skip_modules"] or None,
        bnb_4bit_quant_storage=storage_dtype(cfg, policy),
    )


def storage_dtype(cfg: dict, policy: Policy) -> torch.dtype:
    """uint8, or the compute dtype for FSDP (config.quant_storage settles 'auto')."""
    storage = cfg.get("quant_storage", "uint8")
    return torch.uint8 if storage == "uint8" else policy.compute_dtype(cfg["compute_dtype"])


def quantize(base_dir: str | Path, cfg: dict, policy: Policy):
    """The base quantized in memory, on the single numerics path (numerics.py); the caller
    runs and records numerics.check."""
    from transformers import AutoModelForCausalLM

    log.info("quantizing %s: %s, double quant %s", base_dir, cfg["quant_type"], cfg["double_quant"])
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=bnb_config(cfg, policy), device_map=policy.device,
        dtype="auto" if policy.cuda else torch.float32,
    )
    return numerics.single_path(model)


def save(model, base_dir: Path, out_dir: Path) -> None:
    """The quantized checkpoint with the base's tokenizer files beside it."""
    model.save_pretrained(out_dir, safe_serialization=True)
    for path in Path(base_dir).iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(path, out_dir / path.name)


def state_dict(model_dir: Path) -> dict:
    """Every tensor of a safetensors checkpoint (all shards)."""
    from safetensors.torch import load_file

    state = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def saved_compute_dtype(model) -> torch.dtype:
    """The compute dtype a saved 4-bit checkpoint was quantized for."""
    value = model.config.quantization_config.bnb_4bit_compute_dtype
    return torch_dtype(value) if isinstance(value, str) else value


def load_quantized(path: str | Path, policy: Policy):
    """The saved 4-bit checkpoint, loaded as is (its config carries the quantization), on the
    single numerics path and checked: every job that loads it computes the configured math."""
    from transformers import AutoModelForCausalLM

    model = numerics.single_path(AutoModelForCausalLM.from_pretrained(path,
                                                                      device_map=policy.device))
    numerics.check(model, saved_compute_dtype(model))
    return model


def load_full_precision(path: str | Path, policy: Policy, offload: bool = False):
    """A full-precision model (the base, a merged one) for training, merging, perplexity and
    scoring, in the policy's one full-precision dtype. `offload` (no training): on a GPU it
    does not fit, the layers that do not are kept in RAM (memory.full_precision_placement)."""
    from transformers import AutoModelForCausalLM

    from .. import memory

    placement = memory.full_precision_placement(path, policy) if offload \
        else {"device_map": policy.device}
    return AutoModelForCausalLM.from_pretrained(path, dtype=policy.full_precision_dtype,
                                                **placement)


def theoretical_bits(double_quant: bool) -> float:
    """BITS per weight plus the block constants: one fp32 absmax per 64 weights, or with
    double quantization one 8-bit absmax per 64 and one fp32 per 256 of those."""
    if double_quant:
        return BITS + 8 / BLOCKSIZE + 32 / (BLOCKSIZE * 256)
    return BITS + 32 / BLOCKSIZE


def _nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size() if tensor is not None else 0


def storage_bits(weight) -> float:
    """Bits per parameter actually stored for one 4-bit weight, every constant counted."""
    state = weight.quant_state
    total = _nbytes(weight.data) + _nbytes(state.absmax) + _nbytes(state.code)
    if state.nested:
        total += _nbytes(state.state2.absmax) + _nbytes(state.state2.code)
        total += _nbytes(state.offset) if torch.is_tensor(state.offset) else 4
    return 8 * total / math.prod(state.shape)


def layer_errors(model4, base_state) -> list[dict]:
    """Per quantized layer: shape, stored bits/param and ‖W − deq(Q(W))‖ / ‖W‖. `base_state`:
    the full-precision tensors by name, anything with .get(name): a dict, or a
    checkpoint.Checkpoint that reads one tensor at a time (memory holds one layer)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    rows = []
    for name, module in model4.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = module.weight
        original = base_state.get(f"{name}.weight").float()
        restored = F.dequantize_4bit(weight.data, weight.quant_state).float().cpu()
        rows.append({
            "layer": name,
            "shape": list(original.shape),
            "params": original.numel(),
            "bits_per_param": round(storage_bits(weight), 4),
            "relative_error": float((original - restored).norm() / original.norm()),
        })
    return rows


def summarize(rows: list[dict], cfg: dict, compute_dtype: torch.dtype, checkpoint_dir: Path,
              base_dir: Path) -> dict:
    params = sum(r["params"] for r in rows)
    errors = [r["relative_error"] for r in rows]
    size = lambda d: sum(p.stat().st_size for p in Path(d).glob("*.safetensors"))
    return {
        "quant_type": cfg["quant_type"],
        "double_quant": cfg["double_quant"],
        "bits": BITS,
        "compute_dtype": str(compute_dtype).replace("torch.", ""),
        "quantized_layers": len(rows),
        "quantized_params": params,
        "bits_per_param_measured": round(sum(r["bits_per_param"] * r["params"] for r in rows)
                                         / max(params, 1), 4),
        "bits_per_param_theoretical": round(theoretical_bits(cfg["double_quant"]), 4),
        "size_bytes_full_precision": size(base_dir),
        "size_bytes_quantized": size(checkpoint_dir),
        "relative_error_mean": float(sum(errors) / max(len(errors), 1)),
        "relative_error_max": float(max(errors, default=0.0)),
    }
