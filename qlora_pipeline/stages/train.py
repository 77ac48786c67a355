"""Stages of rules/train.smk: a QLoRA adapter per task, an optional full-precision recovery of
it, and the merge of the task's final adapter into a standalone model. QLoRA and recovery are
one training routine (`_train_adapter`) with two ways of preparing the model."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from .. import provenance as prov
from ..outputs import stage_outputs, write_json
from ..policy import Policy
from ..runtime import seed_everything
from ..training import loop
from ..training.lora import check_adapter, prepare_qlora, prepare_recovery, verify_frozen

log = logging.getLogger(__name__)


def train_qlora(*, quantized, tokenized, adapter, lora: dict, train: dict, seed: int,
                checkpoints, policy: Policy) -> dict:
    """LoRA injected into the saved quantized base (quantize first, then inject), trained."""
    return _train_adapter(
        "train_qlora", adapter=adapter, tokenized=tokenized, tokenizer_dir=quantized,
        train=train, seed=seed, checkpoints=checkpoints, policy=policy,
        config={"lora": lora, "train": train, "seed": seed},
        inputs={"quantized": quantized, "tokenized": tokenized},
        prepare=lambda: prepare_qlora(quantized, lora, policy,
                                      policy.gradient_checkpointing(train["gradient_checkpointing"])))


def recover(*, base, qlora, tokenized, adapter, train: dict, seed: int, checkpoints,
            policy: Policy) -> dict:
    """The QLoRA adapter continued briefly on the full-precision base it will be merged into.
    `train`: recovery's effective training settings (config.recovery_train)."""
    return _train_adapter(
        "recover", adapter=adapter, tokenized=tokenized, tokenizer_dir=base,
        train=train, seed=seed, checkpoints=checkpoints, policy=policy,
        config={"train": train, "seed": seed},
        inputs={"base": base, "qlora": qlora, "tokenized": tokenized},
        prepare=lambda: prepare_recovery(base, qlora, policy,
                                         policy.gradient_checkpointing(train["gradient_checkpointing"])))


def _train_adapter(stage: str, *, adapter, tokenized, tokenizer_dir, train: dict, seed: int,
                   checkpoints, policy: Policy, config: dict, inputs: dict, prepare) -> dict:
    """Prepare the model, check that exactly the adapter trains, train it, save the adapter
    with its metrics and summary. Checkpoints live outside the output so that an interrupted
    job resumes; they are removed once the adapter is complete."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    with stage_outputs(stage, {"adapter": adapter}, config=config, inputs=inputs,
                       policy=policy, seed=seed) as out:
        seed_everything(seed)
        resume_dir = _checkpoint_dir(Path(checkpoints), config, inputs)
        model, expected = prepare()
        params = verify_frozen(model, expected)
        log.info("trainable: %s", params)
        summary = loop.train(model, AutoTokenizer.from_pretrained(tokenizer_dir),
                             load_from_disk(str(tokenized)), train, resume_dir,
                             resume_dir / "metrics.jsonl", seed, policy)
        summary.update(params)
        log.info("summary: %s", summary)
        model.save_pretrained(out["adapter"])
        if (resume_dir / "metrics.jsonl").exists():
            shutil.copy2(resume_dir / "metrics.jsonl", out["adapter"] / "metrics.jsonl")
        write_json(out["adapter"] / "summary.json", summary)
    shutil.rmtree(resume_dir, ignore_errors=True)  # complete: nothing left to resume
    return summary


def _checkpoint_dir(root: Path, config: dict, inputs: dict) -> Path:
    """Keyed by the config and the inputs' own provenance: resume only a run that would have
    produced the same adapter; discard the others."""
    stamps = {k: prov.checksum(Path(p) / "provenance.json") for k, p in inputs.items()}
    key = prov.config_hash({"config": config, "inputs": stamps})
    loop.discard_stale_checkpoints(root, keep=key)
    (root / key).mkdir(parents=True, exist_ok=True)
    return root / key


def merge(*, base, quantized, adapter, tokenized, merged, merge: dict, recovered: bool,
          policy: Policy) -> dict:
    """The task's final adapter merged into the configured base, saved with merge_check.json:
    its logit gaps to the unmerged model and to the model as trained."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from ..training import merging

    check_adapter(adapter, "merge")
    with stage_outputs("merge", {"merged": merged}, config=merge, policy=policy,
                       inputs={"base": base, "quantized": quantized, "adapter": adapter}) as out:
        test = load_from_disk(str(tokenized))["test"]
        prompts = [e["input_ids"] for e in test.select(range(min(merge["check_examples"],
                                                                 len(test))))]
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
