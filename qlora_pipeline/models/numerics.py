"""One numerics path for every 4-bit layer, and a run-time check that every quantized layer
(any method: methods/) computes the configured math.

bitsandbytes (0.50) has a second CPU path for `Linear4bit`: on a CPU with AVX512-BF16, the
first forward in eval mode without grad repacks the weight in place for a fused kernel
(`gemv_4bit`). That kernel computes in bf16 whatever the compute dtype, and it has no
autograd: after one evaluation, no gradient flows through any 4-bit layer, so QLoRA learns
nothing (and a layer with a bias fails in its first training step). Checkpoint saving unpacks
the weight again, re-quantizing the double-quantized scales on the way.

We switch that path off on every machine (`single_path`), for training and for scoring alike:
the scores and the merge checks then describe the model that was trained, in the configured
compute dtype. The cost is speed of 4-bit inference on such CPUs only. `check` proves the
switch held: after an eval pass, each layer's output and input gradient must equal those of
x @ deq(W)^T in the compute dtype. It raises rather than let a job produce a wrong result.
The same check holds LLM.int8 and HQQ layers to their own math (methods/*.TOLERANCE):
x @ deq(W)^T up to the method's rounding, with a gradient for the input.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from ..core.errors import NumericsError
from .methods import layers as quantized_layers
from .methods import of_layer
from .methods.bnb4 import is_packed

log = logging.getLogger(__name__)

# Largest relative error ‖y − y_ref‖ / ‖y_ref‖ accepted for the same math in the same dtype
# (only the summation order may differ; each method's layers: methods/*.TOLERANCE).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
PROBE_ROWS = 4
# Largest gap between two losses computed by the same math summed in another order (float32:
# ~1e-6 measured): packed vs alone (training/packing.py), kept logits vs all of them
# (label_positions.py). A real difference there (examples that see each other, wrong targets)
# was 1e-2 or more.
LOSS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def check(model, compute_dtype: torch.dtype) -> dict:
    """Each quantized layer against x @ deq(W)^T after an eval pass, forward and backward.

    Returns the largest relative gaps (recorded in quantization.json); raises NumericsError
    naming the layers whose gap exceeds the method's TOLERANCE or whose input gets no gradient.
    """
    layers = quantized_layers(model)
    dtype_name = str(compute_dtype).removeprefix("torch.")
    tolerance = max((of_layer(m).TOLERANCE[dtype_name] for _, m in layers), default=0.0)
    worst = {"eval": 0.0, "train": 0.0, "input_grad": 0.0}
    bad = []
    generator = torch.Generator().manual_seed(0)
    for name, module in layers:
        gaps = _probe(module, compute_dtype, generator)
        worst = {kind: max(gap, gaps[kind]) for kind, gap in worst.items()}
        if is_packed(module) or any(gap > tolerance for gap in gaps.values()):
            bad.append(f"{name} ({', '.join(f'{k} {v:.2e}' for k, v in gaps.items())}"
                       f"{', packed' if is_packed(module) else ''})")
    result = {"layers_checked": len(layers), "compute_dtype": dtype_name,
              "tolerance": tolerance, "max_relative_gap": worst}
    if bad:
        raise NumericsError(
            f"quantized layers do not compute x @ deq(W)^T in {dtype_name} after an "
            f"eval pass (tolerance {tolerance:g}; a gap of 1 is a missing gradient): "
            f"{len(bad)} of {len(layers)}: {'; '.join(bad[:5])}"
            f"{' …' if len(bad) > 5 else ''}")
    log.info("quantized layers' numerics check: %s", result)
    return result


def _relative(a: torch.Tensor | None, ref: torch.Tensor) -> float:
    if a is None:  # no gradient at all
        return 1.0
    a, ref = a.detach().float(), ref.detach().float()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


@contextlib.contextmanager
def in_mode(module, training: bool):
    """`module` in training (or eval) mode inside the block, back in its own mode after it."""
    was_training = module.training
    module.train(training)
    try:
        yield module
    finally:
        module.train(was_training)


def _probe(module, dtype: torch.dtype, generator: torch.Generator) -> dict[str, float]:
    """Relative gaps of one layer: eval output, then train output and input gradient."""
    weight = of_layer(module).dequantized(module).to(dtype)
    device = weight.device
    bias = module.bias.to(dtype) if module.bias is not None else None
    x = torch.randn(PROBE_ROWS, module.in_features, generator=generator).to(device, dtype)
    upstream = torch.randn(PROBE_ROWS, module.out_features, generator=generator).to(device, dtype)
    reference = torch.nn.functional.linear(x, weight, bias)
    reference_grad = upstream @ weight

    with in_mode(module, training=False):
        with torch.no_grad():  # the pass that would repack the weight
            eval_out = module(x)
        module.train()
        x_grad = x.clone().requires_grad_(True)
        train_out = module(x_grad)
        if train_out.requires_grad:
            train_out.backward(upstream)
    return {"eval": _relative(eval_out, reference), "train": _relative(train_out, reference),
            "input_grad": _relative(x_grad.grad, reference_grad)}
