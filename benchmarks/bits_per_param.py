"""bits_per_param: bits stored per quantized parameter of the saved 4-bit base, against the
theoretical limit (4 bits + block constants: 4.127 with double quantization, 4.5 without).

The saved checkpoint is loaded as every job loads it (quantization.load_quantized) and each
4-bit layer's stored bytes are counted by methods/bnb4.stored_bytes, the quantize stage's own
measure: codes, absmax, code tables, the second-level constants of double quantization. The
figure is the parameter-weighted mean over the 4-bit layers divided by the limit; the
difference is the per-layer constants (code tables, offsets) the limit leaves out.
"""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks import support
from qlora_pipeline.core import layout

INPUTS = [layout.quantized()]


def run(smoke: bool) -> dict:
    from qlora_pipeline.models.methods.bnb4 import theoretical_bits

    path = support.tiny_quantized() if smoke else support.REPO / layout.quantized()
    layers, double_quant = stored_bits(path)
    params = sum(n for _, n in layers)
    measured = sum(bits * n for bits, n in layers) / params
    limit = theoretical_bits({"double_quant": double_quant})
    ratio = measured / limit
    return {"name": "bits_per_param", "figure": round(ratio, 4),
            "figure_text": f"{measured:.4f} / {limit:.4f} bits = {ratio:.4f}×",
            "goal": "none set: reported against the limit",
            "met": None,
            "details": {"checkpoint": str(path), "double_quant": double_quant,
                        "quantized_layers": len(layers), "quantized_params": params,
                        "bits_per_param": measured, "theoretical_bits": limit}}


def stored_bits(path: Path) -> tuple[list[tuple[float, int]], bool]:
    """(bits/param, params) of each 4-bit layer of the saved checkpoint; its double-quant flag."""
    import bitsandbytes as bnb

    from qlora_pipeline.models.methods.bnb4 import stored_bytes
    from qlora_pipeline.models.quantization import load_quantized
    from qlora_pipeline.core.policy import Policy

    model = load_quantized(path, Policy.detect())
    layers = [(8 * stored_bytes(m) / math.prod(m.weight.quant_state.shape),
               math.prod(m.weight.quant_state.shape))
              for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not layers:
        raise RuntimeError(f"{path}: no 4-bit layer in the saved checkpoint")
    return layers, bool(model.config.quantization_config.bnb_4bit_use_double_quant)
