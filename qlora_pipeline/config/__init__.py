"""The run configuration read when the workflow is parsed: config.yaml and the task files
validated (schema.py), each task's effective settings, its sweep expanded (sweeps.py), the
combinations checked (combinations.py) and the quantization settled (quantization.py). A bad
value fails here, in one line naming the file and key, before any job runs."""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
from pathlib import Path
from typing import Any

from ..core.errors import InputError
from ..data.builtin import check_arithmetic
from . import combinations, quantization, sweeps, trainings
from .schema import coerce, load_schema, load_yaml, validate

log = logging.getLogger(__name__)
# Task keys whose mapping is a choice between keys ({energy} or {rank}), not settings: a
# task's value replaces the defaults' instead of merging with it.
CHOICES = ("compress",)
# Blocks whose keys depend on one of them: a later layer that switches it gives the block whole
# (the earlier method's or source's keys would otherwise stay, and be refused or used).
SWITCHES = {"quantization": "method", "base_model": "source"}


def deep_merge(base: dict, override: dict) -> dict:
    """Return base updated by override, recursing into nested mappings."""
    merged = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@functools.cache
def _typed_schema() -> dict:
    """The config schema with the task schema where it holds task settings: what --config
    values are coerced by (never modified, so cached)."""
    config, task = load_schema("config.schema.yaml"), load_schema("task.schema.yaml")
    config["properties"]["defaults"] = task
    config["properties"]["task_overrides"]["additionalProperties"] = task
    return config


def _switched(before: Any, block: Any, key: str) -> bool:
    """Whether `block` switches the SWITCHES key of the `before` merged so far."""
    switch = SWITCHES[key]
    if not (isinstance(before, dict) and isinstance(block, dict) and switch in block):
        return False
    if switch in before:
        return block[switch] != before[switch]
    return block[switch] != _typed_schema()["properties"][key]["properties"][switch].get("default")


def _merge_layer(config: dict, layer: dict) -> dict:
    merged = deep_merge(config, layer)
    for key in SWITCHES:
        if _switched(config.get(key), layer.get(key), key):
            merged[key] = copy.deepcopy(layer[key])
    return merged


def read_configfiles(paths: list[str | Path], overrides: dict | None = None) -> dict:
    """The raw config of `snakemake --configfile A --configfile B --config k=v`: the files
    merged in order (deep_merge; a SWITCHES block that switches is taken whole), then
    `overrides` (--config) merged alike, its text values typed as the schema asks."""
    config: dict = {}
    for path in paths:
        layer = load_yaml(path) or {}
        if not isinstance(layer, dict):
            raise InputError(f"{path}: found {type(layer).__name__}; expected a mapping of "
                             f"config keys")
        config = _merge_layer(config, layer)
    return _merge_layer(config, coerce(overrides, _typed_schema())) if overrides else config


def _check_dataset(dataset: dict, fmt: str, where: str) -> None:
    """What the schema cannot say: keys that depend on the source or the format."""
    arithmetic = dataset["source"] == "builtin" and dataset.get("name") == "arithmetic"
    if "options" in dataset and not arithmetic:
        raise InputError(f"{where}: key 'dataset.options': found it for source "
                         f"'{dataset['source']}' {dataset.get('name', '')}; expected it only "
                         f"for the builtin arithmetic generator")
    if arithmetic:
        try:  # refused here, before any job runs, rather than in fetch_dataset
            check_arithmetic(dataset["num_examples"], **dataset.get("options", {}))
        except InputError as err:
            raise InputError(f"{where}: {err}") from None
    if "system_prompt" in dataset and fmt != "chat":
        raise InputError(f"{where}: key 'dataset.system_prompt': found format "
                         f"'{fmt}'; expected format 'chat' (only chat has system turns)")


def _check_distributed(distributed: dict, where: str) -> None:
    """Several processes need a strategy (docs/cluster.md)."""
    strategy, processes, nodes = (distributed[k] for k in ("strategy", "processes", "nodes"))
    if strategy == "none" and processes * nodes > 1:
        raise InputError(f"{where}: key 'train.distributed': found {processes} processes x "
                         f"{nodes} nodes with strategy 'none'; expected strategy ddp or fsdp "
                         f"(or processes 1, nodes 1)")


# Each tracker's module and the package that brings it (mlflow-skinny is in requirements.txt).
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny"),
            "wandb": ("wandb", "wandb")}


def _check_trackers(report_to: list[str], where: str) -> None:
    """A tracker whose package is missing would fail the training job after its model loads."""
    for tracker in report_to:
        module, package = TRACKERS[tracker]
        if importlib.util.find_spec(module) is None:
            raise InputError(f"{where}: key 'train.report_to': found {tracker}, whose package is "
                             f"not installed; expected it installed (pip install {package}, in "
                             f"the jobs' environment too) or another tracker")


def load_task(name: str, config: dict, root: str | Path = ".") -> dict:
    """The effective config of one task: global defaults, then its file, then inline overrides."""
    task_dir = Path(root) / config["task_dir"]
    path = task_dir / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in task_dir.glob("*.yaml"))
        raise InputError(
            f"config key 'tasks': unknown task '{name}': found no file {path}; expected one of "
            f"the tasks in {task_dir}: {', '.join(known) or 'none'}"
        )
    raw = load_yaml(path) or {}
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping of task settings, found {type(raw).__name__}")
    override = config.get("task_overrides", {}).get(name, {})
    task = deep_merge(config["defaults"], deep_merge(raw, override))
    # The most specific setting wins whole: the override's (the later layer), else the file's.
    task.update({key: copy.deepcopy(layer[key]) for layer in (raw, override) for key in CHOICES
                 if key in layer})
    # The global seed is the seed of everything a task does not seed itself (config schema).
    seed = config.get("seed", 0)
    if isinstance(task.get("dataset"), dict) and "seed" not in task["dataset"]:
        task["dataset"]["seed"] = seed
    where = f"{path} (with config task_overrides.{name} merged)" if override else str(path)
    schema = load_schema("task.schema.yaml")
    validate(task, schema, where)
    _check_dataset(task["dataset"], task["format"], where)
    _check_distributed(task["train"]["distributed"], where)
    _check_trackers(task["train"]["report_to"], where)
    task["name"] = name
    if isinstance(task["export"]["type"], str):  # one type or a list: a list from here on
        task["export"]["type"] = [task["export"]["type"]]
    # Derived, not a setting: the task's rows of the trainings table (trainings.py), its
    # sweep's points each checked like a task file (sweeps.py).
    task["trainings"] = trainings.rows(task, sweeps.expand(task, schema, where, seed), seed)
    for row in task["trainings"].values():
        point = f" (sweep point {row['id']})" if row["id"] else ""
        _check_adalora(row, config["quantization"]["method"], where + point)
    trainings.check_inits(task["trainings"], task["merge"]["base"], where)
    return task


def _check_adalora(row: dict, method: str, where: str) -> None:
    """What AdaLoRA cannot be combined with, refused before any job runs."""
    lora, steps = row["lora"], row["train"]["max_steps"]
    if lora.get("type") != "adalora":
        return
    schedule = lora["adalora"]["tinit"] + lora["adalora"]["tfinal"]
    refused = {
        "lora.adalora": (bool(steps) and schedule >= steps,
                         f"tinit + tfinal is {schedule}, leaving no pruning steps in "
                         f"train.max_steps {steps}; expected a sum below it"),
        "lora.adalora.init_r": (lora["adalora"]["init_r"] < lora["r"],
                                f"found {lora['adalora']['init_r']}, below lora.r {lora['r']} "
                                f"(AdaLoRA's target rank); expected at least {lora['r']}"),
        "lora.init": (lora["init"] not in (True, "gaussian"),
                      f"found {lora['init']!r} with lora.type adalora; expected true or gaussian "
                      f"(AdaLoRA starts from E = 0 with its own A and B)"),
        "lora.use_dora": (lora["use_dora"], "found true with lora.type adalora; expected false "
                          "(PEFT's AdaLoRA has no DoRA)"),
        "lora.use_rslora": (lora["use_rslora"], "found true with lora.type adalora; expected "
                            "false (AdaLoRA scales by alpha / its initial rank)"),
        "lora.rank_pattern": (bool(lora["rank_pattern"]),
                              f"found {lora['rank_pattern']} with lora.type adalora; expected "
                              f"none (AdaLoRA sets each layer's rank itself, within r per "
                              f"adapted matrix)"),
        "quantization.method": (method == "hqq",
                                "found hqq with lora.type adalora; expected nf4, fp4 or int8 "
                                "(PEFT's AdaLoRA has layers for bitsandbytes and GPTQ, not HQQ)"),
        "recovery": (row["recovered"], "recovered with lora.type adalora; expected recovery "
                     "off (recovery continues a plain LoRA adapter of fixed rank)"),
        "train.distributed.strategy": (
            row["train"]["distributed"]["strategy"] == "fsdp",
            "found fsdp with lora.type adalora; expected ddp or one process (AdaLoRA's "
            "rank allocator reads whole parameters and their gradients)"),
    }
    for key, (bad, message) in refused.items():
        if bad:
            raise InputError(f"{where}: key '{key}': {message}")


def canonical(value: Any) -> Any:
    """Mappings with sorted keys, recursively: rules' params compare equal whatever the key
    order in the YAML files, so reordering a file reruns nothing."""
    if isinstance(value, dict):
        return {key: canonical(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


def recovery_train(task: dict) -> dict:
    """The training settings recovery runs with: the task's `train` block, with recovery's
    steps and learning rate, a fixed number of steps (no epochs, no early stopping) and an
    evaluation at least at the end. The recover rule's params hold exactly this."""
    train, recovery = task["train"], task["recovery"]
    return canonical({**train, "max_steps": recovery["steps"], "epochs": None,
                      "learning_rate": recovery["learning_rate"],
                      "early_stopping_patience": None,
                      "eval_steps": min(train["eval_steps"], recovery["steps"])})


def load_config(config: dict, root: str | Path = ".") -> tuple[dict, dict[str, dict]]:
    """Validate the main config (in place, with defaults) and load every listed task."""
    if isinstance(config.get("quantization"), dict) and "quant_type" in config["quantization"]:
        raise InputError("config key 'quantization.quant_type': renamed 'quantization.method' "
                         f"(nf4, fp4, int8, hqq); found quant_type "
                         f"{config['quantization']['quant_type']!r}")
    validate(config, load_schema("config.schema.yaml"), "config")
    # Defaults are task settings: the task schema checks them, with nothing required.
    defaults_schema = {**load_schema("task.schema.yaml"), "required": []}
    del defaults_schema["$schema"]  # nested, it would switch to a validator without defaults
    validate(config, {"type": "object", "properties": {"defaults": defaults_schema}}, "config")
    unknown = set(config.get("task_overrides", {})) - set(config["tasks"])
    if unknown:
        raise InputError(
            f"config key 'task_overrides': found {sorted(unknown)}, not in 'tasks'; expected "
            f"only tasks listed in 'tasks' {config['tasks']}"
        )
    tasks = {name: canonical(load_task(name, config, root)) for name in config["tasks"]}
    known = sorted(p.stem for p in (Path(root) / config["task_dir"]).glob("*.yaml"))
    kept = combinations.check(config["combinations"], config["tasks"], known)
    left_out = [c["name"] for c in config["combinations"] if c["name"] not in kept]
    if left_out:
        log.warning("combinations %s left out: not all their tasks are in 'tasks' %s",
                    left_out, config["tasks"])
    config["combinations"] = list(kept.values())
    # quant_storage 'auto': FSDP shards only float tensors, so a task trained with FSDP needs
    # the 4-bit weights stored in the compute dtype (bitsandbytes #1123). Settled here, so that
    # the quantize rule's params, and its output, change with it.
    fsdp = any(t["train"]["distributed"]["strategy"] == "fsdp" for t in tasks.values())
    config["quantization"] = quantization.settle(config["quantization"], "quantization", fsdp)
    for task in tasks.values():  # a training's own base is built with the settled settings
        task["trainings"] = trainings.with_bases(task["trainings"], config["quantization"])
    combinations.check_bases(config["combinations"],
                             {name: task["trainings"][""]["base"] for name, task in tasks.items()})
    config["quantization_sweep"] = list(quantization.sweep(config).values())
    return canonical(config), tasks
