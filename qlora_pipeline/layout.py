"""Names and paths that the rules, the stages and the schema share, written once.

rules/common.smk builds every output path and every evaluation's inputs from here; the
config schema's variant list is checked against VARIANT_KINDS (tests/test_layout.py).

A variant is what gets scored: `<kind>` for a task's own model (base, quantized, qlora,
recovered, merged), or `<kind>+<source>` for an adapter-bearing kind taken from elsewhere (the
adapter of task <source> scored on this task), or `combined+<name>` for a combination of
several tasks' adapters (config key `combinations`). New kinds (a compressed adapter, a combination,
a sweep point) add an entry to ADAPTERS and reuse everything else: an evaluation loads a model
from which inputs it has (evaluation/harness.py), not from the variant's name.
"""

from __future__ import annotations

import re

from .errors import InputError

ROOT = "results"
RESULTS = ROOT  # this run's folder: results/, or results/<run>/ once use_run has named it

BASE = f"{RESULTS}/models/base"
QUANTIZED = f"{RESULTS}/models/quantized"  # the quantized base, whatever its bits

VARIANT_KINDS = ("base", "quantized", "qlora", "compressed", "recovered", "merged")
# Kinds scored with an adapter, and the base that adapter is put on: the model as trained
# (a compressed adapter is a cut of the QLoRA one, so it goes on the quantized base too).
ADAPTERS = {"qlora": "quantized", "compressed": "quantized", "recovered": "base"}
COMPRESSED_FROM = "qlora"  # the adapter kind the compress stage cuts
COMBINED = "combined"  # a combination of tasks' QLoRA adapters, on the quantized base they share
SCORED_KINDS = (*VARIANT_KINDS, COMBINED)  # every kind, in the report's order
NAME = r"[A-Za-z0-9_-]+"
# A run's top folders: an unnamed run's are in results/ itself, so no run may take their names.
FOLDERS = ("adapters", "analysis", "benchmarks", "checkpoints", "data", "eval", "logs", "models",
           "quantization", "report", "sweeps", "tensorboard")
VARIANT_PATTERN = (rf"(?:base|quantized)|(?:{'|'.join([*ADAPTERS, 'merged'])})"
                   rf"(?:\+{NAME})?|{COMBINED}\+{NAME}")


def use_run(run: str | None) -> None:
    """Put every path of this process under results/<run>/ (config key `run`; None:
    results/). Called once, by rules/common.smk when the config is read: the rules give the
    stages their paths, so no job depends on it."""
    global RESULTS, BASE, QUANTIZED
    if run in FOLDERS:
        raise InputError(f"config key 'run': found {run!r}, a folder every run has; expected "
                         f"another name (not one of {', '.join(FOLDERS)})")
    RESULTS = f"{ROOT}/{run}" if run else ROOT
    BASE = f"{RESULTS}/models/base"
    QUANTIZED = f"{RESULTS}/models/quantized"


def raw(task: str) -> str:
    return f"{RESULTS}/data/{task}/raw"


def tokenized(task: str) -> str:
    return f"{RESULTS}/data/{task}/tokenized"


def eval_spec(task: str) -> str:
    return f"{RESULTS}/eval/tasks/{task}"


def adapter(task: str, kind: str) -> str:
    return f"{RESULTS}/adapters/{task}/{kind}"


def combination(name: str) -> str:
    """A combination's adapter (analysis/combine.py), with combination.json beside it."""
    return f"{RESULTS}/adapters/{COMBINED}/{name}"


def trained_base(kind: str) -> str:
    """The base an adapter kind was trained on (ADAPTERS): the W0 of its ΔW."""
    return {"quantized": QUANTIZED, "base": BASE}[ADAPTERS[kind]]


def analysis(task: str, kind: str) -> str:
    """An adapter's spectral analysis: layers.json, summary.json, analysis.md (analysis/)."""
    return f"{RESULTS}/analysis/{task}/{kind}"


def checkpoints(task: str, kind: str) -> str:
    """Outside every declared output: Snakemake deletes outputs before a rerun, and these must
    survive an interrupted job so that it can resume."""
    return f"{RESULTS}/checkpoints/{task}/{kind}"


def tensorboard(task: str, kind: str, point: str | None = None) -> str:
    """A training's curves as TensorBoard event files (`tensorboard --logdir results/`), outside
    every declared output: they grow while the job runs."""
    return f"{RESULTS}/tensorboard/{task}/" + (f"sweep/{point}/{kind}" if point else kind)


def merged(task: str) -> str:
    return f"{RESULTS}/models/merged/{task}"


def gguf(task: str) -> str:
    """A task's GGUF export: <task>-<type>.gguf per type and export.json (stages/export.py)."""
    return f"{RESULTS}/models/gguf/{task}"


def sweep_point(task: str, point: str) -> str:
    """One sweep point's outputs (sweeps.py names the point): adapter/ and analysis/ of its
    QLoRA training (in the folder named for the training), recovered/, eval/<variant>/."""
    return f"{RESULTS}/sweeps/{task}/{point}"


def sweep_adapter(task: str, point: str, kind: str = "qlora") -> str:
    """qlora: the adapter of training `point`; recovered: point `point`'s recovery of it."""
    return f"{sweep_point(task, point)}/{'adapter' if kind == 'qlora' else kind}"


def sweep_evaluation(task: str, point: str, variant: str) -> dict[str, str]:
    """The point scored as `variant`: its adapter on the base it was trained on."""
    return scored(f"{sweep_point(task, point)}/eval/{variant}")


def sweep_analysis(task: str, training: str) -> str:
    return f"{sweep_point(task, training)}/analysis"


def sweep_checkpoints(task: str, point: str, kind: str = "qlora") -> str:
    return f"{RESULTS}/checkpoints/{task}/sweep/{point}/{kind}"


def evaluation(variant: str, task: str) -> dict[str, str]:
    return scored(f"{RESULTS}/eval/{variant}/{task}")


def scored(folder: str) -> dict[str, str]:
    """The files of one scoring job (evaluation/score_job.py)."""
    return {"results": f"{folder}/results.json", "samples": f"{folder}/samples.jsonl",
            "provenance": f"{folder}/provenance.json"}


def quantization_report() -> dict[str, str]:
    folder = f"{RESULTS}/quantization"
    return {"report": f"{folder}/report.json", "markdown": f"{folder}/report.md",
            "provenance": f"{folder}/provenance.json"}


def quantization_sweep_point(label: str) -> str:
    """A folder: report.json (a method's measures) and provenance.json."""
    return f"{RESULTS}/quantization/sweep/{label}"


def quantization_sweep() -> dict[str, str]:
    """The sweep's table and plot, and the quantization report with its section."""
    folder = f"{RESULTS}/quantization"
    return {"table": f"{folder}/sweep.csv", "markdown": f"{folder}/report_with_sweep.md",
            "plot": f"{folder}/sweep.png", "provenance": f"{folder}/sweep_provenance.json"}


def report() -> dict[str, str]:
    folder = f"{RESULTS}/report"
    return {"scores": f"{folder}/scores.csv", "markdown": f"{folder}/report.md",
            "scores_plot": f"{folder}/scores.png", "loss_plot": f"{folder}/loss.png",
            "adapters_plot": f"{folder}/adapters.png",
            "provenance": f"{folder}/provenance.json"}


def sweep_report() -> dict[str, str]:
    """The report's sweep outputs, declared only when a task has a sweep."""
    folder = f"{RESULTS}/report"
    return {"sweeps": f"{folder}/sweeps.csv", "sweeps_plot": f"{folder}/sweeps.png"}


def combination_report() -> dict[str, str]:
    """The report's combination outputs, declared only when the config has combinations."""
    folder = f"{RESULTS}/report"
    return {"combinations": f"{folder}/combinations.csv", "overlap_plot": f"{folder}/overlap.png"}


def parse_variant(variant: str) -> tuple[str, str | None]:
    """('qlora', None) for 'qlora'; ('qlora', 'topic') for 'qlora+topic'."""
    if not re.fullmatch(VARIANT_PATTERN, variant):
        raise ValueError(f"variant {variant!r}: expected one of {', '.join(VARIANT_KINDS)}, "
                         f"or {'/'.join([*ADAPTERS, 'merged'])} followed by +<task>, or "
                         f"{COMBINED}+<combination>")
    kind, _, source = variant.partition("+")
    return kind, source or None


def variant_inputs(variant: str, task: str) -> dict[str, str]:
    """What scoring `variant` on `task` loads, by input name: spec (the task's lm-eval task),
    base (always: it holds the tokenizer), and quantized / adapter / merged as the kind needs."""
    kind, source = parse_variant(variant)
    source = source or task
    inputs = {"spec": eval_spec(task), "base": BASE}
    if kind == "quantized":
        inputs["quantized"] = QUANTIZED
    elif kind == COMBINED:
        inputs.update(adapter=combination(source), quantized=QUANTIZED)
    elif kind in ADAPTERS:
        inputs["adapter"] = adapter(source, kind)
        if ADAPTERS[kind] == "quantized":
            inputs["quantized"] = QUANTIZED
    elif kind == "merged":
        inputs["merged"] = merged(source)
    return inputs
