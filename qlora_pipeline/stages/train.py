"""Stages of rules/train.smk: a QLoRA adapter per task, an optional full-precision recovery of
it, and the merge of the task's final adapter into a standalone model. QLoRA and recovery are
one training routine (training/train_job.py) with two ways of preparing the model."""

from __future__ import annotations

import logging
import tempfile

from .. import memory
from ..outputs import stage_outputs, write_json
from ..policy import Policy

# The training modules import torch, transformers and PEFT: each stage imports them itself, so
# that its script can hand the job to a warm-start server before paying for them.
log = logging.getLogger(__name__)


def train_qlora(*, quantized, tokenized, adapter, lora: dict, train: dict, seed: int,
                checkpoints, tensorboard=None, policy: Policy) -> dict:
    """LoRA injected into the saved quantized base (quantize first, then inject), trained."""
    from ..training.train_job import train_qlora_adapter

    return train_qlora_adapter(
        "train_qlora", quantized=quantized, tokenized=tokenized, adapter=adapter, lora=lora,
        train=train, seed=seed, checkpoints=checkpoints, tensorboard=tensorboard, policy=policy)


def recover(*, base, qlora, tokenized, adapter, train: dict, seed: int, checkpoints,
            tensorboard=None, policy: Policy) -> dict:
    """The QLoRA adapter continued briefly on the full-precision base it will be merged into.
    `train`: recovery's effective training settings (config.recovery_train)."""
    from ..training.train_job import recover_adapter

    return recover_adapter(
        "recover", base=base, qlora=qlora, tokenized=tokenized, adapter=adapter, train=train,
        seed=seed, checkpoints=checkpoints, tensorboard=tensorboard, policy=policy)


def merge(*, base, quantized, adapter, tokenized, merged, merge: dict, recovered: bool,
          policy: Policy) -> dict:
    """The task's final adapter merged into the configured base, saved with merge_check.json:
    its logit gaps to the unmerged model and to the model as trained."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from ..models.quantization import stored_bits
    from ..training import merging
    from ..training.lora import check_adapter

    check_adapter(adapter, "merge")
    with stage_outputs("merge", {"merged": merged}, config=merge, policy=policy,
                       inputs={"base": base, "quantized": quantized, "adapter": adapter}) as out:
        test = load_from_disk(str(tokenized))["test"]
        prompts = [e["input_ids"] for e in test.select(range(min(merge["check_examples"],
                                                                 len(test))))]
        # On the CPU the 4-bit model (trained logits), the merged one and the base it is
        # checked against load one after the other; the allocator keeps each one's memory.
        memory.check_stage("merge", base, policy, weights="full" if policy.cuda else "merge",
                           seq=max(map(len, prompts), default=1), offload=True,
                           remedy="a GPU with more memory", bits=stored_bits(quantized))
        trained = merging.trained_model_logits(quantized, adapter, prompts, policy)
        chosen = merging.resolve_base(merge["base"], recovered)
        others = [k for k in ("full", "dequantized") if k != chosen] if merge["compare_bases"] else []
        shard_bytes = merge["max_shard_mb"] * 1024 ** 2
        checks = {}
        for kind in others:  # checked, then deleted (inside the output's temporary folder)
            with tempfile.TemporaryDirectory(dir=out["merged"]) as scratch:
                checks[kind] = merging.merge_and_check(kind, base, quantized, adapter, scratch,
                                                       prompts, trained, policy, shard_bytes)
        checks[chosen] = merging.merge_and_check(chosen, base, quantized, adapter, out["merged"],
                                                 prompts, trained, policy, shard_bytes)
        AutoTokenizer.from_pretrained(base).save_pretrained(out["merged"])
        write_json(out["merged"] / "merge_check.json", {"chosen": chosen, "recovered": recovered,
                                                         "examples": len(prompts), "checks": checks})
    return checks
