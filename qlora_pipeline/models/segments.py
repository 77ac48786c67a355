"""Several sequences in one row, kept apart by an attention mask.

A row holds a shared beginning (segment CONTEXT) followed by segments 1, 2, ... that each see
that beginning and their own earlier tokens, never one another; PAD marks padding. Used to
score every answer of a question in one row (evaluation/shared_context.py) and to compute a
training batch's common prefix once (training/shared_prefix.py).

`groups` adds a level above: tokens of group SHARED are seen by every group, and segments
see only the CONTEXT tokens of their own group (several questions, each with its answers,
after one common beginning).
"""

from __future__ import annotations

import torch

CONTEXT, PAD = 0, -1  # segment ids: the shared beginning, padding; others are 1, 2, ...
SHARED = 0  # group id of tokens every group sees


def attention_mask(segments: torch.Tensor, dtype: torch.dtype,
                   groups: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, 1, T, T] additive mask: token i sees token j <= i of the context or of its own
    segment (within its group, and the SHARED group's tokens); padding sees only padding (a
    fully masked row would give NaN)."""
    idx = torch.arange(segments.shape[1], device=segments.device)
    causal = idx[None, :] <= idx[:, None]
    query, key = segments[:, :, None], segments[:, None, :]
    own = ((key == CONTEXT) & (query != PAD)) | (key == query)
    if groups is not None:
        query_group, key_group = groups[:, :, None], groups[:, None, :]
        own = (own & (key_group == query_group)) | ((key_group == SHARED) & (query != PAD))
    visible = causal & own
    mask = torch.zeros(visible.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]


def mask_dtype(model) -> torch.dtype:
    """The dtype an additive mask must have: that of the attention's inputs, the embeddings'
    output (float32 where the embeddings are not floating point)."""
    dtype = model.get_input_embeddings().weight.dtype
    return dtype if dtype.is_floating_point else torch.float32
