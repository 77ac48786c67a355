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


RESULTS = "results"


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


def all_outputs():
    return [
        f"{RESULTS}/quantization/report.md",
        *expand(f"{RESULTS}/adapters/{{task}}/qlora", task=TASKS),
        *[f"{RESULTS}/adapters/{t}/recovered" for t in TASKS if recovery_enabled(t)],
        *expand(f"{RESULTS}/models/merged/{{task}}", task=TASKS),
    ]
