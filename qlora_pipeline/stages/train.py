"""Stages of rules/train.smk: any training of the trainings table (a task's own, a sweep
point's) as a QLoRA adapter, its optional full-precision recovery, and the merge of a task's
final adapter into a standalone model. QLoRA and recovery are one training routine (`_train`)
with two ways of preparing the model (training/lora.py)."""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
from pathlib import Path

from ..core import disk, memory
from ..core.files import checksum, config_hash, write_json
from ..core.policy import Policy
from ..core.seeding import seed_everything
from . import Input, Inputs, Output

# The training modules import torch, transformers and PEFT: each stage imports them itself, so
# that its job can be handed to a warm-start server before paying for them.
log = logging.getLogger(__name__)


def train_qlora(*, quantized: Input, tokenized: Input, adapter: Output, lora: dict,
                train: dict, seed: int, checkpoints, trackers=None, policy: Policy,
                base: Inputs = ()) -> dict:
    """LoRA injected into the saved quantized base (quantize first, then inject), trained.
    `quantized`: the shared base, or the training's own (rule quantize_for_training); `base`:
    the full-precision base, for LoftQ on the shared one (training/init.py). `trackers`: where
    the curves go (layout.trackers; no rerun trigger, in no checkpoint key)."""
    from ..training.init import prepare

    return _train("train_qlora", adapter, tokenized, quantized, train, seed, checkpoints,
                  trackers, policy, weights="stored", lora=lora,
                  key={"lora": lora, "train": train, "seed": seed,
                       "inputs": [quantized, tokenized, *base]},
                  prepare=functools.partial(prepare, quantized, lora, policy,
                                            base_dir=base[0] if base else None))


def recover(*, base: Input, qlora: Input, tokenized: Input, adapter: Output, train: dict,
            seed: int, checkpoints, trackers=None, policy: Policy) -> dict:
    """The QLoRA adapter continued briefly on the full-precision base it will be merged into.
    `train`: recovery's effective training settings (config.recovery_train)."""
    from ..training.lora import prepare_recovery, saved_lora

    return _train("recover", adapter, tokenized, base, train, seed, checkpoints, trackers,
                  policy, weights="full", lora=saved_lora(qlora, "recovery"),
                  key={"train": train, "seed": seed, "inputs": [base, qlora, tokenized]},
                  prepare=functools.partial(prepare_recovery, base, qlora, policy))


def _train(stage: str, adapter, tokenized, model_dir, train: dict, seed: int, checkpoints,
           trackers, policy: Policy, *, weights: str, lora: dict, key: dict, prepare) -> dict:
    """Prepare the model, check that exactly the adapter trains, train it, save the adapter
    with its metrics and summary. Checkpoints live outside the output, under a key of the
    settings and the inputs' provenance, so that an interrupted job resumes (the job removes
    them once the adapter is in place). `weights` (how `model_dir` loads) and `lora` (r,
    target_modules): for the memory estimate (memory.py), which is logged. `prepare(gradient
    checkpointing, total steps)`: (the model, its expected trainable count)."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from ..analysis.monitor import AdapterMonitor
    from ..models import tokenizer_files
    from ..training import distributed, loop
    from ..training.init import save_converted, save_initial
    from ..training.lora import WEIGHT_DERIVED, verify_frozen

    with distributed.rank_folder(adapter) as out:  # rank 0's lands
        seed_everything(seed)  # every rank alike: the same adapter initialisation
        # Keyed by the settings and the inputs' own provenance: resume only a run that would
        # have produced the same adapter; discard the others.
        stamps = [checksum(Path(p) / "provenance.json") for p in key["inputs"]]
        resume_dir = loop.resume_folder(Path(checkpoints), config_hash({**key, "inputs": stamps}))
        data = load_from_disk(str(tokenized))
        checkpointing = policy.gradient_checkpointing(train["gradient_checkpointing"])
        # The training's peak estimated (memory.py) from its longest batch: batch_size rows of
        # the longest training row; refused before loading if it cannot fit.
        memory.check_stage(
            stage, model_dir, policy, weights=weights, batch=train["batch_size"],
            seq=max(len(ids) for ids in data["train"]["input_ids"]), lora=lora, training=True,
            checkpointing=checkpointing, optimizer=policy.optimizer(train["optimizer"]),
            remedy="train.batch_size smaller (with gradient_accumulation larger), "
                   "tokenize.max_length shorter, gradient_checkpointing on, or "
                   "train.distributed",
            shards=distributed.fsdp_shards(train["distributed"]))
        disk.check_stage(stage, model_dir, {out: ["adapter"], checkpoints: ["checkpoints"]},
                         lora=lora, optimizer=policy.optimizer(train["optimizer"]))
        model, expected = prepare(checkpointing, loop.total_steps(train, len(data["train"])))
        if lora.get("init") in WEIGHT_DERIVED:  # the adapter carries part of the base
            save_initial(model, out / "initial")
        params = verify_frozen(model, expected)
        log.info("trainable: %s", params)
        metrics = resume_dir / "metrics.jsonl"
        summary = loop.train(model, AutoTokenizer.from_pretrained(model_dir), data, train,
                             resume_dir, metrics, seed, policy, trackers=trackers,
                             save_to=out, observers=(AdapterMonitor(metrics),)
                             if distributed.is_main() else ())
        if lora.get("init") in WEIGHT_DERIVED and distributed.is_main():
            save_converted(model, out)
        summary.update(params)
        log.info("summary: %s", summary)
        if metrics.exists():
            shutil.copy2(metrics, out / "metrics.jsonl")
        write_json(out / "summary.json", summary)
        tokenizer_files.copy(model_dir, out)  # chat template, EOS, generation settings
    return summary


def promote_sweep_point(*, results: Inputs, adapters: Inputs, trainings: Inputs,
                        adapter: Output, table: dict, task: str, name: str,
                        policy: Policy) -> str:
    """The point the report's rule chooses (report/sweeps.py), its adapter `name` (qlora or
    recovered) copied as the task's own, with promotion.json: the point, the rule, every
    candidate's score. The adapter's own provenance is kept as trained_provenance.json."""
    from ..report import sweeps

    del results, adapters, trainings  # declared inputs (the job waits for them); read by path
    compared = {**table, "variants": [table["compare"]]}  # only the scores the job waits for
    candidates = sweeps.rows([], {task: compared}, with_analysis=False)
    chosen = sweeps.choose(candidates)
    source = Path(table["points"][chosen["point"]]["adapters"][name])
    shutil.copytree(source, adapter, dirs_exist_ok=True)
    (adapter / "provenance.json").rename(adapter / "trained_provenance.json")
    write_json(adapter / "promotion.json", {
        "point": chosen["point"], "variant": table["compare"], "rule": sweeps.RULE,
        "adapter": str(source), "metric": candidates["metric"].iloc[0],
        "candidates": candidates[["point", "score", "stderr", "trainable_params"]]
        .to_dict("records")})
    log.info("%s: promoted sweep point %s (%.4f) as its %s adapter", task, chosen["point"],
             chosen["score"], name)
    return chosen["point"]


def merge(*, base: Input, quantized: Input, adapter: Input, tokenized: Input, merged: Output,
          merge: dict, recovered: bool, policy: Policy) -> dict:
    """The task's final adapter merged into the configured base, saved with merge_check.json:
    its logit gaps to the unmerged model and to the model as trained."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from ..models import adapter_file
    from ..models.quantization import stored_bits
    from ..training import merging
    from ..training.lora import check_adapter

    check_adapter(adapter, "merge")
    adapter_file.check(adapter, base)
    prompts = load_from_disk(str(tokenized))["test"]["input_ids"][:merge["check_examples"]]
    # On the CPU the 4-bit model (trained logits), the merged one and the base it is
    # checked against load one after the other; the allocator keeps each one's memory.
    memory.check_stage("merge", base, policy, weights="full" if policy.cuda else "merge",
                       seq=max(map(len, prompts), default=1), offload=True,
                       remedy="a GPU with more memory", bits=stored_bits(quantized))
    disk.check_stage("merge", base, {merged: ["model"]}, width=2 if policy.bf16 else 4)
    trained = merging.trained_model_logits(quantized, adapter, prompts, policy)
    chosen = merging.resolve_base(merge["base"], recovered)
    others = [k for k in ("full", "dequantized") if k != chosen] if merge["compare_bases"] else []
    shard_bytes = merge["max_shard_mb"] * 1024 ** 2
    checks = {}
    for kind in others:  # checked, then deleted (inside the output's temporary folder)
        with tempfile.TemporaryDirectory(dir=merged) as scratch:
            checks[kind] = merging.merge_and_check(kind, base, quantized, adapter, scratch,
                                                   prompts, trained, policy, shard_bytes)
    checks[chosen] = merging.merge_and_check(chosen, base, quantized, adapter, merged,
                                             prompts, trained, policy, shard_bytes)
    AutoTokenizer.from_pretrained(base).save_pretrained(merged)
    write_json(merged / "merge_check.json", {"chosen": chosen, "recovered": recovered,
                                             "examples": len(prompts), "checks": checks})
    return checks
