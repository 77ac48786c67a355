"""Training batches, and packed sequences in which no example attends to another.

A packed row holds several whole examples, each with position ids restarting at 0
(data/tokenize.pack). Given position ids and *no* attention mask, transformers builds a
block-diagonal causal mask from where the positions restart, for every attention
implementation it has (sdpa, eager, flex; this project installs no flash-attention): that is
its own packed-sequence support, used here rather than a mask of ours. Two conditions, both
easy to miss: no 2D attention mask in the batch, and no KV cache in the forward (with either,
transformers falls back to plain causal attention and examples attend to each other; measured
on the tiny Llama: a loss gap of 0.07). `check_isolation` proves it on the model at hand
before training starts, and fails the job if not.
"""

from __future__ import annotations

import torch
from transformers import DataCollatorForSeq2Seq

from ..core.errors import InputError
from ..models import label_positions
from ..models.numerics import LOSS_TOLERANCE, in_mode

class Collator:
    """Right-padded batches; for packed rows, position ids instead of an attention mask.
    `label_positions`: the output head only where a loss is taken (label_positions.keep)."""

    def __init__(self, tokenizer, label_positions: bool = False):
        self.pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        self.label_positions = label_positions

    def __call__(self, features: list[dict]) -> dict:
        positions = [feature.pop("position_ids", None) for feature in features]
        batch = self.pad(features)
        if positions[0] is not None:
            # Padded as input_ids are, to the longest row; padding: position 0, a sequence of
            # its own
            batch["position_ids"] = torch.nn.utils.rnn.pad_sequence(
                [torch.as_tensor(ids) for ids in positions], batch_first=True,
                padding_side=self.pad.tokenizer.padding_side)
            del batch["attention_mask"]  # with one, transformers would not separate examples
        return label_positions.keep(batch) if self.label_positions else batch


def is_packed(dataset) -> bool:
    return "position_ids" in dataset.column_names


def _loss(logits, ids) -> float:
    return float(torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:]))


@torch.no_grad()
def check_isolation(model, row: dict) -> dict:
    """Each example's loss inside a packed row against its loss alone; raises when a gap is
    above the tolerance of the model's dtype (its examples would see each other)."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    device = next(model.parameters()).device
    with in_mode(model, training=False):
        # the one row as the collator gives it: nothing to pad, and no attention mask
        logits = model(input_ids=torch.tensor([row["input_ids"]], device=device),
                       position_ids=torch.tensor([row["position_ids"]], device=device)).logits[0]
        gap = 0.0
        for start, end in zip(starts[:-1], starts[1:]):
            ids = torch.tensor(row["input_ids"][start:end], device=device)
            alone = model(input_ids=ids[None]).logits[0]
            gap = max(gap, abs(_loss(logits[start:end], ids) - _loss(alone, ids)))
    tolerance = LOSS_TOLERANCE.get(logits.dtype, 1e-2)
    if gap > tolerance:
        raise InputError(f"tokenize.packing: examples packed into one sequence attend to each "
                         f"other in this model ({model.config.model_type}, attention "
                         f"{model.config._attn_implementation}): a loss differs from the "
                         f"example's loss alone by {gap:.2e} (tolerance {tolerance:g}); expected "
                         f"a model whose attention honours packed position ids, or "
                         f"tokenize.packing: false")
    return {"examples": len(starts) - 1, "max_loss_gap": gap, "tolerance": tolerance}
