"""Stages of rules/model.smk: import the base model once, quantize it, measure what that cost."""

from __future__ import annotations

import logging
from pathlib import Path

from .. import memory
from ..errors import InputError
from ..outputs import read_json, stage_outputs, write_json
from ..policy import Policy
from ..runtime import seed_everything

log = logging.getLogger(__name__)


def import_base_model(*, base, base_model: dict, policy: Policy) -> None:
    """The configured base (GGUF file, hub repository or local folder) as one HF safetensors
    checkpoint with its tokenizer and chat template."""
    from ..models import importer

    inputs = {"gguf": importer.gguf_location(base_model)} if base_model["source"] == "gguf" else {}
    if base_model["source"] == "local":
        inputs = {"model": base_model["path"]}
    with stage_outputs("import_base_model", {"base": base}, config=base_model, inputs=inputs,
                       policy=policy) as out:
        model, tokenizer = importer.load(base_model)
        log.info("%s: %d parameters, %s", type(model).__name__,
                 sum(p.numel() for p in model.parameters()), model.dtype)
        importer.save(model, tokenizer, out["base"])


def quantize(*, base, quantized, quantization: dict, seed: int, policy: Policy) -> None:
    """The base quantized and saved, with per-layer errors, stored bits/param and the numerics
    check in quantization.json. Nothing is saved when the check fails."""
    from ..models import numerics
    from ..models import quantization as quant
    from ..models.checkpoint import Checkpoint

    with stage_outputs("quantize", {"quantized": quantized}, config=quantization,
                       inputs={"base": base}, policy=policy, seed=seed) as out:
        seed_everything(seed)
        # On the CPU the full-precision file is mapped and read whole while it quantizes.
        memory.check_stage("quantize", base, policy, weights="4bit" if policy.cuda else "full+4bit",
                           remedy="a GPU with more memory (the 4-bit weights must fit)")
        model = quant.quantize(base, quantization, policy)
        rows = quant.layer_errors(model, Checkpoint(base))  # one base tensor at a time
        if not rows:
            raise InputError(f"quantization: no linear layer of {base} was quantized "
                             f"(skip_modules {quantization['skip_modules']}); expected at least one")
        dtype = policy.compute_dtype(quantization["compute_dtype"])
        checked = numerics.check(model, dtype)  # fails the job if the math is not the configured
        quant.save(model, base, out["quantized"])
        summary = quant.summarize(rows, quantization, dtype, out["quantized"], Path(base))
        write_json(out["quantized"] / "quantization.json",
                   {"summary": summary, "layers": rows, "numerics_check": checked})
        log.info("quantization summary: %s", summary)


def quantization_report(*, base, quantized, tokenized: list, report, markdown, provenance,
                        tasks: list, max_examples: int, policy: Policy) -> None:
    """Weight-level numbers from the quantize stage plus validation perplexity of the full
    precision and the quantized base. `tokenized`: each task's folder, in the order of `tasks`."""
    from datasets import load_from_disk

    from ..models import quantization_report as qreport

    if len(tokenized) != len(tasks):
        raise ValueError(f"quantization_report: {len(tokenized)} tokenized folders for tasks "
                         f"{tasks}; expected one per task, in the same order")
    outputs = {"report": report, "markdown": markdown, "provenance": provenance}
    with stage_outputs("quantization_report", outputs, config={"max_examples": max_examples},
                       inputs={"base": base, "quantized": quantized, **dict(zip(tasks, tokenized))},
                       policy=policy) as out:
        validation = {task: load_from_disk(str(path))["validation"]
                      for task, path in zip(tasks, tokenized)}
        longest = max(len(ids) for rows in validation.values() for ids in rows["input_ids"])
        # One model at a time; on the CPU the allocator keeps the first one's memory while
        # the second loads (as in the merge), so both count there.
        memory.check_stage("quantization_report", base, policy,
                           weights="full" if policy.cuda else "full+4bit", seq=longest,
                           offload=True, remedy="a GPU with more memory")
        numbers = {**read_json(Path(quantized) / "quantization.json"),
                   "perplexity": qreport.perplexities(base, quantized, validation, max_examples,
                                                      policy)}
        write_json(out["report"], numbers)
        out["markdown"].write_text(qreport.markdown(numbers), encoding="utf-8")
