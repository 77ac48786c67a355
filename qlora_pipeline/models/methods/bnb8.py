"""bitsandbytes 8-bit (LLM.int8, Dettmers et al. 2022), through transformers.

Stored per weight: one int8 code, and per output row one fp32 absmax (`SCB`): 8 + 32/n_in
bits. The matmul quantizes each input row to int8 as well and keeps input columns with
outliers (|x| > threshold 6) in 16 bits, so a layer computes x @ deq(W)^T only up to that
rounding: TOLERANCE is looser than 4-bit's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...core.policy import Policy
from .common import as_loaded, from_pretrained, nbytes
from .common import load as load, save as save, weight_key as weight_key

if TYPE_CHECKING:  # annotations only: torch is imported inside the functions
    import torch

NAMES = ("int8",)  # quantization.method
KEYS: dict = {}  # no keys of its own
THEORY = "8 bits per weight plus one fp32 scale per output row of n_in weights (8 + 32/n_in)"
BITS = 8
SUFFIXES = (".SCB", ".weight_format")
# Measured on random inputs (numerics.check): relative gap up to 9e-3 in eval mode on
# SmolLM2-135M's layers (int8 rounding of the input rows), 1e-7 in train mode; a missing
# gradient reads 1, wrong weights 1e-1 or more.
TOLERANCE = {"float32": 2e-2, "bfloat16": 3e-2, "float16": 2e-2}


def layer_class():
    import bitsandbytes as bnb

    return bnb.nn.Linear8bitLt


# What config.json's quantization_config holds when this method wrote it.
WROTE = {"quant_method": "bitsandbytes", "load_in_8bit": True}


def quantize(base_dir, cfg: dict, policy: Policy):
    from transformers import BitsAndBytesConfig

    return from_pretrained(base_dir, policy, quantization_config=BitsAndBytesConfig(
        load_in_8bit=True, llm_int8_skip_modules=cfg["skip_modules"] or None))


def quantize_tensor(weight, cfg: dict, policy: Policy) -> torch.Tensor:
    """deq(Q(W)) of one weight, as Int8Params quantizes it: in float16, row-wise absmax."""
    import torch
    from bitsandbytes.functional import int8_vectorwise_dequant, int8_vectorwise_quant

    codes, scales, _ = int8_vectorwise_quant(as_loaded(weight, policy).to(torch.float16))
    return int8_vectorwise_dequant(codes, scales)


def compute_dtype(model) -> torch.dtype:
    """The dtype of the layers' inputs and outputs: the model's (the int8 matmul is internal)."""
    return model.dtype


def _scales(module) -> torch.Tensor:
    """The row scales: on the weight until the first forward moves them to the layer's state."""
    return module.weight.SCB if module.weight.SCB is not None else module.state.SCB


def dequantized(module) -> torch.Tensor:
    from bitsandbytes.functional import int8_vectorwise_dequant

    return int8_vectorwise_dequant(module.weight.data, _scales(module))


def stored_bytes(module) -> int:
    return nbytes(module.weight.data) + nbytes(_scales(module)) + 1  # + weight_format byte


def theoretical_bits(cfg: dict, in_features: int | None = None, meta_bits: int = 32) -> float:
    """8 + 32/n_in: an fp32 scale per output row of n_in weights."""
    return BITS + (32 / in_features if in_features else 0.0)


def stored_weight(key: str, get, weight_map: dict) -> torch.Tensor | None:
    scb = key.removesuffix(".weight") + ".SCB"
    if not key.endswith(".weight") or scb not in weight_map:
        return None
    return get(key).float() * (get(scb).float()[:, None] / 127)


def is_stored_part(key: str, weight_map: dict) -> bool:
    return key.endswith(SUFFIXES)


def label(cfg: dict) -> str:
    return "int8"


def describe(cfg: dict) -> str:
    return "LLM.int8 (bitsandbytes 8-bit)"
