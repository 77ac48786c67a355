"""The output head only where the loss is taken.

In a fine-tuning batch most positions predict a prompt or padding token (label -100): the
output head (hidden × vocabulary: a fifth of SmolLM2-135M's matmuls) and the softmax over the
vocabulary are wasted there, and on a GPU the float32 logits of a long batch are the largest
activation of all. transformers' causal LMs take `logits_to_keep` (the positions whose logits
are computed) and `shift_labels` (targets already shifted, its padding-free path); given both,
the model's own loss function (softcapping, logit scaling: whatever the model does) computes the
same loss from the kept logits. The positions kept are those that predict a labelled token in
any row of the batch (one index set for the whole batch, as `logits_to_keep` takes).

Whether a model honours both is checked on a real batch before training (`check`): the same
loss either way, or the job computes every logit as before and says why.
"""

from __future__ import annotations

import inspect
import logging

import torch

from .numerics import LOSS_TOLERANCE, in_mode

log = logging.getLogger(__name__)

IGNORE = -100


def keep(batch: dict) -> dict:
    """The batch plus `logits_to_keep` (positions predicting a labelled token in any row) and
    `shift_labels` (those targets, -100 where a row has none). Unchanged if nothing is labelled."""
    targets = batch["labels"][:, 1:]
    positions = (targets != IGNORE).any(dim=0).nonzero().flatten()
    if positions.numel() == 0:
        return batch
    return {**batch, "logits_to_keep": positions, "shift_labels": targets[:, positions]}


def supported(model) -> bool:
    """The causal LM's forward takes logits_to_keep (PEFT passes it through)."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(causal.forward).parameters


@torch.no_grad()
def check(model, batch: dict) -> dict:
    """The loss of `batch` from every logit and from the kept ones, in eval mode (no dropout).
    'used' is False (with the reason) when the model does not take the kept path, fails on
    it, or gives a loss that differs beyond the tolerance of the logits' dtype."""
    if not supported(model):
        return {"used": False, "reason": f"{type(model).__name__}.forward takes no logits_to_keep"}
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    kept = keep(batch)
    with in_mode(model, training=False):
        full = model(**batch)
        try:
            fast = model(**kept)
        except (RuntimeError, ValueError, TypeError) as err:  # e.g. all logits, fewer targets
            return {"used": False, "reason": f"the model failed on kept positions: {err}"}
    wanted = kept["logits_to_keep"].numel() if "logits_to_keep" in kept else batch["input_ids"].shape[1]
    gap = abs(float(full.loss) - float(fast.loss))
    tolerance = LOSS_TOLERANCE.get(full.logits.dtype, 1e-2) * max(1.0, abs(float(full.loss)))
    result = {"positions_kept": wanted, "positions": int(batch["input_ids"].shape[1]),
              "loss_gap": gap, "tolerance": tolerance}
    if fast.logits.shape[1] != wanted:
        return {"used": False, "reason": f"the model computed {fast.logits.shape[1]} positions' "
                                         f"logits, not the {wanted} asked for", **result}
    if not gap <= tolerance:  # NaN included
        return {"used": False, "reason": f"the loss from kept positions differs by {gap:.2e} "
                                         f"(tolerance {tolerance:.1e})", **result}
    return {"used": True, **result}
