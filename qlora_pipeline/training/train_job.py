"""One adapter trained as a stage's output: prepare the model, check that exactly the adapter
trains, train it, save it with its metrics and summary. What train_qlora, recover and a sweep
point's training share (stages/train.py, stages/sweep.py), kept outside the stage modules so
that each rule's code digest reaches only what it runs."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from .. import memory
from .. import provenance as prov
from ..models import tokenizer_files
from ..outputs import stage_outputs, write_json
from ..policy import Policy
from ..runtime import seed_everything
from . import distributed, loop
from .lora import verify_frozen

log = logging.getLogger(__name__)


def train_adapter(stage: str, *, adapter, tokenized, tokenizer_dir, train: dict, seed: int,
                   checkpoints, policy: Policy, config: dict, inputs: dict, prepare,
                   weights: str, lora: dict, tensorboard=None) -> dict:
    """Prepare the model, check that exactly the adapter trains, train it, save the adapter
    with its metrics and summary. Checkpoints live outside the output so that an interrupted
    job resumes; they are removed once the adapter is complete. `weights` (how the model in
    `tokenizer_dir` loads) and `lora` (r, target_modules): for the memory estimate
    (memory.py). `tensorboard`: a folder for
    the training curves as TensorBoard event files (outside the output too: they are written
    while the job runs)."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    outputs = stage_outputs(stage, {"adapter": adapter}, config=config, inputs=inputs,
                            policy=policy, seed=seed)
    with distributed.main_outputs(outputs, ["adapter"]) as out:  # rank 0's lands
        seed_everything(seed)  # every rank alike: the same adapter initialisation
        resume_dir = checkpoint_dir(Path(checkpoints), config, inputs)
        data = load_from_disk(str(tokenized))
        estimate = check_memory(stage, tokenizer_dir, weights, data["train"], train, lora,
                                policy)
        model, expected = prepare()
        params = verify_frozen(model, expected)
        log.info("trainable: %s", params)
        summary = loop.train(model, AutoTokenizer.from_pretrained(tokenizer_dir),
                             data, train, resume_dir,
                             resume_dir / "metrics.jsonl", seed, policy,
                             tensorboard=tensorboard, save_to=out["adapter"])
        summary.update(params, memory_estimate=estimate)
        log.info("summary: %s", summary)
        if (resume_dir / "metrics.jsonl").exists():
            shutil.copy2(resume_dir / "metrics.jsonl", out["adapter"] / "metrics.jsonl")
        write_json(out["adapter"] / "summary.json", summary)
        tokenizer_files.copy(tokenizer_dir, out["adapter"])  # chat template, EOS, generation
    if distributed.is_main():
        shutil.rmtree(resume_dir, ignore_errors=True)  # complete: nothing left to resume
    return summary


def train_qlora_adapter(stage: str, *, quantized, tokenized, adapter, lora: dict, train: dict,
                        seed: int, checkpoints, tensorboard, policy: Policy,
                        recorded: dict | None = None) -> dict:
    """LoRA injected into the saved quantized base (quantize first, then inject), trained.
    `recorded`: more for the provenance (a sweep point's swept values)."""
    from .lora import prepare_qlora

    return train_adapter(
        stage, adapter=adapter, tokenized=tokenized, tokenizer_dir=quantized, train=train,
        seed=seed, checkpoints=checkpoints, policy=policy, tensorboard=tensorboard,
        config={"lora": lora, "train": train, "seed": seed, **(recorded or {})},
        inputs={"quantized": quantized, "tokenized": tokenized},
        weights="stored", lora=lora,
        prepare=lambda: prepare_qlora(quantized, lora, policy, checkpointing(train, policy)))


def recover_adapter(stage: str, *, base, qlora, tokenized, adapter, train: dict, seed: int,
                    checkpoints, tensorboard, policy: Policy, recorded: dict | None = None
                    ) -> dict:
    """A QLoRA adapter continued on the full-precision base. `train`: recovery's effective
    training settings (config.recovery_train); `recorded`: more for the provenance."""
    from .lora import prepare_recovery

    return train_adapter(
        stage, adapter=adapter, tokenized=tokenized, tokenizer_dir=base, train=train,
        seed=seed, checkpoints=checkpoints, policy=policy, tensorboard=tensorboard,
        config={"train": train, "seed": seed, **(recorded or {})},
        inputs={"base": base, "qlora": qlora, "tokenized": tokenized},
        weights="full", lora=adapter_lora(qlora),
        prepare=lambda: prepare_recovery(base, qlora, policy, checkpointing(train, policy)))


def check_memory(stage: str, model_dir, weights: str, rows, train: dict, lora: dict,
                 policy: Policy) -> dict:
    """The training's peak estimated (memory.py) from its longest batch: batch_size rows of
    the longest training row; refused before loading if it cannot fit."""
    longest = max(len(ids) for ids in rows["input_ids"])
    return memory.check_stage(
        stage, model_dir, policy, weights=weights, batch=train["batch_size"], seq=longest,
        lora=lora, training=True, checkpointing=checkpointing(train, policy),
        optimizer=policy.optimizer(train["optimizer"]),
        remedy="train.batch_size smaller (with gradient_accumulation larger), "
               "tokenize.max_length shorter, gradient_checkpointing on, or "
               "train.distributed")


def adapter_lora(adapter_dir) -> dict:
    """r and target modules of a saved adapter (recovery continues it: its size)."""
    from .lora import check_adapter

    check_adapter(adapter_dir, "recovery")
    saved = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    targets = saved["target_modules"]
    return {"r": saved["r"], "target_modules": targets if isinstance(targets, str)
            else sorted({t.rsplit(".", 1)[-1] for t in targets})}


def checkpointing(train: dict, policy: Policy) -> bool:
    return policy.gradient_checkpointing(train["gradient_checkpointing"])


def checkpoint_dir(root: Path, config: dict, inputs: dict) -> Path:
    """Keyed by the config and the inputs' own provenance: resume only a run that would have
    produced the same adapter; discard the others."""
    stamps = {k: prov.checksum(Path(p) / "provenance.json") for k, p in inputs.items()}
    key = prov.config_hash({"config": config, "inputs": stamps})
    if distributed.is_main():
        loop.discard_stale_checkpoints(root, keep=key)
    (root / key).mkdir(parents=True, exist_ok=True)
    return root / key
