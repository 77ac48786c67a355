"""How much two tasks' adapters change the same directions: per layer, the principal angles
between the column spaces of their updates ΔWₐ and ΔW_b (the output directions each writes).

overlap = Σ cos²θᵢ / min(kₐ, k_b), the mean squared cosine of the principal angles: 1 when
the smaller space lies in the larger, 0 when they are orthogonal. Two random subspaces of
dimensions kₐ and k_b in d dimensions give max(kₐ, k_b)/d on average (`random`), the level an
overlap is read against. The column spaces come from spectrum.low_rank_svd, never dense.
"""

from __future__ import annotations

from itertools import combinations

import torch

from ..models.adapter_file import Update
from .spectrum import low_rank_svd


def numerical_rank(S: torch.Tensor, cutoff: float = 1e-6) -> int:
    """Singular values above `cutoff` of the largest, at least 1 (PEFT has no rank 0): below
    it they are the rounding of a sum or product, not directions."""
    # All zeros: none above the cutoff, so 1.
    return max(1, int((S > cutoff * S.max()).sum())) if S.numel() else 1


def column_space(update: Update) -> torch.Tensor:
    """An orthonormal basis [out×k] of ΔW's column space (k its numerical rank, ≥ 1)."""
    U, S, V = low_rank_svd(update.A, update.B, update.scaling)
    basis = V if update.fan_in_fan_out else U  # ΔW = (B·A)ᵀ: its columns are B·A's rows
    return basis[:, :numerical_rank(S)].double()


def layer_overlap(a: Update, b: Update) -> dict:
    """Principal-angle cosines between the two updates' column spaces, and their summary."""
    Ua, Ub = column_space(a), column_space(b)
    cosines = torch.linalg.svdvals(Ua.T @ Ub).clamp(max=1.0)
    small, large = sorted((Ua.shape[1], Ub.shape[1]))
    return {"overlap": float((cosines ** 2).sum()) / small, "max_cosine": float(cosines.max()),
            "random": large / Ua.shape[0], "ranks": [Ua.shape[1], Ub.shape[1]]}


def overlaps(updates: dict[str, dict[str, Update]]) -> list[dict]:
    """One record per layer that two tasks both adapt: {pair: 'a|b', layer, overlap, ...};
    `updates` maps task -> read_adapter's layers."""
    return [{"pair": f"{ta}|{tb}", "layer": layer, **layer_overlap(ua[layer], ub[layer])}
            for (ta, ua), (tb, ub) in combinations(sorted(updates.items()), 2)
            for layer in sorted(set(ua) & set(ub))]
