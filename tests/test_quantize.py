"""bitsandbytes 4-bit quantization: storage arithmetic and error bounds on real bitsandbytes layers."""

from __future__ import annotations

import pytest
import torch

from qlora_pipeline.models import quantization
from qlora_pipeline.models.methods import bnb4 as quantize


def _linear4bit(weight: torch.Tensor, quant_type: str, double_quant: bool):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False,
                              quant_type=quant_type, compress_statistics=double_quant,
                              compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=double_quant)
    layer.to("cpu")  # moving a Params4bit to a device is what quantizes it
    assert layer.weight.bnb_quantized
    return layer


@pytest.mark.parametrize("double_quant, theory", [(True, 4.127), (False, 4.5)])
def test_theoretical_bits(double_quant, theory):
    bits = quantize.theoretical_bits({"double_quant": double_quant})
    assert bits == pytest.approx(theory, abs=1e-3)


@pytest.mark.parametrize("double_quant", [True, False])
def test_storage_bits_counts_every_constant(double_quant):
    torch.manual_seed(0)
    rows, cols = 1024, 1024
    layer = _linear4bit(torch.randn(rows, cols), "nf4", double_quant)
    n, blocks = rows * cols, rows * cols // 64
    if double_quant:
        # packed weights + uint8 absmax + fp32 absmax per 256 blocks + two code tables + offset
        expected = (n / 2 + blocks + 4 * (blocks // 256) + 4 * 16 + 4 * 256 + 4) * 8 / n
    else:
        expected = (n / 2 + 4 * blocks + 4 * 16) * 8 / n
    bits = 8 * quantize.stored_bytes(layer) / n
    assert bits == pytest.approx(expected, rel=1e-6)
    assert bits == pytest.approx(
        quantize.theoretical_bits({"double_quant": double_quant}), abs=0.02)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantized_error_is_bounded(quant_type):
    """NF4 on Gaussian weights loses ~9% of the norm, FP4 a little more; both well under 15%."""
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    weight = torch.randn(256, 512) * 0.02
    layer = _linear4bit(weight, quant_type, True)
    restored = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    error = float((weight - restored).norm() / weight.norm())
    assert 0.03 < error < 0.15
    row = quantization.layer_errors(torch.nn.ModuleDict({"proj": layer}), {"proj.weight": weight})[0]
    assert row["relative_error"] == pytest.approx(error, rel=1e-5)
    assert row["shape"] == [256, 512] and row["params"] == 256 * 512


def test_nf4_beats_fp4_on_normal_weights():
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    weight = torch.randn(512, 512)
    errors = {}
    for quant_type in ("nf4", "fp4"):
        layer = _linear4bit(weight, quant_type, False)
        restored = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        errors[quant_type] = float((weight - restored).norm() / weight.norm())
    assert errors["nf4"] < errors["fp4"]
