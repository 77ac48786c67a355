"""Initialisations that start from the base's weights (`lora.init`): LoftQ (A, B the best rank-r
correction of the quantization error) and PiSSA (A, B the top-r singular directions of W, the
residual quantized as the training's own base).

LoftQ is hand-written (why): PEFT's `replace_lora_weights_loftq` asserts CUDA (its compute
device is hard-coded) and covers bitsandbytes 4-bit only. Here W is read a tensor at a time
from the full-precision base (models/checkpoint.Checkpoint) and Q(W) comes through the methods
interface (`quantize_tensor`, `dequantized`), so no quantization method is special. PiSSA is
PEFT's (`init_lora_weights="pissa_niter_<n>"`) on the full-precision base, seeded.

Both are checked as models/numerics.py checks a layer's math: a layer that does not satisfy its
definition stops the job with a NumericsError naming it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from ..core.errors import InputError, NumericsError
from ..core.seeding import seed_everything
from .lora import WEIGHT_DERIVED, _pattern_key, inject, lora_config, prepare_qlora, targeted_layers

log = logging.getLogger(__name__)
# Relative gap accepted between two float32 computations of the same norm or sum (an SVD and a
# matmul summed in other orders: ~1e-6 measured); a wrong factor or scale gives 1e-2 or more.
TOLERANCE = 1e-4
PEFT_PREFIX = "base_model.model."  # a PEFT model's module names above the base's own


def scale(cfg: dict, rank: int) -> float:
    """LoRA's s: alpha/r, or alpha/sqrt(r) with rsLoRA."""
    return cfg["alpha"] / (math.sqrt(rank) if cfg["use_rslora"] else rank)


def rank(cfg: dict, layer: str) -> int:
    """The layer's rank: its rank_pattern entry (matched as PEFT matches it), else r."""
    patterns = cfg.get("rank_pattern") or {}
    key = _pattern_key(patterns, layer)
    return cfg["r"] if key is None else int(patterns[key])


def pissa_option(cfg: dict) -> str:
    """PEFT's init_lora_weights for PiSSA: the fast randomised SVD with `niter` subspace
    iterations, or the exact SVD for niter 0."""
    niter = cfg["pissa"]["niter"]
    return f"pissa_niter_{niter}" if niter else "pissa"


def svd_factors(error: torch.Tensor, r: int, s: float):
    """(A, B, tail): balanced rank-r factors with s·BA the best rank-r approximation of `error`
    (B = U·sqrt(S/s), A = sqrt(S/s)·Vᵀ), and the Frobenius norm of what it leaves (Eckart–Young:
    sqrt of the sum of the other σ²)."""
    u, sigma, vh = torch.linalg.svd(error.float(), full_matrices=False)
    root = torch.sqrt(sigma[:r] / s)
    return root[:, None] * vh[:r], u[:, :r] * root, float(sigma[r:].square().sum().sqrt())


def loftq_residual(weight: torch.Tensor, quantize, r: int, s: float, iterations: int):
    """What LoftQ quantizes as the base: R with R = W − s·BA, BA the rank-r correction of
    W − Q(R) from the previous step, alternated `iterations` − 1 times (1: W itself, the
    shared quantized base). `quantize`: deq(Q(·)) of one weight (methods' quantize_tensor)."""
    weight = weight.float()
    residual = weight
    for _ in range(iterations - 1):
        a, b, _ = svd_factors(weight - quantize(residual).float(), r, s)
        residual = weight - s * (b @ a)
    return residual


def _eckart_young_gap(error: torch.Tensor, module, tail: float) -> float:
    """How far ‖W − deq − s·BA‖_F, with B, A and s as the LoRA layer holds them, is from the
    Eckart–Young tail, relative to ‖W − deq‖_F."""
    a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
    left = float((error - module.scaling["default"] * (b.float() @ a.float())).norm())
    return abs(left - tail) / max(float(error.norm()), 1e-30)


def lora_layers(model) -> list[tuple[str, object]]:
    """(base model's layer name, PEFT LoRA layer) of every adapted layer."""
    from peft.tuners.lora import LoraLayer

    return [(name.removeprefix(PEFT_PREFIX), module) for name, module in model.named_modules()
            if isinstance(module, LoraLayer)]


@torch.no_grad()
def apply_loftq(model, weights, cfg: dict) -> dict:
    """Set every LoRA layer of `model` (PEFT, on a quantized base) to LoftQ's factors of its
    quantization error, W read from `weights` (a Checkpoint of the full-precision base) one
    layer at a time. Returns {"layers", "largest_gap"}; raises NumericsError naming the layers
    whose factors leave more than the Eckart–Young tail."""
    from ..models.methods import of_layer

    gaps = {}
    for name, module in lora_layers(model):
        base = module.get_base_layer()
        deq = of_layer(base).dequantized(base) if _quantized(base) else base.weight
        weight = weights.weight(f"{name}.weight").to(deq.device)
        error = weight.float() - deq.float()
        r = rank(cfg, name)
        a, b, tail = svd_factors(error, r, scale(cfg, r))
        module.lora_A["default"].weight.copy_(a)
        module.lora_B["default"].weight.copy_(b)
        gaps[name] = _eckart_young_gap(error, module, tail)
    return _checked(gaps, "LoftQ: ‖W − deq(Q(W)) − s·BA‖_F is not the Eckart–Young tail")


def _quantized(layer) -> bool:
    from ..models.methods import layers_types

    return isinstance(layer, layers_types())


def _checked(gaps: dict, what: str) -> dict:
    bad = {name: gap for name, gap in gaps.items() if not gap <= TOLERANCE}  # NaN is bad
    if bad:
        shown = ", ".join(f"{name} ({gap:.1e})" for name, gap in list(bad.items())[:3])
        raise NumericsError(f"{what} in {len(bad)} layer(s): {shown}; expected a relative gap "
                            f"at most {TOLERANCE:g}")
    return {"layers": len(gaps), "largest_gap": max(gaps.values(), default=0.0)}


def pissa(model, cfg: dict, seed: int):
    """(PEFT model, check): PEFT's PiSSA on the full-precision `model`, seeded so reruns are
    bitwise; each adapted layer's base then holds the residual W − s·BA. The check: residual
    + s·BA equals W (kept before PEFT rewrites it), per layer."""
    from peft import get_peft_model

    layers = targeted_layers(model, cfg["target_modules"], cfg.get("layers_to_transform"))
    originals = {name: module.weight.detach().clone() for name, module in layers}
    seed_everything(seed)
    peft_model = get_peft_model(model, lora_config(cfg, cfg["target_modules"], pissa_option(cfg)))
    gaps = {}
    with torch.no_grad():
        for name, module in lora_layers(peft_model):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            rebuilt = module.get_base_layer().weight.float() + module.scaling["default"] * (b @ a)
            gaps[name] = float((rebuilt - originals[name].float()).norm()
                               / max(float(originals[name].norm()), 1e-30))
    return peft_model, _checked(gaps, "PiSSA: residual + s·BA is not W")


def save_initial(model, out_dir: Path) -> None:
    """The initial adapter as a PEFT adapter folder that loads as it is: init_lora_weights is
    set to true in its config, else PEFT would run PiSSA on the base it is loaded onto."""
    model.save_pretrained(out_dir)
    path = Path(out_dir) / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["init_lora_weights"] = True
    path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def prepare(quantized_dir, cfg: dict, policy, gradient_checkpointing: bool,
            total_steps: int | None = None, base_dir=None):
    """lora.prepare_qlora (`total_steps`: AdaLoRA's schedule), and for LoftQ on the shared base (no initial adapter beside it)
    LoftQ's factors of its error against the full-precision base at `base_dir`."""
    from ..models.checkpoint import Checkpoint

    own = (Path(quantized_dir) / "initial").is_dir()
    if cfg["init"] in WEIGHT_DERIVED and not own and (cfg["init"] == "pissa" or not base_dir):
        raise InputError(f"lora.init {cfg['init']}: {quantized_dir} carries no initial adapter "
                         f"(initial/) and no full-precision base was given; expected the "
                         f"training's own base (rule quantize_for_training)")
    model, expected = prepare_qlora(quantized_dir, cfg, policy, gradient_checkpointing,
                                    total_steps)
    if cfg["init"] == "loftq" and not own:
        log.info("LoftQ initialisation: %s", apply_loftq(model, Checkpoint(base_dir), cfg))
    return model, expected


def save_converted(model, adapter_dir: Path) -> None:
    """The trained adapter as a plain LoRA adapter on the original base, in `converted/`:
    PEFT's conversion (path_initial_model_for_weight_conversion), rank 2r, ΔW = s·(BA − B₀A₀)
    with B₀A₀ the initial adapter saved in `initial/`. What vLLM, llama.cpp and a merge into
    the full-precision base can use: on W it computes W_res + s·BA exactly where the training
    computed deq(Q(W_res)) + s·BA (PiSSA; LoftQ alike, W ≈ deq + s·B₀A₀)."""
    model.save_pretrained(Path(adapter_dir) / "converted",
                          path_initial_model_for_weight_conversion=str(Path(adapter_dir)
                                                                       / "initial"))


def pissa_residual(base, residual_dir, initial_dir, cfg: dict, seed: int, policy) -> dict:
    """PiSSA on the full-precision base: the initial adapter saved in `initial_dir`, the base
    with each adapted layer's residual saved in `residual_dir` (to be quantized). Returns the
    check."""
    from ..models.quantization import load_full_precision

    model, checked = pissa(load_full_precision(base, policy), cfg, seed)
    save_initial(model, initial_dir)
    model.unload().save_pretrained(residual_dir)
    return checked


@torch.no_grad()
def loftq_residual_base(base, residual_dir, cfg: dict, quantization: dict, policy) -> None:
    """The base with each adapted layer's W replaced by LoftQ's R after its alternating
    steps (loftq_residual, Q by the configured method), saved in `residual_dir`."""
    from ..models import methods
    from ..models.quantization import load_full_precision

    method = methods.of(quantization["method"])
    model = load_full_precision(base, policy)
    for name, module in targeted_layers(model, cfg["target_modules"],
                                        cfg.get("layers_to_transform")):
        r = rank(cfg, name)
        module.weight.copy_(loftq_residual(
            module.weight, lambda w: method.quantize_tensor(w, quantization, policy), r,
            scale(cfg, r), cfg["loftq"]["iterations"]))
    model.save_pretrained(residual_dir)


def loftq_initial(model, base, cfg: dict, initial_dir) -> dict:
    """LoftQ's factors of the error between the full-precision `base` and the quantized
    `model` (its layers read in memory), saved as the initial adapter. Returns the check."""
    from ..models.checkpoint import Checkpoint

    model = inject(model, cfg, gradient_checkpointing=False)
    checked = apply_loftq(model, Checkpoint(base), cfg)
    save_initial(model, initial_dir)
    return checked
