"""Perplexity of a model on tokenized examples, over the tokens that carry loss."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def perplexity(model, examples, max_examples: int) -> dict:
    """Token-weighted mean negative log-likelihood of the labelled tokens, and its exp.

    One example per forward pass: no padding, so the number is exact and batch-independent.
    """
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for example in list(examples)[:max_examples]:
        input_ids = torch.tensor([example["input_ids"]], device=device)
        labels = torch.tensor([example["labels"]], device=device)
        logits = model(input_ids=input_ids).logits.float()
        # Token t is predicted from positions < t: shift, as transformers' own loss does.
        shift_logits, shift_labels = logits[0, :-1], labels[0, 1:]
        nll = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100,
                                                reduction="sum")
        total_nll += nll.item()
        total_tokens += int((shift_labels != -100).sum())
    mean = total_nll / max(total_tokens, 1)
    return {"nll": mean, "perplexity": math.exp(mean), "tokens": total_tokens}
