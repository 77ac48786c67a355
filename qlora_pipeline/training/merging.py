"""Merging an adapter into a base, and checking what the merged weights compute.

Two merge bases: `full` (the full-precision W0: what users usually ship) and `dequantized`
(deq(Q(W0)): the weights the QLoRA adapter was actually trained against). The check compares
logits of the merged model with (a) the same base + the adapter unmerged (does the merge
arithmetic hold?) and (b) the quantized base + the adapter (is it the model that was trained?).
The merge itself streams the base's shards (streamed_merge.py), so it never holds the model.
"""

from __future__ import annotations

import gc
import logging

import torch

from . import streamed_merge

log = logging.getLogger(__name__)


def resolve_base(setting: str, recovered: bool) -> str:
    """'auto': the weights the final adapter was last trained against. A QLoRA adapter was
    trained on deq(Q(W0)); a recovered one was last trained on W0."""
    if setting != "auto":
        return setting
    return "full" if recovered else "dequantized"


def load_base(kind: str, base_dir, quant_dir, policy):
    from ..models.quantization import dequantized, load_full_precision, load_quantized

    if kind == "full":
        return load_full_precision(base_dir, policy, offload=True)
    # deq(Q(W)) for every quantized layer, in the compute dtype; the rest as stored.
    return dequantized(load_quantized(quant_dir, policy))


def with_adapter(model, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir)


def logits(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """The model's logits on each prompt, the model freed before the next one loads."""
    model.eval()
    dev = next(model.parameters()).device
    with torch.no_grad():
        out = [model(input_ids=torch.tensor([ids], device=dev)).logits[0].float().cpu()
               for ids in prompts]
    del model
    gc.collect()
    return out


def gaps(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict:
    """Largest and mean |logit difference|, and how often the top-1 next token agrees."""
    diffs = [(x - y).abs() for x, y in zip(a, b)]
    agree = sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(a, b))
    return {"max_abs_logit_gap": max(float(d.max()) for d in diffs),
            "mean_abs_logit_gap": float(torch.cat([d.flatten() for d in diffs]).mean()),
            "top1_agreement": agree / sum(x.shape[0] for x in a)}


def merge_and_check(kind: str, base_dir, quant_dir, adapter_dir, out_dir, prompts,
                    trained_logits, policy, max_shard_bytes: int) -> dict:
    """Merge the adapter into base `kind`, streamed shard by shard into `out_dir`, then the two
    logit gaps: the merged model (loaded once) against the same base + the adapter unmerged
    (does the merge arithmetic hold?) and against the model as trained. One model is in memory
    at a time."""
    from ..models.quantization import load_full_precision

    streamed = streamed_merge.merge(base_dir if kind == "full" else quant_dir, adapter_dir,
                                    out_dir, policy.full_precision_dtype, max_shard_bytes)
    merged_logits = logits(load_full_precision(out_dir, policy, offload=True), prompts)
    unmerged = logits(with_adapter(load_base(kind, base_dir, quant_dir, policy), adapter_dir),
                      prompts)
    check = {"vs_unmerged": gaps(merged_logits, unmerged),
             "vs_trained": gaps(merged_logits, trained_logits), "streamed": streamed}
    log.info("merge check (%s): %s", kind, check)
    return check


def trained_model_logits(quant_dir, adapter_dir, prompts, policy) -> list[torch.Tensor]:
    """Logits of the model as trained: the quantized base with the adapter on top."""
    from ..models.quantization import load_quantized

    return logits(with_adapter(load_quantized(quant_dir, policy), adapter_dir), prompts)
