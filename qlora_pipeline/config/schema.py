"""JSON-schema validation of the run configuration and the task files, with the schema's
defaults filled in and one readable line per problem.

jsonschema does the checking; we format its errors ourselves so that a message names the
file, the key path, the value found and what was expected (snakemake.utils.validate prints
the whole schema instead, which buries the one line a user needs).
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ..core.errors import InputError

SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
SCHEMA_DIR = Path(__file__).resolve().parent.parent.parent / "config" / "schemas"


def load_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:  # libyaml's parser where PyYAML has it: the same documents, ten times faster
        return yaml.load(path.read_text(encoding="utf-8"), Loader=SAFE_LOADER)
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                         f"{err.start}); expected a YAML file") from None
    except RecursionError:
        raise InputError(f"{path}: nested deeper than Python reads; expected a YAML file of "
                         f"settings") from None


def load_schema(name: str) -> dict:
    return copy.deepcopy(_schema(name))  # a copy: callers may change theirs


@functools.cache
def _schema(name: str) -> dict:
    """Read once per process (the task schema serves every task and sweep point)."""
    return load_yaml(SCHEMA_DIR / name)


def _read(text: str) -> Any:
    """What a --config text stands for: JSON first (3e-4 is a number there, a string in
    YAML 1.1), else YAML (unquoted words, flow mappings); text that is neither stays text."""
    for load in (json.loads, yaml.safe_load):
        try:
            return load(text)
        except (ValueError, yaml.YAMLError):
            pass
    return text


def _key_schema(schema: dict, key: str) -> dict:
    """What a mapping's key takes: its property's schema, else the additional keys' one."""
    sub = schema.get("properties", {}).get(key, schema.get("additionalProperties"))
    return sub if isinstance(sub, dict) else {}


def coerce(value: Any, schema: dict) -> Any:
    """`value` with its text leaves read as the types `schema` takes (Snakemake reads nested
    --config values with YAML's BaseLoader: every leaf a string). A leaf becomes what its text
    reads as where the schema takes that; else it stays text, so validation names the key.
    Hand-written: jsonschema checks types but converts nothing."""
    if isinstance(value, dict):
        return {key: coerce(item, _key_schema(schema, key)) for key, item in value.items()}
    if isinstance(value, list):
        items = schema.get("items")
        return [coerce(item, items if isinstance(items, dict) else {}) for item in value]
    if not isinstance(value, str):
        return value
    read = _read(value)
    if isinstance(read, (dict, list)):  # a mapping or list given as text
        return coerce(read, schema)
    return read if jsonschema.Draft202012Validator(schema).is_valid(read) else value


def did_you_mean(name: str, choices: list[str]) -> str:
    """" (did you mean '<the closest choice>'?)", or "" when none is close."""
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _condition(error: jsonschema.ValidationError, schema: dict) -> str:
    """' when <key> is <value>' for an error raised by the `then` of an if/then rule."""
    path = list(error.schema_path)
    if "then" not in path:
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


# What a failed keyword expected, where the message is "found <value>, expected <this>".
EXPECTED = {"type": "a value of type {}", "minimum": "a number >= {}",
            "maximum": "a number <= {}", "exclusiveMinimum": "a number > {}",
            "exclusiveMaximum": "a number < {}", "minItems": "at least {} item(s)",
            "uniqueItems": "no repeated items", "pattern": "a string matching {}",
            "enum": "one of {}", "const": "one of {}"}  # enum: its values joined by commas


def _describe(error: jsonschema.ValidationError, schema: dict) -> str:
    key = ".".join(str(p) for p in error.absolute_path) or "<top level>"
    value = error.validator_value
    if error.validator == "required":
        missing = next((k for k in value if k not in error.instance and repr(k) in error.message),
                       error.message.split("'")[1])
        found_keys = ", ".join(map(str, error.instance)) or "none"
        return (f"key '{key}': missing required key '{missing}' (found keys: {found_keys}); "
                f"expected '{missing}' to be set{_condition(error, schema)}")
    if error.validator == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        hints = [f"'{name}'{did_you_mean(str(name), allowed)}"
                 for name in error.instance if name not in allowed]
        return (f"key '{key}': found unknown key(s) {', '.join(hints)}; expected only "
                f"{', '.join(allowed) or 'no keys'} (check the spelling; see "
                f"docs/configuration.md)")
    if error.validator == "oneOf" and all(
            isinstance(alt, dict) and set(alt) == {"required"} for alt in value):
        options = " | ".join(" + ".join(alt["required"]) for alt in value)
        keys = dict.fromkeys(k for alt in value for k in alt["required"])
        # Not a mapping (its type error is listed too): every `required` holds, so all match.
        mapping = error.instance if isinstance(error.instance, dict) else {}
        found = ", ".join(k for k in keys if k in mapping) or f"none of {', '.join(keys)}"
        return (f"key '{key}': found {found}; expected exactly one of: "
                f"{options}{_condition(error, schema)}")
    found = json.dumps(error.instance, default=str)
    if len(found) > 80:
        found = found[:77] + "..."
    shown = ", ".join(map(str, value)) if error.validator == "enum" else value
    expected = EXPECTED.get(error.validator, f"{error.validator} {{}}").format(shown)
    return f"key '{key}': found {found}, expected {expected}{_condition(error, schema)}"


def _defaulting_validator(schema: dict) -> jsonschema.Draft202012Validator:
    """A Draft 2020-12 validator that also fills in schema defaults (like snakemake's validate)."""
    base = jsonschema.Draft202012Validator

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    cls = jsonschema.validators.extend(base, {"properties": set_defaults})
    # format_checker: `format: regex` keys are compiled when the config is read
    return cls(schema, format_checker=base.FORMAT_CHECKER)


def validate(instance: Any, schema: dict, where: str) -> Any:
    """Validate `instance` in place (filling defaults); raise InputError naming `where`."""
    errors = sorted(_defaulting_validator(schema).iter_errors(instance),
                    key=lambda e: list(e.absolute_path))
    if errors:
        lines = "\n  ".join(_describe(e, schema) for e in errors[:10])
        raise InputError(f"{where}: invalid configuration:\n  {lines}")
    return instance
