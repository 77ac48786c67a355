# Configuration loading and validation, path helpers and input functions.
# Everything here runs when the workflow is parsed, so a bad config fails before any job.
# The library (qlora_pipeline) is installed into .venv by `make setup`, and into each conda
# env by its post-deploy script (envs/*.post-deploy.sh), which reads QLORA_PIPELINE_ROOT.

import os

from qlora_pipeline import code_digest, layout, sweeps, warm_start
from qlora_pipeline.config import load_config, recovery_train
from qlora_pipeline.errors import InputError
from qlora_pipeline.layout import RESULTS

os.environ.setdefault("QLORA_PIPELINE_ROOT", workflow.basedir)

try:
    config, TASKS = load_config(config, root=".")
except InputError as err:
    raise WorkflowError(str(err)) from None


wildcard_constraints:
    task="|".join(TASKS),
    variant=layout.VARIANT_PATTERN,
    point=sweeps.POINT,


def code(rule):
    """A digest of the library code the rule's stage runs: a rerun trigger (params.code)."""
    return code_digest.for_rule(rule)


def _gpus():
    resource = workflow.global_resources.get("gpu")
    return 1 if resource is None or resource.value is None else max(1, resource.value)


def _cores():
    """--cores; a cluster executor may run without a total (then set-threads decides)."""
    try:
        return workflow.cores
    except WorkflowError:
        return 1


# Threads of a model job (torch reads them; Snakemake sets OMP_NUM_THREADS to them): every
# core given (--cores) on a CPU, an equal share per GPU when --resources gpu=N lets N model
# jobs run side by side. A cluster profile sets them per rule (set-threads), and Slurm's
# --cpus-per-task follows. Data jobs are single-threaded: DATA_THREADS.
MODEL_THREADS = max(1, _cores() // _gpus())
DATA_THREADS = 1
# The training chain (tokenize, quantize, training, recovery, merge) is a run's longest path:
# when jobs wait for a core or a slot (--resources gpu=N), its jobs go first and evaluations
# and analyses fill the gaps (docs/performance.md).
TRAINING_PRIORITY = 10


def task_cfg(wildcards):
    return TASKS[wildcards.task]


def local_dataset_files(wildcards):
    """Local dataset files are declared inputs, so editing one reruns the task."""
    dataset = task_cfg(wildcards)["dataset"]
    if dataset["source"] != "local":
        return []
    return list((dataset.get("files") or {"train": dataset["path"]}).values())


def recovery_enabled(task):
    return TASKS[task]["recovery"]["enabled"]


def compress_enabled(task):
    return TASKS[task]["compress"] is not None


def final_adapter(wildcards):
    """The adapter a task ships: the recovered one when recovery is on, else the QLoRA one."""
    kind = "recovered" if recovery_enabled(wildcards.task) else "qlora"
    return layout.adapter(wildcards.task, kind)


def variants(task):
    """The configured variants that exist for a task (`recovered` and `compressed` only where
    the task enables them)."""
    optional = {"recovered": recovery_enabled(task), "compressed": compress_enabled(task)}
    return [v for v in config["evaluation"]["variants"] if optional.get(v, True)]


def variant_inputs(wildcards):
    """What one variant × task evaluation loads (layout.variant_inputs)."""
    return layout.variant_inputs(wildcards.variant, wildcards.task)


def eval_settings(wildcards=None):
    """The evaluation settings a score depends on (not the variant list)."""
    return {k: v for k, v in config["evaluation"].items() if k != "variants"}


def eval_results():
    return [layout.evaluation(v, t)["results"] for t in TASKS for v in variants(t)]


def adapter_kinds(task):
    return ["qlora", "recovered"] if recovery_enabled(task) else ["qlora"]


def all_adapters():
    return [layout.adapter(t, kind) for t in TASKS for kind in adapter_kinds(t)]


def all_analyses():
    return [layout.analysis(t, kind) for t in TASKS for kind in adapter_kinds(t)]


def all_compressions():
    return [layout.adapter(t, "compressed") for t in TASKS if compress_enabled(t)]


def point_cfg(wildcards):
    """One sweep point's lora/train blocks, seed and swept values (sweeps.py)."""
    return TASKS[wildcards.task]["sweep_points"][wildcards.point]


def sweep_points():
    return [(t, point) for t in TASKS for point in TASKS[t]["sweep_points"]]


def all_sweep_results():
    return [layout.sweep_evaluation(t, p)["results"] for t, p in sweep_points()]


def all_sweep_adapters():
    return [layout.sweep_adapter(t, p) for t, p in sweep_points()]


def all_sweep_analyses():
    return [layout.sweep_analysis(t, p) for t, p in sweep_points()]


def all_outputs():
    return [
        layout.quantization_report()["markdown"],
        *all_adapters(),
        *all_analyses(),
        *all_compressions(),
        *all_sweep_results(),
        *all_sweep_analyses(),
        *[layout.merged(t) for t in TASKS],
        *eval_results(),
        layout.report()["markdown"],
    ]
