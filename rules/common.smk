# Configuration loading and validation, path helpers and input functions.
# Everything here runs when the workflow is parsed, so a bad config fails before any job.

import sys

sys.path.insert(0, workflow.basedir)

from qlora_pipeline.config import load_config
from qlora_pipeline.errors import InputError

try:
    config, TASKS = load_config(config, root=".")
except InputError as err:
    raise WorkflowError(str(err)) from None


wildcard_constraints:
    task="|".join(TASKS),
    variant="|".join(["base", "base-4bit", "qlora", "recovered", "merged"]),


RESULTS = "results"


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


def task_cfg(wildcards):
    return TASKS[wildcards.task]


def local_dataset_files(wildcards):
    """Local dataset files are declared inputs, so editing one reruns the task."""
    dataset = task_cfg(wildcards)["dataset"]
    if dataset["source"] != "local":
        return []
    return list((dataset.get("files") or {"train": dataset["path"]}).values())


def tokenized_dirs(wildcards=None):
    return {task: f"{RESULTS}/data/{task}/tokenized" for task in TASKS}


def recovery_enabled(task):
    return TASKS[task]["recovery"]["enabled"]


def final_adapter(wildcards):
    """The adapter a task ships: the recovered one when recovery is on, else the QLoRA one."""
    kind = "recovered" if recovery_enabled(wildcards.task) else "qlora"
    return f"{RESULTS}/adapters/{wildcards.task}/{kind}"


def variants(task):
    """The configured variants that exist for a task (`recovered` only where enabled)."""
    wanted = config["evaluation"]["variants"]
    return [v for v in wanted if v != "recovered" or recovery_enabled(task)]


def variant_inputs(wildcards):
    """What one variant × task evaluation loads (the base always: it holds the tokenizer)."""
    task, variant = wildcards.task, wildcards.variant
    inputs = {"spec": f"{RESULTS}/eval/tasks/{task}", "base": f"{RESULTS}/models/base"}
    if variant in ("base-4bit", "qlora"):
        inputs["base_4bit"] = f"{RESULTS}/models/base-4bit"
    if variant in ("qlora", "recovered"):
        inputs["adapter"] = f"{RESULTS}/adapters/{task}/{variant}"
    if variant == "merged":
        inputs["merged"] = f"{RESULTS}/models/merged/{task}"
    return inputs


def eval_settings(wildcards=None):
    """The evaluation settings a score depends on (not the variant list)."""
    return {k: v for k, v in config["evaluation"].items() if k != "variants"}


def eval_results():
    return [f"{RESULTS}/eval/{v}/{t}/results.json" for t in TASKS for v in variants(t)]


def all_adapters():
    return [f"{RESULTS}/adapters/{t}/{kind}" for t in TASKS
            for kind in (["qlora", "recovered"] if recovery_enabled(t) else ["qlora"])]


def all_outputs():
    return [
        f"{RESULTS}/quantization/report.md",
        *expand(f"{RESULTS}/adapters/{{task}}/qlora", task=TASKS),
        *[f"{RESULTS}/adapters/{t}/recovered" for t in TASKS if recovery_enabled(t)],
        *expand(f"{RESULTS}/models/merged/{{task}}", task=TASKS),
        *eval_results(),
        f"{RESULTS}/report/report.md",
    ]
