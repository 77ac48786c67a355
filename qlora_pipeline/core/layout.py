"""Names and paths that the rules, the stages, the reports and the chat command share, written
once: where every output lives, and the one grammar of variant names.

A variant is what gets scored, `<kind>[+<source>][@<training>]`:
- `<kind>`: the scored task's own model: base, quantized, qlora, compressed, recovered, merged;
- `+<source>`: the model of another task (`qlora+topic` scored on arithmetic), or for
  `combined` the combination's name (`combined+both`, config key `combinations`);
- `@<training>`: a training of the trainings table other than the task's own (config/
  trainings.py): `qlora@r16` is sweep point r16's QLoRA adapter, `recovered@r16-rsteps5` a
  point's recovery.
An adapter's folder is named like its variant without the source (`adapters/<task>/qlora@r16`).
An evaluation loads a model from which inputs it has (evaluation/harness.py), not from the
variant's name: a new kind reuses everything but an entry in ADAPTERS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InputError

ROOT = "results"
_run = {"folder": ROOT}  # this run's folder: results/, or results/<run>/ once use_run named it

VARIANT_KINDS = ("base", "quantized", "qlora", "compressed", "recovered", "merged")
# Kinds scored with an adapter, and the base that adapter is put on: the model as trained
# (a compressed adapter is a cut of the QLoRA one, so it goes on the quantized base too).
ADAPTERS = {"qlora": "quantized", "compressed": "quantized", "recovered": "base"}
TRAINED = ("qlora", "recovered")  # the adapters a training makes: they may name one (@<id>)
COMPRESSED_FROM = "qlora"  # the adapter kind the compress stage cuts
COMBINED_FROM = "qlora"  # the adapter kind combined: every task's is on the one quantized base
COMBINED = "combined"  # a combination of tasks' QLoRA adapters, on the quantized base they share
SCORED_KINDS = (*VARIANT_KINDS, COMBINED)  # every kind, in the report's order
NAME = r"[A-Za-z0-9_-]+"  # a task's or a combination's name
TRAINING = r"[A-Za-z0-9_.+-]+"  # a training's id (a sweep point's: r16-lr3e-4, q_proj+v_proj)
# A run's top folders: an unnamed run's are in results/ itself, so no run may take their names.
FOLDERS = ("adapters", "analysis", "benchmarks", "checkpoints", "data", "eval", "logs", "mlflow",
           "models", "quantization", "report", "tensorboard", "wandb")
_GRAMMAR = re.compile(rf"(?P<kind>[a-z]+)(?:\+(?P<source>{NAME}))?(?:@(?P<training>{TRAINING}))?")


def pattern(kinds, *, source: bool = False, training: bool = False) -> str:
    """A regular expression of variant names of these kinds (a wildcard constraint)."""
    return (f"(?:{'|'.join(kinds)})" + (rf"(?:\+{NAME})?" if source else "")
            + (f"(?:@{TRAINING})?" if training else ""))


VARIANT_PATTERN = "|".join([
    "base|quantized", pattern([*TRAINED, "compressed", "merged"], source=True),
    pattern(TRAINED, source=True, training=True), rf"{COMBINED}\+{NAME}"])


@dataclass(frozen=True)
class Variant:
    """A variant name, parsed (see the module's docstring)."""
    kind: str
    source: str | None = None
    training: str | None = None

    @classmethod
    def parse(cls, name: str) -> Variant:
        found = _GRAMMAR.fullmatch(name)
        if not found or not re.fullmatch(VARIANT_PATTERN, name):
            raise ValueError(
                f"variant {name!r}: expected one of {', '.join(VARIANT_KINDS)}, "
                f"{'/'.join([*ADAPTERS, 'merged'])} followed by +<task>, "
                f"{'/'.join(TRAINED)} followed by @<training>, or {COMBINED}+<combination>")
        return cls(**found.groupdict())

    @property
    def adapter_name(self) -> str:
        """The folder name of its adapter under its source task: qlora, qlora@r16, ..."""
        return self.kind + (f"@{self.training}" if self.training else "")


def use_run(run: str | None) -> None:
    """Put every path of this process under results/<run>/ (config key `run`; None:
    results/). Called once, by rules/common.smk when the config is read: the rules give the
    stages their paths, so no job depends on it."""
    if run in FOLDERS:
        raise InputError(f"config key 'run': found {run!r}, a folder every run has; expected "
                         f"another name (not one of {', '.join(FOLDERS)})")
    _run["folder"] = f"{ROOT}/{run}" if run else ROOT


def results() -> str:
    return _run["folder"]


def base() -> str:
    return f"{results()}/models/base"


def quantized() -> str:
    """The quantized base, whatever its bits."""
    return f"{results()}/models/quantized"


def training_base(base_id: str) -> str:
    """A training's own quantized base (PiSSA's residual, LoftQ's alternating steps), with its
    initial adapter in `initial/`: trainings.with_bases names it."""
    return f"{quantized()}@{base_id}"


def raw(task: str) -> str:
    return f"{results()}/data/{task}/raw"


def tokenized(task: str) -> str:
    return f"{results()}/data/{task}/tokenized"


def eval_spec(task: str) -> str:
    return f"{results()}/eval/tasks/{task}"


def adapter(task: str, name: str) -> str:
    """A task's adapter by its name (Variant.adapter_name): qlora, recovered@r16-rsteps5, ..."""
    return f"{results()}/adapters/{task}/{name}"


def combination(name: str) -> str:
    """A combination's adapter (analysis/combine.py), with combination.json beside it."""
    return f"{results()}/adapters/{COMBINED}/{name}"


def trained_base(name: str, own: str | None = None) -> str:
    """The base an adapter was trained on (ADAPTERS): the W0 of its ΔW. `own`: its training's
    own quantized base (trainings.own_base), in place of the shared one."""
    return {"quantized": own or quantized(), "base": base()}[ADAPTERS[Variant.parse(name).kind]]


def analysis(task: str, name: str) -> str:
    """An adapter's spectral analysis: layers.json, summary.json, analysis.md (analysis/)."""
    return f"{results()}/analysis/{task}/{name}"


def checkpoints(task: str, name: str) -> str:
    """Outside every declared output: Snakemake deletes outputs before a rerun, and these must
    survive an interrupted job so that it can resume."""
    return f"{results()}/checkpoints/{task}/{name}"


def tensorboard(task: str, name: str) -> str:
    """A training's curves as TensorBoard event files (`tensorboard --logdir results/`), outside
    every declared output: they grow while the job runs."""
    return f"{results()}/tensorboard/{task}/{name}"


def trackers(task: str, name: str, report_to: list[str]) -> dict:
    """Where a training's curves go, by tracker (train.report_to), under the run name
    `<task>/<name>`: TensorBoard's event files per training; one MLflow file store and one W&B
    folder per run, so that their UIs show every training of the run side by side."""
    places = {"tensorboard": tensorboard(task, name), "mlflow": f"{results()}/mlflow",
              "wandb": results()}  # W&B writes into a wandb/ folder of its own
    return {"run": f"{task}/{name}", **{tracker: places[tracker] for tracker in report_to}}


def merged(task: str) -> str:
    return f"{results()}/models/merged/{task}"


def gguf(task: str) -> str:
    """A task's GGUF export: <task>-<type>.gguf per type and export.json (stages/export.py)."""
    return f"{results()}/models/gguf/{task}"


def evaluation(variant: str, task: str) -> dict[str, str]:
    """The files of one scoring job (stages/evaluate.py)."""
    folder = f"{results()}/eval/{variant}/{task}"
    return {"results": f"{folder}/results.json", "samples": f"{folder}/samples.jsonl",
            "provenance": f"{folder}/provenance.json"}


def quantization_report() -> dict[str, str]:
    folder = f"{results()}/quantization"
    return {"report": f"{folder}/report.json", "markdown": f"{folder}/report.md",
            "provenance": f"{folder}/provenance.json"}


def quantization_sweep_point(label: str) -> str:
    """A folder: report.json (a method's measures) and provenance.json."""
    return f"{results()}/quantization/sweep/{label}"


def report() -> str:
    """The report's folder: report.md, each section's CSV and plot (report/sections.py) and
    provenance.json."""
    return f"{results()}/report"


def variant_inputs(variant: str, task: str, own: str | None = None) -> dict[str, str]:
    """What scoring `variant` on `task` loads, by input name: spec (the task's lm-eval task),
    base (always: it holds the tokenizer), and quantized / adapter / merged as the kind needs.
    `own`: the adapter's training's own quantized base (trainings.own_base)."""
    found = Variant.parse(variant)
    source = found.source or task
    inputs = {"spec": eval_spec(task), "base": base()}
    if found.kind == COMBINED:
        inputs["adapter"] = combination(source)
    elif found.kind in ADAPTERS:
        inputs["adapter"] = adapter(source, found.adapter_name)
    elif found.kind == "merged":
        inputs["merged"] = merged(source)
    if found.kind in ("quantized", COMBINED) or ADAPTERS.get(found.kind) == "quantized":
        inputs["quantized"] = own or quantized()  # after the adapter: the order declared
    return inputs


def lm_eval_name(task: str) -> str:
    """A task's name as an lm-eval task (its own benchmark in a results.json)."""
    return f"qlora_{task}"


# The container of a model's numbered blocks: Llama/Mistral/Qwen/NeoX "layers", GPT-2/Falcon
# "h", BERT-style "layer", and "blocks". The first such index in a name is the decoder block's.
BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)")


def parse_layer(key: str) -> tuple[int | None, str]:
    """'model.layers.12.self_attn.q_proj.weight' -> (12, 'q_proj'); (None, leaf) for a
    weight outside the numbered blocks."""
    name = key.removesuffix(".weight")
    match = BLOCK.search(name)
    return (int(match.group(1)) if match else None), name.rsplit(".", 1)[-1]
