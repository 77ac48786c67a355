"""Training batches whose rows begin alike: the common beginning computed once.

Instruction data rendered with a chat template start every example with the same tokens (the
template, the system prompt, the instruction: 16 of the builtin `arithmetic`'s 38 tokens, 37
of `topic`'s 64). With no dropout anywhere those positions compute the same activations in
every row, so a batch is computed as one row of the common prefix, whose keys and values are
then repeated for every row (autograd sums their gradients back into the one prefix), and the
rows' own tokens after it, attending to that cache: the same loss and the same gradients with
the prefix's share of the work done once instead of once per row. Transformers' KV cache does
the attention part; this module only splits the batch (`split`).

It applies only where it is exact: no dropout module with p > 0 (the adapter's or the base's),
no gradient checkpointing (transformers drops the cache under it), rows not packed, and no
labelled token inside the prefix. `check` proves it on the model at hand before training:
the loss and every adapter gradient of one batch computed both ways, within the dtype's
tolerance; otherwise batches are computed whole and summary.json says why (`shared_prefix`).
"""

from __future__ import annotations

import torch

from ..models import label_positions
from ..models.numerics import LOSS_TOLERANCE

MIN_PREFIX = 4  # shorter common prefixes save less than the extra forward call costs
CHECK_ROWS = 2


def prefix_length(batch: dict) -> int:
    """Tokens every row starts with, stopping before the position that predicts the first
    labelled token (its logits must come from the rows' own forward)."""
    ids, labels = batch["input_ids"], batch["labels"]
    if ids.shape[0] < 2 or "position_ids" in batch:  # one row, or packed rows
        return 0
    same = (ids == ids[:1]).all(dim=0)
    if "attention_mask" in batch:
        same &= batch["attention_mask"].bool().all(dim=0)
    common = int(same.long().cumprod(dim=0).sum())
    labelled = (labels != label_positions.IGNORE).any(dim=0).nonzero()
    if labelled.numel() == 0:
        return 0
    length = min(common, int(labelled[0]) - 1)
    return length if length >= MIN_PREFIX else 0


def split(model, batch: dict) -> dict:
    """The batch's inputs for the rows' own tokens, with the common prefix's KV cache (computed
    once, repeated per row) in their place. Unchanged if the rows share too little."""
    length = prefix_length(batch)
    if not length:
        return batch
    ids = batch["input_ids"]
    rows, width = ids.shape
    head = {"logits_to_keep": 1} if label_positions.supported(model) else {}
    cache = model(input_ids=ids[:1, :length], use_cache=True, **head).cache
    cache.batch_repeat_interleave(rows)
    # use_cache=False: the rows read the prefix's cache; nothing needs theirs kept
    out = {**batch, "input_ids": ids[:, length:], "cache": cache, "use_cache": False,
           "position_ids": torch.arange(length, width, device=ids.device).expand(rows, -1)}
    out["labels"] = batch["labels"][:, length:]  # the model shifts them inside the rows' part
    if "logits_to_keep" in batch:  # kept positions, counted from the rows' first own token
        out["logits_to_keep"] = batch["logits_to_keep"] - length
    return out


def blockers(model) -> list[str]:
    """What makes the prefix differ between rows, or the cache unavailable."""
    found = [f"{name} (dropout p={module.p})" for name, module in model.named_modules()
             if isinstance(module, torch.nn.Dropout) and module.p > 0]
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob"):
        if getattr(config, key, 0) or 0:
            found.append(f"config.{key}={getattr(config, key)}")
    if getattr(model, "is_activation_checkpointing", False):  # transformers 5's name
        found.append("gradient checkpointing (transformers drops the KV cache under it)")
    return found


def _loss_and_grads(model, batch) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def check(model, batch: dict) -> dict:
    """Whether training batches share their prefix: proven on the first CHECK_ROWS rows of a
    training batch, loss and adapter gradients computed whole and split."""
    if found := blockers(model):
        return {"used": False, "reason": "; ".join(found[:3]) + (" …" if len(found) > 3 else "")}
    device = next(model.parameters()).device
    small = {k: v[:CHECK_ROWS].to(device) for k, v in batch.items() if k != "logits_to_keep"}
    if "logits_to_keep" in batch:
        small = label_positions.keep(small)
    length = prefix_length(small)
    if not length:
        return {"used": False, "reason": "the rows share no prefix before their first label"}
    was_training = model.training
    model.train()
    try:
        whole, whole_grads = _loss_and_grads(model, small)
        try:
            shared, shared_grads = _loss_and_grads(model, split(model, small))
        except (RuntimeError, ValueError, TypeError, AttributeError) as err:
            return {"used": False, "reason": f"the model failed on a shared prefix: {err}"}
    finally:
        model.train(was_training)
    dtype = next(p for p in model.parameters() if p.requires_grad).dtype
    tolerance = LOSS_TOLERANCE.get(dtype, 1e-2)
    loss_gap = abs(whole - shared) / max(1.0, abs(whole))
    grad_gap = max((float((shared_grads[n] - g).norm() / g.norm().clamp_min(1e-12))
                    for n, g in whole_grads.items() if n in shared_grads), default=0.0)
    result = {"prefix_tokens": length, "positions": int(small["input_ids"].shape[1]),
              "loss_gap": loss_gap, "grad_gap": grad_gap, "tolerance": tolerance}
    if set(shared_grads) != set(whole_grads):
        return {"used": False, "reason": "other parameters got gradients", **result}
    if not (loss_gap <= tolerance and grad_gap <= tolerance):  # NaN included
        return {"used": False, "reason": "loss or gradients differ from the whole batch's",
                **result}
    return {"used": True, **result}
