"""One adapter trained as a stage's output: prepare the model, check that exactly the adapter
trains, train it, save it with its metrics and summary. What train_qlora, recover and a sweep
point's training share (stages/train.py, stages/sweep.py), kept outside the stage modules so
that each rule's code digest reaches only what it runs."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from .. import provenance as prov
from ..outputs import stage_outputs, write_json
from ..policy import Policy
from ..runtime import seed_everything
from . import loop
from .lora import verify_frozen

log = logging.getLogger(__name__)


def train_adapter(stage: str, *, adapter, tokenized, tokenizer_dir, train: dict, seed: int,
                   checkpoints, policy: Policy, config: dict, inputs: dict, prepare,
                   tensorboard=None) -> dict:
    """Prepare the model, check that exactly the adapter trains, train it, save the adapter
    with its metrics and summary. Checkpoints live outside the output so that an interrupted
    job resumes; they are removed once the adapter is complete. `tensorboard`: a folder for
    the training curves as TensorBoard event files (outside the output too: they are written
    while the job runs)."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    with stage_outputs(stage, {"adapter": adapter}, config=config, inputs=inputs,
                       policy=policy, seed=seed) as out:
        seed_everything(seed)
        resume_dir = checkpoint_dir(Path(checkpoints), config, inputs)
        model, expected = prepare()
        params = verify_frozen(model, expected)
        log.info("trainable: %s", params)
        summary = loop.train(model, AutoTokenizer.from_pretrained(tokenizer_dir),
                             load_from_disk(str(tokenized)), train, resume_dir,
                             resume_dir / "metrics.jsonl", seed, policy,
                             tensorboard=tensorboard)
        summary.update(params)
        log.info("summary: %s", summary)
        model.save_pretrained(out["adapter"])
        if (resume_dir / "metrics.jsonl").exists():
            shutil.copy2(resume_dir / "metrics.jsonl", out["adapter"] / "metrics.jsonl")
        write_json(out["adapter"] / "summary.json", summary)
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
        prepare=lambda: prepare_recovery(base, qlora, policy, checkpointing(train, policy)))


def checkpointing(train: dict, policy: Policy) -> bool:
    return policy.gradient_checkpointing(train["gradient_checkpointing"])


def checkpoint_dir(root: Path, config: dict, inputs: dict) -> Path:
    """Keyed by the config and the inputs' own provenance: resume only a run that would have
    produced the same adapter; discard the others."""
    stamps = {k: prov.checksum(Path(p) / "provenance.json") for k, p in inputs.items()}
    key = prov.config_hash({"config": config, "inputs": stamps})
    loop.discard_stale_checkpoints(root, keep=key)
    (root / key).mkdir(parents=True, exist_ok=True)
    return root / key
