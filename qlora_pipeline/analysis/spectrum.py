"""The singular values of a LoRA update ΔW = scaling·B·A, and the ranks and norms they give.

ΔW of an [out×in] layer has at most r nonzero singular values; forming it densely to find them
costs out·in memory and an SVD of the whole matrix per layer. Two thin QRs and an r×r SVD give
the same values exactly (ΔW = Q_B·(scaling·R_B·R_Aᵀ)·Q_Aᵀ), so a large model's adapter is
analysed in seconds. DoRA's rescaled update is not low-rank and is the one dense exception.
"""

from __future__ import annotations

import math

import torch

from ..models.adapter_file import Update
from . import intruders

ENERGIES = (0.9, 0.99)


def low_rank_svd(A: torch.Tensor, B: torch.Tensor,
                 scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U [out×k], S [k] descending, V [in×k]) with scaling·B·A = U·diag(S)·Vᵀ, k = r (or
    min(r, out, in) for a layer narrower than r). Exact for rank-deficient updates (B = 0 gives
    S = 0): QR needs no full rank, unlike a Gram-matrix eigendecomposition."""
    q_b, r_b = torch.linalg.qr(B.double())  # float64: S small beside S_max stays accurate
    q_a, r_a = torch.linalg.qr(A.double().T)
    core_u, S, core_vh = torch.linalg.svd(scaling * r_b @ r_a.T, full_matrices=False)
    return (q_b @ core_u).float(), S.float(), (q_a @ core_vh.T).float()


def energy_rank(S: torch.Tensor | list[float], share: float) -> int:
    """The smallest k with Σ_{i<k} S_i² ≥ share·ΣS² (largest S first); 0 when S is all zeros.
    S: a tensor, or a list (an analysis's singular_values), in float64 either way."""
    S = torch.as_tensor(S, dtype=torch.float64)
    energy = torch.sort(S.flatten() ** 2, descending=True).values
    total = float(energy.sum())
    if total == 0:
        return 0
    # A relative tolerance so that share = 1 is reached despite the cumulative sum's rounding.
    reached = torch.cumsum(energy, 0) >= share * total * (1 - 1e-12)
    return int(reached.nonzero()[0, 0]) + 1


def metrics(S: torch.Tensor, energies: tuple[float, ...] = ENERGIES) -> dict:
    """Norms and ranks of a matrix from its singular values S, as plain Python numbers:
    fro, spectral, stable_rank (fro²/spectral²), effective_rank (Roy & Vetterli: exp of the
    entropy of S/ΣS) and rank_<100·e> for each energy share e. All 0 for a zero matrix."""
    S = torch.sort(S.detach().double().flatten().clamp_min(0), descending=True).values
    ranks = {f"rank_{round(100 * e)}": energy_rank(S, e) for e in energies}
    total = float((S ** 2).sum())
    if total == 0:
        return {"fro": 0.0, "spectral": 0.0, "stable_rank": 0.0, "effective_rank": 0.0,
                **ranks}
    spectral = float(S[0])
    p = S / S.sum()
    p = p[p > 0]  # 0·log 0 = 0
    return {"fro": math.sqrt(total), "spectral": spectral,
            "stable_rank": total / spectral ** 2,
            "effective_rank": math.exp(float(-(p * p.log()).sum())), **ranks}


def layer_metrics(update: Update, base: torch.Tensor | None = None,
                  intruder_cfg: dict | None = None) -> dict:
    """One adapted layer's spectrum and metrics; with its base weight W0 (as stored, the
    orientation of Update.delta()) also relative_norm ‖ΔW‖/‖W0‖ (None for W0 = 0), and
    with `intruder_cfg` (keyword arguments of intruders.count) its intruder dimensions.

    A DoRA update (magnitude set) is m·(W0+BA)/‖W0+BA‖ − W0, full rank: it is formed densely
    from W0 and every one of its min(out, in) singular values is kept, so that the metrics, the
    spectra and a rank recommendation all read one exact list (a truncated list would hide the
    energy of its tail); the list's size is small beside the dense SVD it comes from."""
    delta = None
    if update.magnitude is not None:
        if base is None:
            raise ValueError("a DoRA update (lora_magnitude_vector) is not low-rank: its "
                             "singular values need the base weight; pass base=")
        delta = update.apply(base) - base.float()
        S = torch.linalg.svdvals(delta.double()).float()
    else:
        # fan_in_fan_out transposes ΔW, which leaves its singular values unchanged.
        S = low_rank_svd(update.A, update.B, update.scaling)[1]
    out = {"rank": update.A.shape[0], "singular_values": S.tolist(), **metrics(S),
           "relative_norm": None, "intruders": None}
    if base is None:
        return out
    base = base.float()
    shape = (update.B.shape[0], update.A.shape[1])  # ΔW's, transposed with fan_in_fan_out
    shape = shape[::-1] if update.fan_in_fan_out else shape
    if shape != tuple(base.shape):
        raise ValueError(f"the update's ΔW has shape {shape} but the base weight "
                         f"{tuple(base.shape)}; expected the weight this adapter layer changes")
    base_norm = frobenius(base)
    out["relative_norm"] = out["fro"] / base_norm if base_norm > 0 else None
    if intruder_cfg is not None:  # the one use of a dense ΔW for a LoRA update
        delta = update.delta() if delta is None else delta
        out["intruders"] = intruders.count(base, delta, **intruder_cfg)
    return out


def frobenius(W: torch.Tensor) -> float:
    """‖W‖_F of a 2-D weight: row norms in float32 (each sums a few thousand squares, so
    ~1e-7 relative), added in float64. torch's float32 norm of a whole 58M-entry matrix was
    off by 0.5 %; converting it to float64 first costs 20× the time."""
    return float(torch.linalg.vector_norm(W.float(), dim=-1).double().square().sum().sqrt())
