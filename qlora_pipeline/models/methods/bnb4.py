"""bitsandbytes 4-bit (NF4 or FP4, optional double quantization), through transformers.

Stored per weight: one 4-bit code, and per block of 64 one fp32 absmax, or with double
quantization one 8-bit absmax per 64 and one fp32 scale (and offset) per 256 blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...core.errors import NumericsError
from ...core.policy import Policy, torch_dtype
from .common import ROUNDING, as_loaded, from_pretrained, nbytes
from .common import save as save, weight_key as weight_key
from .common import load as load_as_stored

if TYPE_CHECKING:  # annotations only: torch is imported inside the functions
    import torch

NAMES = ("nf4", "fp4")  # quantization.method
KEYS = {"double_quant": True, "quant_storage": "auto"}  # its own keys, with their defaults
THEORY = ("4 bits per weight plus one fp32 absmax per 64 weights (4.5 bits); double "
          "quantization stores that absmax in 8 bits with one fp32 per 256 blocks (≈4.127 bits)")

BLOCKSIZE = 64  # transformers' 4-bit blocksize (not configurable there)
BITS = 4
# The parts bitsandbytes saves beside a 4-bit weight `<name>.weight`.
SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
            ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")
TOLERANCE = ROUNDING  # x @ deq(W)^T, summed in another order


def layer_class():
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit


# What config.json's quantization_config holds when this method wrote it.
WROTE = {"quant_method": "bitsandbytes", "load_in_4bit": True}


def label(cfg: dict) -> str:
    """nf4, fp4; without double quantization nf4-nodq."""
    return cfg["method"] + ("" if cfg["double_quant"] else "-nodq")


def quantize(base_dir, cfg: dict, policy: Policy):
    """On the single numerics path (single_path); the caller runs numerics.check."""
    import torch
    from transformers import BitsAndBytesConfig

    compute = policy.compute_dtype(cfg["compute_dtype"])
    # uint8, or the compute dtype for FSDP (config.quant_storage settles 'auto')
    storage = torch.uint8 if cfg.get("quant_storage", "uint8") == "uint8" else compute
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg["method"],
        bnb_4bit_use_double_quant=cfg["double_quant"],
        bnb_4bit_compute_dtype=compute,
        llm_int8_skip_modules=cfg["skip_modules"] or None,
        bnb_4bit_quant_storage=storage,
    )
    return single_path(from_pretrained(base_dir, policy, quantization_config=config))


def quantize_tensor(weight, cfg: dict, policy: Policy) -> torch.Tensor:
    """deq(Q(W)) of one weight, as Params4bit quantizes it when transformers loads the base."""
    import bitsandbytes.functional as F

    codes, state = F.quantize_4bit(as_loaded(weight, policy).contiguous(), blocksize=BLOCKSIZE,
                                   compress_statistics=cfg["double_quant"],
                                   quant_type=cfg["method"])
    return F.dequantize_4bit(codes, state)


def load(path, policy: Policy):
    return single_path(load_as_stored(path, policy))


def compute_dtype(model) -> torch.dtype:
    # A dtype while the model is loaded, its name in a saved config: torch_dtype reads both.
    return torch_dtype(str(model.config.quantization_config.bnb_4bit_compute_dtype))


def dequantized(module) -> torch.Tensor:
    import bitsandbytes.functional as F

    return F.dequantize_4bit(module.weight.data, module.weight.quant_state)


def stored_bytes(module) -> int:
    """The layer's 4-bit weight (Params4bit) with every constant of its quantization state."""
    import torch

    state = module.weight.quant_state
    total = nbytes(module.weight.data) + nbytes(state.absmax) + nbytes(state.code)
    if state.nested:
        total += nbytes(state.state2.absmax) + nbytes(state.state2.code)
        total += nbytes(state.offset) if torch.is_tensor(state.offset) else 4
    return total


def theoretical_bits(cfg: dict, in_features: int | None = None, meta_bits: int = 32) -> float:
    """4 + 32/64 = 4.5; with double quantization 4 + 8/64 + 32/(64·256) ≈ 4.127."""
    if cfg["double_quant"]:
        return BITS + 8 / BLOCKSIZE + 32 / (BLOCKSIZE * 256)
    return BITS + 32 / BLOCKSIZE


def stored_weight(key: str, get, weight_map: dict) -> torch.Tensor | None:
    state_keys = [key + suffix for suffix in SUFFIXES if key + suffix in weight_map]
    if not state_keys:
        return None
    import torch
    from bitsandbytes.functional import QuantState, dequantize_4bit

    state = QuantState.from_dict({k[len(key) + 1:]: get(k) for k in state_keys},
                                 device=torch.device("cpu"))
    return dequantize_4bit(get(key), state)


def is_stored_part(key: str, weight_map: dict) -> bool:
    return key.endswith(SUFFIXES)


def describe(cfg: dict) -> str:
    return f"{cfg['method'].upper()}{' + double quantization' if cfg['double_quant'] else ''}"


def linear4bit_layers(model) -> list[tuple[str, object]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, layer_class())]


def is_packed(module) -> bool:
    state = getattr(getattr(module, "weight", None), "quant_state", None)  # bnb 4-bit only
    return bool(getattr(state, "packing_format_for_cpu", False))


def single_path(model):
    """Keep every 4-bit layer on bitsandbytes' dequantize-and-matmul path, on any CPU."""
    for name, module in linear4bit_layers(model):
        if is_packed(module):  # packed before we saw it: its scales were already rounded
            raise NumericsError(f"{name}: weight already repacked for bitsandbytes' CPU "
                                f"inference kernel; load the model again before using it")
        # Read by Linear4bit.forward; False keeps it off the packed kernel.
        module.support_avx512bf16_for_cpu = False
    return model
