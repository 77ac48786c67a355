"""JSON-schema validation of the run configuration and the task files, with the schema's
defaults filled in and one readable line per problem.

jsonschema does the checking; we format its errors ourselves so that a message names the
file, the key path, the value found and what was expected (snakemake.utils.validate prints
the whole schema instead, which buries the one line a user needs).
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ..core.errors import InputError

SCHEMA_DIR = Path(__file__).resolve().parent.parent.parent / "config" / "schemas"


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
