"""Quantizing the base by the configured method (methods/: bitsandbytes NF4/FP4 and LLM.int8,
HQQ 1-8 bits), saved as a checkpoint that later stages load without quantizing again, and
measured. Every loader of a model (quantized or full precision) is here, so that "full
precision" means one thing."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..core.files import read_json
from ..core.policy import Policy
from . import methods, numerics, tokenizer_files
from .methods.common import replace_module

log = logging.getLogger(__name__)


def quantize(base_dir: str | Path, cfg: dict, policy: Policy):
    """The base quantized in memory by the configured method (methods/); the caller runs and
    records numerics.check."""
    log.info("quantizing %s: %s", base_dir, methods.of(cfg["method"]).describe(cfg))
    return methods.of(cfg["method"]).quantize(base_dir, cfg, policy)


def method_of(model):
    """The methods/ module of a quantized model (of its first quantized layer)."""
    found = methods.layers(model)
    if not found:
        raise ValueError(f"{type(model).__name__}: no quantized linear layer")
    return methods.of_layer(found[0][1])


def save(model, base_dir: Path, out_dir: Path) -> None:
    """The quantized checkpoint with the base's tokenizer and generation files beside it."""
    method_of(model).save(model, out_dir)
    tokenizer_files.copy(base_dir, out_dir)


def saved_compute_dtype(model) -> torch.dtype:
    """The compute dtype a loaded quantized model computes its quantized layers in."""
    return method_of(model).compute_dtype(model)


def load_quantized(path: str | Path, policy: Policy):
    """The saved quantized checkpoint, loaded as is (its config.json names the method), on the
    single numerics path and checked: every job that loads it computes the configured math."""
    model = methods.of_checkpoint(path).load(path, policy)
    numerics.check(model, saved_compute_dtype(model))
    return model


def dequantized(model):
    """The model with each quantized layer replaced by an nn.Linear of deq(Q(W)) in the compute
    dtype: the weights a QLoRA adapter was trained against, as a plain model."""
    if getattr(model, "hf_quantizer", None) is not None:  # bitsandbytes: transformers' own
        return model.dequantize()
    dtype = saved_compute_dtype(model)
    for name, module in methods.layers(model):
        weight = methods.of_layer(module).dequantized(module).to(dtype)
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None,
                                 device=weight.device, dtype=dtype)
        linear.weight.data = weight
        if module.bias is not None:
            linear.bias.data = module.bias.data.to(dtype)
        replace_module(model, name, linear)
    return model


def load_full_precision(path: str | Path, policy: Policy, offload: bool = False):
    """A full-precision model (the base, a merged one) for training, merging, perplexity and
    scoring, in the policy's one full-precision dtype. `offload` (no training): on a GPU it
    does not fit, the layers that do not are kept in RAM (memory.full_precision_placement)."""
    from transformers import AutoModelForCausalLM

    from ..core import memory

    placement = memory.full_precision_placement(path, policy) if offload \
        else {"device_map": policy.device}
    return AutoModelForCausalLM.from_pretrained(path, dtype=policy.full_precision_dtype,
                                                **placement)


def layer_errors(model, base_state) -> list[dict]:
    """Per quantized layer: shape, stored bits/param, the method's formula and
    ‖W − deq(Q(W))‖ / ‖W‖. `base_state`: the full-precision tensors by name, anything with
    .get(name): a dict, or a checkpoint.Checkpoint that reads one tensor at a time (memory
    holds one layer)."""
    rows = []
    for name, module in methods.layers(model):
        method = methods.of_layer(module)
        original = base_state.get(f"{name}.weight").float()
        restored = method.dequantized(module).float().cpu()
        rows.append({
            "layer": name,
            "shape": list(original.shape),
            "params": original.numel(),
            # the layer encodes the base weight's parameters (the subtraction below needs it)
            "bits_per_param": round(8 * method.stored_bytes(module) / original.numel(), 4),
            "relative_error": float((original - restored).norm() / original.norm()),
        })
    return rows


def stored_bits(quantized_dir) -> float:
    """Bits per quantized weight the quantize stage measured (its quantization.json)."""
    return read_json(f"{quantized_dir}/quantization.json")["summary"]["bits_per_param_measured"]


def model_bytes(model) -> int:
    """What the quantized model holds: each quantized layer's stored bytes, every other
    parameter and buffer once (a tied head is the embedding)."""
    quantized = methods.layers(model)
    inside = {id(t) for _, m in quantized for t in [*m.parameters(), *m.buffers()]}
    others = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in inside}
    return sum(methods.of_layer(m).stored_bytes(m) for _, m in quantized) + \
        sum(t.numel() * t.element_size() for t in others.values())


def checkpoint_bytes(model_dir) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def summarize(rows: list[dict], cfg: dict, compute_dtype: torch.dtype, quantized_bytes: int,
              full_precision_bytes: int) -> dict:
    method = methods.of(cfg["method"])
    params = sum(r["params"] for r in rows)
    errors = [r["relative_error"] for r in rows]
    # The method's formula (docs/quantization.md), averaged over the layers by parameters.
    meta_bits = torch.finfo(compute_dtype).bits  # HQQ's per-group scales: the compute dtype
    theory = sum(method.theoretical_bits(cfg, in_features=r["shape"][1], meta_bits=meta_bits)
                 * r["params"] for r in rows)
    return {
        "method": cfg["method"],
        "scheme": method.describe(cfg),
        **{k: cfg[k] for k in ("double_quant", "bits", "group_size") if k in cfg},
        "compute_dtype": str(compute_dtype).replace("torch.", ""),
        "quantized_layers": len(rows),
        "quantized_params": params,
        "bits_per_param_measured": round(sum(r["bits_per_param"] * r["params"] for r in rows)
                                         / max(params, 1), 4),
        "bits_per_param_theoretical": round(theory / max(params, 1), 4),
        "size_bytes_full_precision": full_precision_bytes,
        "size_bytes_quantized": quantized_bytes,
        "relative_error_mean": float(sum(errors) / max(len(errors), 1)),
        "relative_error_max": float(max(errors, default=0.0)),
    }
