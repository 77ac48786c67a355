"""A smaller LoRA adapter with nearly the same update: each layer's ΔW = scaling·B·A cut to
its best rank-k approximation (Eckart–Young: the top k singular triplets), saved as a PEFT
adapter whose per-layer ranks are PEFT's rank_pattern.

k is either one rank for every layer ({rank: k}, capped at each layer's own r) or, per layer,
the smallest rank keeping a share of ‖ΔW‖_F² ({energy: e}, the rank recommendation's rule,
recommend.py). The factors come from spectrum.low_rank_svd, so nothing is formed densely:
a large model's adapter compresses in seconds. PEFT has no such operation (its SVD-based
tools initialise an adapter from the base weights, not from a trained update), hence this
module. DoRA's update is not low-rank and is refused.

The new factors split the singular values evenly, B' = U_k·√(S_k/s_k), A' = √(S_k/s_k)·V_kᵀ
with s_k the scaling PEFT gives rank k (α/k, or α/√k with rsLoRA), so that s_k·B'·A' = ΔW_k and
neither factor is far larger than the other (the adapter can be trained further as it is).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..core.errors import InputError, NumericsError
from ..core.files import read_json, write_json
from ..models.numerics import TOLERANCE
from ..models.adapter_file import PREFIX, Update, as_lora, read_adapter, scaling
from .spectrum import energy_rank, low_rank_svd

# What a summary tells of its per-layer records (spread).
STATS = {"max": max, "min": min, "mean": lambda values: sum(values) / len(values)}


def target_rank(S: torch.Tensor, r: int, keep: dict) -> int:
    """k for one layer of rank r with singular values S: keep['rank'] (at most r), or the
    smallest rank holding keep['energy'] of ‖ΔW‖². At least 1: PEFT has no rank-0 layer (a
    zero update stays zero at rank 1)."""
    if keep.get("rank") is not None:
        return max(1, min(int(keep["rank"]), r))
    return max(1, energy_rank(S, keep["energy"]))


def truncate(update: Update, keep: dict, config: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(A' [k×in], B' [out×k], record) with scaling(config, k)·B'·A' the best rank-k
    approximation of the update's ΔW, k from `keep` (target_rank) and the one SVD of the update
    (in the orientation B·A is stored in; fan_in_fan_out is unchanged). The record gives the
    layer's rank before and after, the energy share kept and the relative Frobenius error
    ‖ΔW − ΔW_k‖/‖ΔW‖ (0 for a zero update)."""
    if update.magnitude is not None:
        raise InputError("a DoRA adapter (lora_magnitude_vector) cannot be compressed: its "
                         "update m·(W0+BA)/‖W0+BA‖ − W0 is not low-rank; expected a plain "
                         "LoRA adapter")
    U, S, V = low_rank_svd(update.A, update.B, update.scaling)
    k = target_rank(S, update.A.shape[0], keep)
    A, B = split(U, S, V, k, scaling(config, k), update.A.dtype)
    energy = S.double() ** 2
    total = float(energy.sum())
    kept = float(energy[:k].sum()) / total if total > 0 else 1.0
    record = {"rank": update.A.shape[0], "compressed_rank": k, "energy_kept": kept,
              "relative_error": math.sqrt(max(0.0, 1 - kept)) if total > 0 else 0.0}
    check_factors(A, B, scaling(config, k), S[:k], record)
    return A, B, record


def split(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, k: int, scale: float,
          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(A' [k×in], B' [out×k]) with scale·B'·A' = U_k·diag(S_k)·V_kᵀ, the singular values
    split evenly between the two factors (module docstring)."""
    root = torch.sqrt(S[:k].double() / scale).float()
    A = (root[:, None] * V[:, :k].T).to(dtype).contiguous()
    B = (U[:, :k] * root[None, :]).to(dtype).contiguous()
    return A, B


def check_factors(A: torch.Tensor, B: torch.Tensor, scale: float, expected: torch.Tensor,
                  record: dict) -> None:
    """The written factors must reproduce the singular values they were cut to: a wrong split
    or a rounding beyond the dtype's would otherwise ship a silently different adapter."""
    got = low_rank_svd(A, B, scale)[1]
    largest = float(expected.max()) if expected.numel() else 0.0
    gap = float((got.double() - expected.double()).abs().max()) if expected.numel() else 0.0
    # Relative to the largest singular value: the stored dtype's rounding of the factors.
    tolerance = TOLERANCE.get(A.dtype, TOLERANCE[torch.float32]) * max(largest, 1e-12)
    if gap > tolerance:
        raise NumericsError(f"compressed factors give singular values {got.tolist()[:4]}..., "
                            f"expected {expected.tolist()[:4]}... (gap {gap:.3g} > {tolerance:.3g}"
                            f" for {A.dtype})")
    record["singular_value_gap"] = gap


def compress(adapter_dir: Path, out_dir: Path, keep: dict) -> dict:
    """Write the compressed adapter (adapter_config.json, adapter_model.safetensors) into
    out_dir and return its summary: per-layer records, parameters and bytes before and after."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    config = as_lora(read_json(adapter_dir / "adapter_config.json"))
    updates = read_adapter(adapter_dir)
    factors, layers = {}, {}
    for key, update in updates.items():
        module = key.removesuffix(".weight")
        A, B, layers[module] = truncate(update, keep, config)
        factors[module] = A, B
    ranks = {module: record["compressed_rank"] for module, record in layers.items()}
    r = max(ranks.values())
    # Module paths as rank_pattern keys, as the rank recommendation writes them (recommend.py).
    config.update(r=r, rank_pattern={m: k for m, k in sorted(ranks.items()) if k != r})
    save_adapter(out_dir, factors, config)
    return summary(keep, updates, factors, layers, adapter_dir, out_dir)


def save_adapter(out_dir: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 config: dict) -> None:
    """A PEFT adapter in out_dir: adapter_model.safetensors of the factors ({module path:
    (A, B)}), then adapter_config.json."""
    from safetensors.torch import save_file

    tensors = {f"{PREFIX}{module}.lora_{name}.weight": factor
               for module, (A, B) in factors.items() for name, factor in (("A", A), ("B", B))}
    save_file(tensors, Path(out_dir) / "adapter_model.safetensors", metadata={"format": "pt"})
    write_json(Path(out_dir) / "adapter_config.json", config)


def spread(records: dict[str, dict], key: str, *stats: str) -> dict:
    """The named statistics of the per-layer records' `key`, {stat: value} in the order named."""
    values = [record[key] for record in records.values()]
    return {stat: STATS[stat](values) for stat in stats}


def summary(keep: dict, updates: dict[str, Update], factors: dict, layers: dict,
            adapter_dir: Path, out_dir: Path) -> dict:
    params = sum(u.A.numel() + u.B.numel() for u in updates.values())
    new_params = sum(A.numel() + B.numel() for A, B in factors.values())
    weights = "adapter_model.safetensors"
    return {"keep": keep, "layers": len(layers),
            "rank_before": max(record["rank"] for record in layers.values()),
            "rank_after": spread(layers, "compressed_rank", "max", "min", "mean"),
            "energy_kept": spread(layers, "energy_kept", "min", "mean"),
            "relative_error": spread(layers, "relative_error", "max", "mean"),
            "parameters": {"before": params, "after": new_params, "ratio": new_params / params},
            "bytes": {"before": (adapter_dir / weights).stat().st_size,
                      "after": (out_dir / weights).stat().st_size},
            "per_layer": layers}
