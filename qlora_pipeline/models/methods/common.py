"""What the methods share: loading the base (transformers' quantize-at-load), tensor sizes,
and the rounding of the same math in a dtype (each method's numerics.check bound starts
from it)."""

from __future__ import annotations

from ...core.policy import Policy


def from_pretrained(base_dir, policy: Policy, device_map=None, quantization_config=None):
    """The base as a method starts from: as stored on a GPU, in float32 on a CPU, on the policy's
    device unless `device_map` says; with a quantization_config, quantized while transformers
    loads it (bitsandbytes' methods)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=quantization_config, device_map=device_map or policy.device,
        dtype="auto" if policy.cuda else torch.float32)


def as_loaded(weight, policy: Policy):
    """A full-precision weight as `from_pretrained` would hold it before quantizing: on the
    policy's device, float32 on a CPU, as stored on a GPU."""
    import torch

    return weight.to(policy.device, weight.dtype if policy.cuda else torch.float32)


# The interface's defaults for a method whose checkpoint transformers saves and loads itself
# (bitsandbytes'): a module re-exports those it shares (`from .common import save as save`).
def save(model, out_dir) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)


def load(path, policy: Policy):
    """The checkpoint as stored: config.json's quantization_config quantizes it as it loads."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, device_map=policy.device)


def weight_key(key: str) -> str | None:
    return None  # a quantized weight keeps its model key


def replace_module(model, name: str, layer) -> None:
    """Put `layer` where the submodule `name` is."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, layer)


def nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size() if tensor is not None else 0


# numerics.check's bound for x @ deq(W)^T in the compute dtype, summed in another order: the
# relative error ‖y − y_ref‖ / ‖y_ref‖ of the same math. The packed bf16 kernel under a float32
# compute dtype is off by ~3e-3, so float32's bound catches it; a missing gradient reads 1.
ROUNDING = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
