"""Perplexity of a model on tokenized examples, over the tokens that carry loss; and what
quantizing the base cost in it, task by task (the quantization_report stage)."""

from __future__ import annotations

import gc
import logging
import math

import torch

from ..core.policy import Policy
from . import quantization
from .label_positions import supported

log = logging.getLogger(__name__)


@torch.no_grad()
def perplexity(model, examples, max_examples: int) -> dict:
    """Token-weighted mean negative log-likelihood of the labelled tokens, and its exp.

    One example per forward pass: no padding, so the number is exact and batch-independent.
    The output head runs only at positions that predict a labelled token where the model
    takes `logits_to_keep` (a quarter of the time on SmolLM2; models/label_positions.py).
    """
    model.eval()
    device = next(model.parameters()).device
    kept = supported(model)
    total_nll, total_tokens = 0.0, 0
    for example in list(examples)[:max_examples]:
        input_ids = torch.tensor([example["input_ids"]], device=device)
        # Token t is predicted from position t - 1: shift, as transformers' own loss does.
        shift_labels = torch.tensor(example["labels"][1:], device=device)
        positions = (shift_labels != -100).nonzero().flatten()
        if kept:
            logits = model(input_ids=input_ids, logits_to_keep=positions).logits[0]
            shift_labels = shift_labels[positions]
        else:
            logits = model(input_ids=input_ids).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits.float(), shift_labels, ignore_index=-100,
                                                reduction="sum")
        total_nll += nll.item()
        total_tokens += int((shift_labels != -100).sum())
    mean = total_nll / max(total_tokens, 1)
    return {"nll": mean, "perplexity": math.exp(mean), "tokens": total_tokens}


def perplexities(base_dir, quantized_dir, validation: dict, max_examples: int,
                 policy: Policy) -> dict[str, dict]:
    """task -> {"full_precision": ..., "quantized": ...}; one model in memory at a time."""
    loaders = {"full_precision": lambda: quantization.load_full_precision(base_dir, policy,
                                                                          offload=True),
               "quantized": lambda: quantization.load_quantized(quantized_dir, policy)}
    results: dict[str, dict] = {task: {} for task in validation}
    for variant, load in loaders.items():
        model = load()
        for task, examples in validation.items():
            results[task][variant] = perplexity(model, examples, max_examples)
            log.info("%s %s: %s", task, variant, results[task][variant])
        del model
        gc.collect()
    return results
