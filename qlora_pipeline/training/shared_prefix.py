"""Training batches whose rows begin alike: the common beginning computed once.

Instruction data rendered with a chat template start every example with the same tokens (the
template, the system prompt, the instruction: 16 of the builtin `arithmetic`'s 38 tokens, 37
of `topic`'s 64). With no dropout anywhere those positions compute the same activations in
every row, so they need computing once; autograd sums the rows' gradients back into them. Two
layouts, both the same loss and gradients as the whole batch:

- ONE_ROW: the prefix, then every row's own tokens, in a single row; a 4D attention mask lets
  each row's tokens see the prefix and their own earlier tokens only (models/segments.py), and
  position ids restart after the prefix. One forward and one backward per batch. Its attention
  grows with the square of the row's length, so it is used only while that stays within
  ONE_ROW_ATTENTION times the whole batch's attention.
- CACHE: one row of the prefix whose KV cache (transformers' `cache`) is repeated for the
  rows, then the rows' own tokens attending to it: two forwards, no custom mask (for long rows,
  and for attention kernels that take no 4D mask, flash-attention among them).

Each applies only where it is exact: no dropout module with p > 0 (the adapter's or the base's),
no gradient checkpointing (transformers drops the cache under it), rows not packed, and no
labelled token inside the prefix. `check` proves each layout on the model at hand before
training: the loss and every adapter gradient of one batch computed whole and in that layout,
within the dtype's tolerance. summary.json says which layouts were proven (`shared_prefix`), or
why none was.
"""

from __future__ import annotations

import torch

from ..models import label_positions, segments
from ..models.numerics import LOSS_TOLERANCE, in_mode

MIN_PREFIX = 4  # shorter common prefixes save less than the extra forward call costs
CHECK_ROWS = 2
ONE_ROW, CACHE = "one row", "cache"
LAYOUTS = (ONE_ROW, CACHE)  # in order of preference
ONE_ROW_ATTENTION = 4  # the one row's attention may cost up to this many times the batch's
# What a batch may hold for the one-row layout to rebuild all of it.
ONE_ROW_KEYS = {"input_ids", "attention_mask", "labels", "logits_to_keep", "shift_labels"}


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
    length = min(common, int(labelled[0]) - 1) if labelled.numel() else 0  # no label: no loss
    return length if length >= MIN_PREFIX else 0


def split(model, batch: dict, layouts=LAYOUTS) -> dict:
    """The batch in the first of `layouts` that suits it, its common prefix computed once.
    Unchanged if the rows share too little or no layout suits."""
    length = prefix_length(batch)
    if length and ONE_ROW in layouts and _fits_one_row(batch, length):
        return one_row(model, batch, length)
    if length and CACHE in layouts:
        return cached(model, batch, length)
    return batch


def _fits_one_row(batch: dict, length: int) -> bool:
    rows, width = batch["input_ids"].shape
    total = length + rows * (width - length)
    return set(batch) <= ONE_ROW_KEYS and total ** 2 <= ONE_ROW_ATTENTION * rows * width ** 2


def one_row(model, batch: dict, length: int) -> dict:
    """The prefix once, then each row's own tokens, in one row under a segment mask."""
    ids = batch["input_ids"]
    rows, width = ids.shape
    own = width - length
    segment = torch.arange(1, rows + 1, device=ids.device)[:, None].expand(rows, own)
    if "attention_mask" in batch:  # padding after a row's tokens: seen by no real token
        segment = segment.masked_fill(batch["attention_mask"][:, length:] == 0, segments.PAD)
    ids_row = torch.cat([ids[0, :length], ids[:, length:].reshape(-1)])[None]
    out = {
        "input_ids": ids_row,
        "position_ids": torch.cat([torch.arange(length, device=ids.device),
                                   torch.arange(length, width, device=ids.device).repeat(rows)])[None],
        "attention_mask": segments.attention_mask(
            torch.cat([torch.full((length,), segments.CONTEXT, device=ids.device),
                       segment.reshape(-1)])[None], segments.mask_dtype(model)),
        # Row r's last token predicts row r+1's first own token: never labelled (prefix_length)
        "labels": torch.cat([batch["labels"][0, :length], batch["labels"][:, length:].reshape(-1)])[None],
        "use_cache": False,
    }
    if "logits_to_keep" in batch:  # position p of row r is length + r * own + (p - length)
        kept = batch["logits_to_keep"]
        out["logits_to_keep"] = (torch.arange(rows, device=kept.device)[:, None] * own
                                 + kept[None, :]).reshape(-1)
        out["shift_labels"] = batch["shift_labels"].reshape(1, -1)
    return out


def cached(model, batch: dict, length: int) -> dict:
    """The rows' own tokens, with the prefix's KV cache (computed once, repeated per row) in
    place of the prefix."""
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
    """Which layouts training batches may use: each proven on the first CHECK_ROWS rows of a
    training batch, loss and adapter gradients computed whole and in that layout."""
    if found := blockers(model):
        return {"used": False, "reason": "; ".join(found[:3]) + (" …" if len(found) > 3 else "")}
    device = next(model.parameters()).device
    small = {k: v[:CHECK_ROWS].to(device) for k, v in batch.items()
             if k not in ("logits_to_keep", "shift_labels")}
    if "logits_to_keep" in batch:
        small = label_positions.keep(small)
    length = prefix_length(small)
    if not length:
        return {"used": False, "reason": "the rows share no prefix before their first label"}
    dtype = next(p for p in model.parameters() if p.requires_grad).dtype
    result = {"prefix_tokens": length, "positions": int(small["input_ids"].shape[1]),
              "tolerance": LOSS_TOLERANCE.get(dtype, 1e-2), "layouts": [], "refused": {}}
    with in_mode(model, training=True):
        whole = _loss_and_grads(model, small)
        for layout, build in ((ONE_ROW, one_row), (CACHE, cached)):
            gaps = _gaps(model, whole, lambda b=build: b(model, small, length))
            result.update({f"{layout} {k}": v for k, v in gaps.items() if k != "refused"})
            if "refused" in gaps:
                result["refused"][layout] = gaps["refused"]
            elif gaps["loss_gap"] <= result["tolerance"] and gaps["grad_gap"] <= result["tolerance"]:
                result["layouts"].append(layout)
            else:  # NaN included
                result["refused"][layout] = "loss or gradients differ from the whole batch's"
    if not result["layouts"]:
        result["reason"] = "; ".join(f"{k}: {v}" for k, v in result["refused"].items())
    return {"used": bool(result["layouts"]), **result}


def _gaps(model, whole, build) -> dict:
    """Relative gaps of the loss and of the worst adapter gradient to the whole batch's."""
    whole_loss, whole_grads = whole
    try:
        loss, grads = _loss_and_grads(model, build())
    except (RuntimeError, ValueError, TypeError, AttributeError) as err:
        return {"refused": f"the model failed on it: {err}"}
    if set(grads) != set(whole_grads):
        return {"refused": "other parameters got gradients"}
    loss_gap = abs(whole_loss - loss) / max(1.0, abs(whole_loss))
    grad_gap = max((float((grads[n] - g).norm() / g.norm().clamp_min(1e-12))
                    for n, g in whole_grads.items()), default=0.0)
    return {"loss_gap": loss_gap, "grad_gap": grad_gap}
