"""Loading and validating the run configuration and the per-task files.

jsonschema does the checking; we format its errors ourselves so that a message names the
file, the key path, the value found and what was expected (snakemake.utils.validate prints
the whole schema instead, which buries the one line a user needs).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .errors import InputError

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "config" / "schemas"


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


def _describe(error: jsonschema.ValidationError) -> str:
    key = _key_path(error)
    found = json.dumps(error.instance, default=str)
    if len(found) > 80:
        found = found[:77] + "..."
    if error.validator == "type":
        expected = f"a value of type {error.validator_value}"
    elif error.validator == "enum":
        expected = "one of " + ", ".join(map(str, error.validator_value))
    elif error.validator == "required":
        missing = error.message.split("'")[1]
        return f"key '{key}': missing required key '{missing}'"
    elif error.validator == "additionalProperties":
        return f"key '{key}': {error.message} (check the spelling; see docs/configuration.md)"
    else:
        expected = f"{error.validator} {error.validator_value}"
    return f"key '{key}': found {found}, expected {expected}"


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
        self.validator = cls(schema)

    def errors(self, instance):
        return sorted(self.validator.iter_errors(instance), key=lambda e: list(e.absolute_path))


def validate(instance: Any, schema: dict, where: str) -> Any:
    """Validate `instance` in place (filling defaults); raise InputError naming `where`."""
    errors = _DefaultingValidator(schema).errors(instance)
    if errors:
        lines = "\n  ".join(_describe(e) for e in errors[:10])
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


def load_task(name: str, config: dict, root: str | Path = ".") -> dict:
    """The effective config of one task: global defaults, then its file, then inline overrides."""
    task_dir = Path(root) / config["task_dir"]
    path = task_dir / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in task_dir.glob("*.yaml"))
        raise InputError(
            f"config key 'tasks': unknown task '{name}': no file {path} "
            f"(tasks found in {task_dir}: {', '.join(known) or 'none'})"
        )
    raw = load_yaml(path) or {}
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping of task settings, found {type(raw).__name__}")
    raw = deep_merge(raw, config.get("task_overrides", {}).get(name, {}))
    validate(raw, load_schema("task.schema.yaml"), str(path))
    effective = deep_merge(config["defaults"], raw)
    effective["name"] = name
    return effective


def load_config(config: dict, root: str | Path = ".") -> tuple[dict, dict[str, dict]]:
    """Validate the main config (in place, with defaults) and load every listed task."""
    validate(config, load_schema("config.schema.yaml"), "config")
    unknown = set(config.get("task_overrides", {})) - set(config["tasks"])
    if unknown:
        raise InputError(
            f"config key 'task_overrides': {sorted(unknown)} are not in 'tasks' {config['tasks']}"
        )
    tasks = {name: load_task(name, config, root) for name in config["tasks"]}
    return config, tasks
