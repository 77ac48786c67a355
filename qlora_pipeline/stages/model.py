"""Stages of rules/model.smk: import the base model once, quantize it, measure what that cost."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from ..core import disk, memory
from ..core.errors import InputError
from ..core.files import read_json, write_json
from ..core.policy import Policy
from ..core.seeding import seed_everything
from . import Input, Inputs, Output

log = logging.getLogger(__name__)


def import_base_model(*, base: Output, base_model: dict, policy: Policy,
                      source: Inputs = ()) -> None:
    """The configured base (GGUF file, hub repository or local folder) as one HF safetensors
    checkpoint with its tokenizer and chat template. `source`: the GGUF file or local folder
    (declared, so that provenance records what was read; a hub model has none)."""
    from ..models import importer

    model, tokenizer = importer.load(base_model)
    disk.check("import_base_model", {base: disk.weights_bytes(model.parameters(), len(tokenizer))})
    log.info("%s: %d parameters, %s", type(model).__name__,
             sum(p.numel() for p in model.parameters()), model.dtype)
    importer.save(model, tokenizer, base)


def quantize(*, base: Input, quantized: Output, quantization: dict, seed: int,
             policy: Policy) -> None:
    """The base quantized and saved, with per-layer errors, stored bits/param and the numerics
    check in quantization.json. Nothing is saved when the check fails."""
    from ..models import quantization as quant

    seed_everything(seed)
    disk.check_stage("quantize", base, {quantized: ["quantized"]}, bits=_bits(quantization))
    model, rows, checked = _quantized_and_measured(base, quantization, policy, "quantize")
    quant.save(model, base, quantized)
    summary = quant.summarize(rows, quantization, quant.saved_compute_dtype(model),
                              quant.checkpoint_bytes(quantized), quant.checkpoint_bytes(base))
    write_json(quantized / "quantization.json",
               {"summary": summary, "layers": rows, "numerics_check": checked})
    log.info("quantization summary: %s", summary)


def quantize_for_training(*, base: Input, quantized: Output, quantization: dict, lora: dict,
                          seed: int, policy: Policy) -> None:
    """A training's own quantized base (`lora`: trainings.base_settings of its row): PiSSA's
    residual W − s·BA, or LoftQ's R after its alternating steps, quantized and measured as the
    quantize stage does, with the initial adapter in `initial/` and its check in
    quantization.json. Nothing is saved when a check fails."""
    from ..models import quantization as quant
    from ..training import init

    seed_everything(seed)
    cfg = {**lora, "dropout": 0.0, "use_dora": False}  # neither changes the initialisation
    # the residual base (full precision, beside the output until quantized), and the output
    disk.check_stage("quantize_for_training", base, {quantized: ["model", "quantized", "adapter"]},
                     bits=_bits(quantization), lora=lora)
    with tempfile.TemporaryDirectory(dir=Path(quantized).parent) as residual:
        if lora["init"] == "pissa":  # the initial adapter is PiSSA's, before quantization
            initialised = init.pissa_residual(base, residual, quantized / "initial", cfg, seed,
                                              policy)
        else:
            init.loftq_residual_base(base, residual, cfg, quantization, policy)
        model, rows, checked = _quantized_and_measured(residual, quantization, policy,
                                                       "quantize_for_training")
    quant.save(model, base, quantized)
    summary = quant.summarize(rows, quantization, quant.saved_compute_dtype(model),
                              quant.checkpoint_bytes(quantized), quant.checkpoint_bytes(base))
    if lora["init"] == "loftq":  # A, B of the error left by the base just quantized
        initialised = init.loftq_initial(model, base, cfg, quantized / "initial")
    write_json(quantized / "quantization.json",
               {"summary": summary, "layers": rows, "numerics_check": checked,
                "initialisation": initialised})


def _quantized_and_measured(base, settings: dict, policy: Policy, stage: str, seq: int = 1):
    """(model, layer rows, numerics check): the base quantized by `settings` in memory, each
    layer's error against the base, and the check (which fails the job when a layer does not
    compute the configured math)."""
    from ..models import numerics
    from ..models import quantization as quant
    from ..models.checkpoint import Checkpoint

    # On the CPU the full-precision file is mapped and read whole while it quantizes.
    memory.check_stage(stage, base, policy, weights="4bit" if policy.cuda else "full+4bit",
                       seq=seq, bits=_bits(settings),
                       remedy="a GPU with more memory (the quantized weights must fit)")
    model = quant.quantize(base, settings, policy)
    rows = quant.layer_errors(model, Checkpoint(base))  # one base tensor at a time
    if not rows:
        raise InputError(f"quantization: no linear layer of {base} was quantized "
                         f"(skip_modules {settings['skip_modules']}); expected at least one")
    return model, rows, numerics.check(model, quant.saved_compute_dtype(model))


def _bits(settings: dict) -> float:
    """Bits per quantized weight by the method's formula (docs/quantization.md)."""
    from ..models import methods

    return methods.of(settings["method"]).theoretical_bits(settings)


def quantization_sweep_point(*, base: Input, tokenized: Inputs, report: Output, point: dict,
                             tasks: list, max_examples: int, seed: int, policy: Policy) -> None:
    """One `quantization_sweep` method measured, not saved (`report`: a folder of report.json):
    bits/param, weight error and the numerics check as the quantize stage's, and validation
    perplexity per task."""
    from ..models import methods, perplexity
    from ..models import quantization as quant

    seed_everything(seed)
    validation = _validation(tasks, tokenized)
    disk.check_stage("quantization_sweep_point", base, {report: ["records"]})
    model, rows, checked = _quantized_and_measured(base, point, policy,
                                                   "quantization_sweep_point",
                                                   seq=_longest(validation))
    summary = quant.summarize(rows, point, quant.saved_compute_dtype(model),
                              quant.model_bytes(model), quant.checkpoint_bytes(base))
    ppl = {task: perplexity.perplexity(model, examples, max_examples)
           for task, examples in validation.items()}
    write_json(report / "report.json",
               {"label": methods.of(point["method"]).label(point), "settings": point,
                "summary": summary,
                "perplexity": ppl, "layers": rows, "numerics_check": checked})


def _validation(tasks: list, tokenized: list) -> dict:
    from datasets import load_from_disk

    if len(tokenized) != len(tasks):
        raise ValueError(f"{len(tokenized)} tokenized folders for tasks {tasks}; expected one "
                         f"per task, in the same order")
    return {task: load_from_disk(str(path))["validation"] for task, path in zip(tasks, tokenized)}


def _longest(validation: dict) -> int:
    return max(len(ids) for rows in validation.values() for ids in rows["input_ids"])


def quantization_report(*, base: Input, quantized: Input, tokenized: Inputs, report: Output,
                        markdown: Output, tasks: list, max_examples: int,
                        policy: Policy) -> None:
    """Weight-level numbers from the quantize stage plus validation perplexity of the full
    precision and the quantized base. `tokenized`: each task's folder, in the order of `tasks`."""
    from ..models import quantization as quant
    from ..models.perplexity import perplexities
    from ..report.quantization import report_markdown

    validation = _validation(tasks, tokenized)
    # One model at a time; on the CPU the allocator keeps the first one's memory while
    # the second loads (as in the merge), so both count there.
    memory.check_stage("quantization_report", base, policy,
                       weights="full" if policy.cuda else "full+4bit", seq=_longest(validation),
                       offload=True, remedy="a GPU with more memory",
                       bits=quant.stored_bits(quantized))
    numbers = {**read_json(Path(quantized) / "quantization.json"),
               "perplexity": perplexities(base, quantized, validation, max_examples, policy)}
    write_json(report, numbers)
    markdown.write_text(report_markdown(numbers), encoding="utf-8")
