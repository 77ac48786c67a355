"""Several tasks' LoRA adapters combined into one PEFT adapter, computed on their updates
ΔWᵢ = sᵢ·Bᵢ·Aᵢ (config key `combinations`, rule combine_adapters).

Why not PEFT's add_weighted_adapter: it combines the factors A and B, not the updates, so its
`linear` (and the non-SVD ties/dare/magnitude_prune) add cross terms Bᵢ·Aⱼ that no task
trained (PEFT #3004); its new adapter keeps the first adapter's use_rslora with
lora_alpha = r, a wrong scale for rsLoRA adapters, and ignores DoRA magnitudes (#3761). Here
every method is defined on the ΔWᵢ, one layer at a time, and written with factors whose update
is checked against that definition before the adapter is saved:

- cat: B = [B₁ … Bₙ], A = [w₁s₁A₁; …; wₙsₙAₙ]/s. Exactly Σ wᵢΔWᵢ, rank Σ rᵢ.
- sum: Σ wᵢΔWᵢ refactored through its SVD (spectrum.low_rank_svd, never dense), at its own
  numerical rank: exact, and smaller than cat where the tasks' updates share directions.
- svd: Σ wᵢΔWᵢ cut to its best rank-k approximation (k = svd_rank, default max rᵢ).
- ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd: PEFT's merge_utils rules
  (trim, elect signs, drop and rescale) applied to the dense ΔWᵢ, as the TIES and DARE papers
  define them on task vectors, then cut to rank k. These need one dense SVD per layer.

Refused: DoRA adapters (the update m·(W0+BA)/‖W0+BA‖ − W0 depends on W0 and is not low-rank),
and every setting adapter_file.read_adapter refuses (lora_bias, alpha_pattern, ...). Adapters of
different ranks and targets are combined layer by layer: a layer only some tasks adapt gets
only theirs. The result has use_rslora off, lora_alpha 1 (a layer's scaling is 1/its rank),
per-layer ranks in rank_pattern and its exact module paths as target_modules.
"""

from __future__ import annotations

import math
from collections import namedtuple
from pathlib import Path

import torch

from .combination_methods import LOW_RANK
from ..core.errors import InputError, NumericsError
from ..models.adapter_file import Update, as_lora, read_adapter, read_config
from .compress import save_adapter, split, spread
from .overlap import numerical_rank, overlaps
from .spectrum import low_rank_svd

# A combined update is checked to this share of its norm (float32 factors).
TOLERANCE = 1e-4


# One task's update of one layer (an Update), and its weight in the combination.
Part = namedtuple("Part", ["task", "weight", "update"])


def combine(adapter_dirs: dict[str, Path], out_dir: Path, spec: dict, seed: int = 0,
            device: str = "cpu") -> dict:
    """Write the combination `spec` ({method, weights, density, svd_rank}) of the adapters
    (task -> folder, in the order of spec's weights) into out_dir as a PEFT adapter; return its
    summary with a record per layer. `device`: where the pruning methods' dense updates and
    SVDs are computed (the factors' r×r work stays on the CPU)."""
    configs, by_task, layers = read_sources(adapter_dirs, spec["weights"])
    torch.manual_seed(seed)  # DARE's random drops, layer by layer in a fixed order
    factors, records = {}, {}
    for module, parts in layers.items():
        A, B, records[module] = combine_layer(parts, spec, device)
        factors[module] = A, B
    save_adapter(out_dir, factors, adapter_config(next(iter(configs.values())), records))
    return {**summary(spec, records, factors, by_task), "overlap": overlaps(by_task)}


def read_sources(adapter_dirs: dict[str, Path], weights: list[float]) -> tuple[
        dict[str, dict], dict[str, dict[str, Update]], dict[str, list[Part]]]:
    """Every source's adapter_config and updates ({task: {module path: Update}}) and, per
    adapted module (sorted), the parts of the tasks that adapt it; refuses what cannot be
    combined exactly."""
    configs, by_task, layers = {}, {}, {}
    for (task, folder), weight in zip(adapter_dirs.items(), weights):
        folder = Path(folder)
        configs[task] = as_lora(read_config(folder))
        by_task[task] = {key.removesuffix(".weight"): update
                         for key, update in read_adapter(folder).items()}
        for module, update in by_task[task].items():
            if update.magnitude is not None:
                raise InputError(f"{folder} (task {task}): a DoRA adapter (use_dora) cannot be "
                                 f"combined: its update depends on the base weight and its "
                                 f"magnitudes have no sum (PEFT #3761); expected plain LoRA")
            layers.setdefault(module, []).append(Part(task, weight, update))
    check_same_base(configs, adapter_dirs)
    for module, parts in layers.items():
        check_same_layer(module, parts, adapter_dirs)
    return configs, by_task, dict(sorted(layers.items()))


def check_same_base(configs: dict[str, dict], adapter_dirs: dict[str, Path]) -> None:
    bases = {task: config.get("base_model_name_or_path") for task, config in configs.items()}
    if len(set(bases.values())) > 1:
        raise InputError(f"adapters {', '.join(map(str, adapter_dirs.values()))}: trained on "
                         f"different bases {bases}; expected one base for every combined "
                         f"adapter")


def check_same_layer(module: str, parts: list[Part], adapter_dirs: dict[str, Path]) -> None:
    shapes = {p.task: (p.update.B.shape[0], p.update.A.shape[1], p.update.fan_in_fan_out)
              for p in parts}
    if len(set(shapes.values())) > 1:
        raise InputError(f"layer {module}: the adapters of {', '.join(shapes)} give it "
                         f"(out, in, fan_in_fan_out) {shapes}; expected one shape (adapters of "
                         f"one model, {', '.join(map(str, adapter_dirs.values()))})")


def combine_layer(parts: list[Part], spec: dict,
                  device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One layer's combined factors (float32, the orientation B·A is stored in) and its
    record: rank, relative_error against the method's own definition (0 for cat and sum, the
    discarded singular values' share for a cut) and from_sum, against Σ wᵢΔWᵢ."""
    method = spec["method"]
    # cat's factors at scale 1, in float64: A_sum [Σr×in], B_sum [out×Σr], B_sum·A_sum = Σ wᵢsᵢBᵢAᵢ
    A_sum = torch.cat([p.weight * p.update.scaling * p.update.A.double() for p in parts])
    B_sum = torch.cat([p.update.B.double() for p in parts], dim=1)
    k_cut = spec.get("svd_rank") or max(p.update.A.shape[0] for p in parts)
    if method not in LOW_RANK:
        return dense_layer(parts, spec, k_cut, A_sum.to(device), B_sum.to(device))
    if method == "cat":
        scale = 1.0 / A_sum.shape[0]  # the layer's PEFT scaling: lora_alpha (1) / its rank
        A, B, expected = (A_sum / scale).float(), B_sum.float(), 0.0
    else:
        U, S, V = low_rank_svd(A_sum, B_sum, 1.0)
        k = numerical_rank(S) if method == "sum" else min(k_cut, numerical_rank(S))
        A, B, scale = factors(U, S, V, k)
        expected = tail(S, k)
    error = residual(A, B, scale, A_sum, B_sum)
    check(error, expected, parts)
    return A, B, {"rank": A.shape[0], "relative_error": error, "from_sum": error,
                  "tasks": [p.task for p in parts]}


def dense_layer(parts: list[Part], spec: dict, k_cut: int, A_sum: torch.Tensor,
                B_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A pruning method (TIES, DARE, magnitude) on the dense updates, cut to rank k_cut."""
    from peft.utils import merge_utils

    rule = getattr(merge_utils, spec["method"].removesuffix("_svd"))
    device = A_sum.device
    deltas = [p.update.scaling * (p.update.B.to(device).float() @ p.update.A.to(device).float())
              for p in parts]
    weights = torch.tensor([p.weight for p in parts], dtype=torch.float32, device=device)
    merged = rule(deltas, weights, spec["density"])
    U, S, Vh = torch.linalg.svd(merged, full_matrices=False)  # float32: ~2× float64's speed
    k = min(k_cut, numerical_rank(S))
    A, B, scale = factors(U.cpu(), S.cpu(), Vh.T.cpu(), k)
    written = scale * (B.to(device).double() @ A.to(device).double())
    error = relative(written - merged.double(), merged.double())
    check(error, tail(S, k), parts)
    return A, B, {"rank": k, "relative_error": error,
                  "from_sum": relative(written - B_sum @ A_sum, B_sum @ A_sum),
                  "tasks": [p.task for p in parts]}


def factors(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor,
            k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, scale) of rank k with scale·B·A = U_k·S_k·V_kᵀ; scale is PEFT's for the layer,
    lora_alpha (1) / k."""
    scale = 1.0 / k
    A, B = split(U.double(), S.double(), V.double(), k, scale, torch.float32)
    return A, B, scale


def tail(S: torch.Tensor, k: int) -> float:
    """‖ΔW − ΔW_k‖/‖ΔW‖ for the best rank-k ΔW_k (Eckart–Young): the discarded energy's root."""
    energy = S.double() ** 2
    total = float(energy.sum())
    return math.sqrt(max(0.0, float(energy[k:].sum()) / total)) if total > 0 else 0.0


def residual(A: torch.Tensor, B: torch.Tensor, scale: float, A_ref: torch.Tensor,
             B_ref: torch.Tensor) -> float:
    """‖scale·B·A − B_ref·A_ref‖ / ‖B_ref·A_ref‖ without forming either product."""
    norm = frobenius(A_ref, B_ref)
    diff = frobenius(torch.cat([scale * A.double(), -A_ref]), torch.cat([B.double(), B_ref], 1))
    return diff / norm if norm > 0 else diff


def frobenius(A: torch.Tensor, B: torch.Tensor) -> float:
    """‖B·A‖_F from r×r Gram matrices, ‖B·A‖² = Σ (BᵀB)∘(A·Aᵀ): float64 keeps the cancellation
    of a near-zero difference ~1e-8 relative, far inside TOLERANCE, at a fraction of an SVD."""
    return math.sqrt(max(0.0, float(((B.T @ B) * (A @ A.T)).sum())))


def relative(diff: torch.Tensor, ref: torch.Tensor) -> float:
    norm = float(torch.linalg.norm(ref))
    return float(torch.linalg.norm(diff)) / norm if norm > 0 else 0.0


def check(error: float, expected: float, parts: list[Part]) -> None:
    """The written update must be its definition within TOLERANCE (a cut: the Eckart–Young
    error exactly): anything else would ship a silently different adapter."""
    if abs(error - expected) > TOLERANCE:
        raise NumericsError(f"combined update of {', '.join(p.task for p in parts)}: relative "
                            f"error {error:.3g} against its definition, expected {expected:.3g} "
                            f"(tolerance {TOLERANCE})")


def adapter_config(first: dict, records: dict[str, dict]) -> dict:
    """The first source's settings, with the combination's ranks (its layers' records) and
    targets; lora_alpha 1, so that each layer's scaling is 1 / its rank, as its factors were
    written for."""
    r = max(record["rank"] for record in records.values())
    return {**first, "r": r, "lora_alpha": 1, "use_rslora": False, "use_dora": False,
            "rank_pattern": {m: rec["rank"] for m, rec in records.items() if rec["rank"] != r},
            "alpha_pattern": {}, "target_modules": sorted(records), "layers_to_transform": None,
            "layers_pattern": None, "exclude_modules": None}


def summary(spec: dict, records: dict, factors: dict,
            by_task: dict[str, dict[str, Update]]) -> dict:
    sources = {task: sum(u.A.numel() + u.B.numel() for u in updates.values())
               for task, updates in by_task.items()}
    combined = sum(A.numel() + B.numel() for A, B in factors.values())
    return {**spec, "layers": len(records),
            "rank": spread(records, "rank", "max", "min", "mean"),
            "parameters": {"sources": sources, "combined": combined},
            "relative_error": spread(records, "relative_error", "max", "mean"),
            "from_sum": spread(records, "from_sum", "max", "mean"),
            "per_layer": records}
