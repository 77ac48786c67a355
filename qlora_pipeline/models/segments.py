"""Several sequences in one row, kept apart by an attention mask.

A row holds a shared beginning (segment CONTEXT) followed by segments 1, 2, ... that each see
that beginning and their own earlier tokens, never one another; PAD marks padding. Used to
score every answer of a question in one row (evaluation/shared_context.py) and to compute a
training batch's common prefix once (training/shared_prefix.py).
"""

from __future__ import annotations

import torch

CONTEXT, PAD = 0, -1  # segment ids: the shared beginning, padding; others are 1, 2, ...


def attention_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[batch, 1, T, T] additive mask: token i sees token j <= i of the context or of its own
    segment; padding sees only padding (a fully masked row would give NaN)."""
    idx = torch.arange(segments.shape[1], device=segments.device)
    causal = idx[None, :] <= idx[:, None]
    query, key = segments[:, :, None], segments[:, None, :]
    visible = causal & (((key == CONTEXT) & (query != PAD)) | (key == query))
    mask = torch.zeros(visible.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]
