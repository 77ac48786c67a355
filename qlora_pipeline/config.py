"""Loading and validating the run configuration and the per-task files.

jsonschema does the checking; we format its errors ourselves so that a message names the
file, the key path, the value found and what was expected (snakemake.utils.validate prints
the whole schema instead, which buries the one line a user needs).
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from . import combinations, launch, quant_settings, sweeps
from .data.builtin import check_arithmetic
from .errors import InputError

log = logging.getLogger(__name__)
SCHEMA_DIR = Path(__file__).resolve().parent.parent / "config" / "schemas"
# Task keys whose mapping is a choice between keys ({energy} or {rank}), not settings: a
# task's value replaces the defaults' instead of merging with it.
CHOICES = ("compress",)


def load_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML: {err}") from None


def load_schema(name: str) -> dict:
    return load_yaml(SCHEMA_DIR / name)


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def _condition(error: jsonschema.ValidationError, schema: dict | None) -> str:
    """' when <key> is <value>' for an error raised by the `then` of an if/then rule."""
    path = list(error.schema_path)
    if schema is None or "then" not in path:
        return ""
    at = len(path) - 1 - path[::-1].index("then")
    node = schema
    try:
        for part in path[:at]:
            node = node[part]
        condition = node["if"]["properties"]
    except (KeyError, IndexError, TypeError):
        return ""
    # The instance keys walked below the `then` (properties/<key>, items, ...) lead from the
    # object the rule is about down to the offending value.
    below, rest = 0, iter(path[at + 1:])
    for part in rest:
        if part == "properties":
            next(rest, None)
            below += 1
        elif part in ("items", "additionalProperties"):
            below += 1
    keys = list(error.absolute_path)
    prefix = ".".join(str(p) for p in keys[: len(keys) - below])
    parts = [f"{prefix + '.' if prefix else ''}{key} is {sub['const']}"
             for key, sub in condition.items() if isinstance(sub, dict) and "const" in sub]
    return f" when {' and '.join(parts)}" if parts else ""


def _describe(error: jsonschema.ValidationError, schema: dict | None = None) -> str:
    key = _key_path(error)
    found = json.dumps(error.instance, default=str)
    if len(found) > 80:
        found = found[:77] + "..."
    value = error.validator_value
    if error.validator == "type":
        expected = f"a value of type {value}"
    elif error.validator in ("enum", "const"):
        expected = "one of " + ", ".join(map(str, value if error.validator == "enum" else [value]))
    elif error.validator == "required":
        missing = next((k for k in value if k not in error.instance and repr(k) in error.message),
                       error.message.split("'")[1])
        found_keys = ", ".join(map(str, error.instance)) or "none"
        return (f"key '{key}': missing required key '{missing}' (found keys: {found_keys}); "
                f"expected '{missing}' to be set{_condition(error, schema)}")
    elif error.validator == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        extra = [k for k in error.instance if k not in allowed]
        hints = []
        for name in extra:
            close = difflib.get_close_matches(str(name), allowed, n=1)
            hints.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        return (f"key '{key}': found unknown key(s) {', '.join(hints)}; expected only "
                f"{', '.join(allowed) or 'no keys'} (check the spelling; see "
                f"docs/configuration.md)")
    elif error.validator == "oneOf" and all(
            isinstance(alt, dict) and set(alt) == {"required"} for alt in value):
        present = [k for alt in value for k in alt["required"] if k in error.instance]
        options = " | ".join(" + ".join(alt["required"]) for alt in value)
        keys = dict.fromkeys(k for alt in value for k in alt["required"])
        found = ", ".join(dict.fromkeys(present)) or f"none of {', '.join(keys)}"
        return (f"key '{key}': found {found}; expected exactly one of: "
                f"{options}{_condition(error, schema)}")
    elif error.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        sign = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">",
                "exclusiveMaximum": "<"}[error.validator]
        expected = f"a number {sign} {value}"
    elif error.validator == "minItems":
        expected = f"at least {value} item(s)"
    elif error.validator == "uniqueItems":
        expected = "no repeated items"
    elif error.validator == "pattern":
        expected = f"a string matching {value}"
    else:
        expected = f"{error.validator} {value}"
    return f"key '{key}': found {found}, expected {expected}{_condition(error, schema)}"


class _DefaultingValidator:
    """A Draft 2020-12 validator that also fills in schema defaults (like snakemake's validate)."""

    def __init__(self, schema: dict):
        base = jsonschema.Draft202012Validator

        def set_defaults(validator, properties, instance, schema):
            if isinstance(instance, dict):
                for prop, sub in properties.items():
                    if "default" in sub and prop not in instance:
                        instance[prop] = copy.deepcopy(sub["default"])
            yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

        cls = jsonschema.validators.extend(base, {"properties": set_defaults})
        # format_checker: `format: regex` keys are compiled when the config is read
        self.validator = cls(schema, format_checker=base.FORMAT_CHECKER)

    def errors(self, instance):
        return sorted(self.validator.iter_errors(instance), key=lambda e: list(e.absolute_path))


def validate(instance: Any, schema: dict, where: str) -> Any:
    """Validate `instance` in place (filling defaults); raise InputError naming `where`."""
    errors = _DefaultingValidator(schema).errors(instance)
    if errors:
        lines = "\n  ".join(_describe(e, schema) for e in errors[:10])
        raise InputError(f"{where}: invalid configuration:\n  {lines}")
    return instance


def deep_merge(base: dict, override: dict) -> dict:
    """Return base updated by override, recursing into nested mappings."""
    merged = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


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
    merged = deep_merge(config["defaults"], deep_merge(raw, override))
    for key in CHOICES:  # the most specific setting wins whole
        for layer in (override, raw):
            if key in layer:
                merged[key] = copy.deepcopy(layer[key])
                break
    raw = merged
    # The global seed is the seed of everything a task does not seed itself (config schema).
    if isinstance(raw.get("dataset"), dict) and "seed" not in raw["dataset"]:
        raw["dataset"]["seed"] = config.get("seed", 0)
    where = f"{path} (with config task_overrides.{name} merged)" if override else str(path)
    schema = load_schema("task.schema.yaml")
    validate(raw, schema, where)
    _check_dataset(raw["dataset"], raw["format"], where)
    launch.check(raw["train"]["distributed"], where)
    raw["name"] = name
    if isinstance(raw["export"]["type"], str):  # one type or a list: a list from here on
        raw["export"]["type"] = [raw["export"]["type"]]
    # Derived, not a setting: the sweep's points, each checked like a task file (sweeps.py).
    raw["sweep_points"] = sweeps.expand(raw, schema, where, config.get("seed", 0))
    return raw


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
    if "quant_type" in (config.get("quantization") or {}):
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
    config["quantization"] = quant_settings.settle(config["quantization"], "quantization", fsdp)
    config["quantization_sweep"] = list(quant_settings.sweep(config).values())
    return canonical(config), tasks
