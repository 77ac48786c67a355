"""What the methods share: transformers' quantize-at-load, and tensor sizes."""

from __future__ import annotations

import torch

from ...policy import Policy


def from_pretrained_quantized(base_dir, quantization_config, policy: Policy):
    """The base quantized while transformers loads it (bitsandbytes' methods)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=quantization_config, device_map=policy.device,
        dtype="auto" if policy.cuda else torch.float32)


def nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size() if tensor is not None else 0
