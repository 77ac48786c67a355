"""Intruder dimensions (Shuttleworth et al., "LoRA vs full fine-tuning: an illusion of
equivalence", 2024): top singular vectors of the fine-tuned weight that resemble none of the
base weight's top singular vectors. LoRA creates them where full fine-tuning does not, and they
go with forgetting of the pre-training distribution, so a count per layer says where an
adapter overwrote the base rather than refined it.
"""

from __future__ import annotations

import torch

EXACT_LIMIT = 1024  # up to this smallest dimension an exact SVD costs well under a second
OVERSAMPLE = 10
POWER_ITERATIONS = 3
SEED = 0


def top_left_singular_vectors(W: torch.Tensor, k: int) -> torch.Tensor:
    """W's top-k left singular vectors [out×k], in float32 on the CPU: exact for a small W,
    randomized (svd_lowrank) for a large one, with a fixed seed so that two runs agree, on a
    forked RNG so that the caller's random state is untouched. The CPU because svd_lowrank
    takes no generator and only the CPU's is forked here (the base is read there anyway)."""
    W = W.detach().float().cpu()  # k beyond W's smallest dimension: the slices below clip it
    if min(W.shape) <= EXACT_LIMIT:
        return torch.linalg.svd(W, full_matrices=False).U[:, :k]
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(SEED)
        U = torch.svd_lowrank(W, q=min(k + OVERSAMPLE, *W.shape), niter=POWER_ITERATIONS)[0]
    return U[:, :k]


def count(base: torch.Tensor, delta: torch.Tensor, k: int = 10, reference: int = 40,
          threshold: float = 0.5) -> dict:
    """How many of the top-k left singular vectors of base + delta have no |cosine| ≥
    `threshold` with any of the base's top-`reference` ones (k, reference clipped to the
    weight's smallest dimension); max_similarity: each one's largest |cosine|."""
    k, reference = min(k, *base.shape), min(reference, *base.shape)
    tuned = top_left_singular_vectors(base.float() + delta.float(), k)
    original = top_left_singular_vectors(base, reference)
    # Singular vectors are unit columns and defined up to sign: |cosine| = |uᵀv|.
    similarity = (original.T @ tuned).abs().amax(dim=0)
    return {"count": int((similarity < threshold).sum()), "k": k, "reference": reference,
            "threshold": threshold, "max_similarity": similarity.tolist()}
