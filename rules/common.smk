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


def all_outputs():
    return [
        *expand(f"{RESULTS}/data/{{task}}/tokenized", task=TASKS),
        f"{RESULTS}/models/base-4bit",
        f"{RESULTS}/quantization/report.md",
    ]
