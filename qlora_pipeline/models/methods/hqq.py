"""HQQ (half-quadratic quantization, Badri & Shaji 2023; the `hqq` package): 1-8 bits per
weight in groups, with a scale and a zero point per group, found without calibration data.

Stored per weight: `bits` packed as hqq packs them (8, 4, 2, 1 bits in uint8; 3 bits ten to an
int32, so 3.2), and per group of `group_size` a scale and a zero in the compute dtype:
PACKED[bits] + 2·16/group_size with bf16, + 2·32/group_size with float32 (the CPU's).

Hand-written save and load (why): transformers 5.24 raises NotImplementedError when asked to
quantize with HqqConfig, and hqq's own saver pickles the model's config and weights
(`qmodel.pt`). Here the model is quantized with hqq's HQQLinear, saved as an ordinary
safetensors checkpoint of hqq's own per-layer state dicts, and loaded back into HQQLinear
layers; config.json carries HqqConfig's dictionary, so the folder says what it holds. The
layer computes x @ deq(W)^T on its PyTorch backend (dequantize, then matmul), with autograd.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ...core.errors import InputError
from ...core.policy import Policy, torch_dtype
from .common import ROUNDING, as_loaded, from_pretrained, nbytes, replace_module

if TYPE_CHECKING:  # annotations only: torch is imported inside the functions
    import torch

NAMES = ("hqq",)  # quantization.method
KEYS = {"bits": 4, "group_size": 64}  # its own keys, with their defaults
THEORY = ("the bits packed as hqq packs them (3 bits: ten to an int32, 3.2) plus a scale and a "
          "zero per group in the compute dtype (+ 2·32/group_size in float32, 2·16/group_size "
          "in bf16)")

PACKED = {8: 8.0, 4: 4.0, 3: 32 / 10, 2: 2.0, 1: 1.0}
TOLERANCE = ROUNDING  # x @ deq(W)^T: dequantize, then matmul


def layer_class():
    """HQQLinear, or None where hqq is not installed."""
    try:
        from hqq.core.quantize import HQQLinear
    except ImportError:
        return None
    return HQQLinear


WROTE = {"quant_method": "hqq"}  # what config.json's quantization_config holds


def label(cfg: dict) -> str:
    """hqq3-g64: bits and group size."""
    return f"hqq{cfg['bits']}-g{cfg['group_size']}"


def quantize(base_dir, cfg: dict, policy: Policy):
    """Every nn.Linear but skip_modules (and a tied output head) replaced by an HQQLinear built
    from its weight, one layer at a time, on the job's device."""
    import torch
    from hqq.core.quantize import HQQLinear

    dtype = policy.compute_dtype(cfg["compute_dtype"])
    model = from_pretrained(base_dir, policy, device_map="cpu")
    settings = _settings(cfg, dtype)
    head = model.get_output_embeddings()
    # skip_modules by bitsandbytes' rule (llm_int8_skip_modules): a module is skipped whose
    # name, or a part of its name, is an entry.
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is torch.nn.Linear and module is not head
               and not any(part in cfg["skip_modules"] for part in [name, *name.split(".")])]
    uneven = [name for name, module in targets if module.weight.numel() % cfg["group_size"]]
    if uneven:
        raise InputError(f"quantization.group_size: found {cfg['group_size']}, which does not "
                         f"divide the weights of {uneven[:3]}; expected a divisor of every "
                         f"quantized layer's size (64 or 128 usually)")
    for name, module in targets:
        replace_module(model, name, HQQLinear(module, settings["quant_config"],
                                              compute_dtype=dtype, device=policy.device))
    return _finish(model.to(policy.device), settings)  # HQQLinear.to is a no-op


def _settings(cfg: dict, dtype) -> dict:
    """What config.json records: HqqConfig's dictionary (quant_method, quant_config,
    skip_modules) and the compute dtype the layers were built for."""
    from hqq.core.quantize import BaseQuantizeConfig

    return {"quant_method": "hqq", "skip_modules": list(cfg["skip_modules"]),
            "quant_config": BaseQuantizeConfig(nbits=cfg["bits"], group_size=cfg["group_size"],
                                               axis=1),
            "compute_dtype": str(dtype).removeprefix("torch.")}


def quantize_tensor(weight, cfg: dict, policy: Policy) -> torch.Tensor:
    """deq(Q(W)) of one weight: an HQQLinear built from it as `quantize` builds each layer."""
    import torch
    from hqq.core.quantize import HQQLinear

    dtype = policy.compute_dtype(cfg["compute_dtype"])
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = torch.nn.Parameter(as_loaded(weight, policy).cpu(), requires_grad=False)
    return HQQLinear(linear, _settings(cfg, dtype)["quant_config"], compute_dtype=dtype,
                     device=policy.device).dequantize()


def _finish(model, settings: dict):
    model.hqq_quantized = True  # what PEFT's prepare_model_for_kbit_training reads
    model.quantization_settings = settings
    return model


def save(model, out_dir) -> None:
    """One safetensors file of the model's own state dict (a tied tensor once, under its first
    name; no renaming, so `load` needs none), config.json with the settings."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    model.config.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if tensor.untyped_storage().data_ptr() in seen and tensor.is_floating_point():
            continue  # tied to a tensor already written (the output head to the embedding)
        seen.add(tensor.untyped_storage().data_ptr())
        state[key] = tensor.detach().contiguous().cpu()
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    path = out_dir / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["quantization_config"] = model.quantization_settings
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def load(path, policy: Policy):
    """The saved checkpoint: the architecture built without weights, each quantized layer an
    HQQLinear filled from its stored state, every other tensor assigned as stored."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    settings = config.quantization_config
    del config.quantization_config  # transformers would quantize again
    dtype = torch_dtype(settings["compute_dtype"])
    state = load_file(Path(path) / "model.safetensors")  # hqq's save writes one file
    with init_empty_weights():  # parameters on the meta device, buffers (rotary) real
        model = AutoModelForCausalLM.from_config(config)
    for key in state:
        if key.endswith(".W_q"):
            replace_module(model, key.removesuffix(".W_q"), _unfilled(dtype, policy.device))
    missing = model.load_state_dict(state, strict=False, assign=True).missing_keys
    model.tie_weights()
    missing = [k for k in missing if k.endswith(".weight") and
               model.get_parameter(k).is_meta]
    if missing:
        raise ValueError(f"{path}: the checkpoint stores no {missing[:3]}; expected every "
                         f"weight of {config.architectures}")
    return _finish(model.to(policy.device), settings)


def compute_dtype(model) -> torch.dtype:
    return torch_dtype(model.quantization_settings["compute_dtype"])


def dequantized(module) -> torch.Tensor:
    return module.dequantize()


def stored_bytes(module) -> int:
    """The packed weights and every per-group tensor (scale, zero)."""
    import torch

    return nbytes(module.W_q) + sum(nbytes(v) for v in module.meta.values() if torch.is_tensor(v))


def theoretical_bits(cfg: dict, in_features: int | None = None, meta_bits: int = 32) -> float:
    """PACKED[bits] + 2·b/group_size: a scale and a zero of b bits (the compute dtype's) each."""
    return PACKED[cfg["bits"]] + 2 * meta_bits / cfg["group_size"]


def _unfilled(dtype, device):
    """An HQQLinear without weights, to be filled from a stored state."""
    from hqq.core.quantize import HQQLinear

    return HQQLinear(None, None, compute_dtype=dtype, device=device, initialize=False)


@functools.cache
def _state_keys() -> frozenset[str]:
    return frozenset(layer_class().state_dict_keys(None) - {"bias"})


def stored_weight(key: str, get, weight_map: dict) -> torch.Tensor | None:
    prefix = key.removesuffix(".weight")
    if not key.endswith(".weight") or f"{prefix}.W_q" not in weight_map:
        return None
    import torch

    layer = _unfilled(torch.float32, "cpu")
    layer.load_state_dict({k: get(f"{prefix}.{k}") for k in _state_keys()
                           if f"{prefix}.{k}" in weight_map})
    return layer.dequantize().float()


def is_stored_part(key: str, weight_map: dict) -> bool:
    prefix, _, leaf = key.rpartition(".")
    return f"{prefix}.W_q" in weight_map and leaf in _state_keys() if layer_class() else False


def weight_key(key: str) -> str | None:
    return key.removesuffix(".W_q") + ".weight" if key.endswith(".W_q") else None


def describe(cfg: dict) -> str:
    return f"HQQ {cfg['bits']}-bit, group size {cfg['group_size']}"
