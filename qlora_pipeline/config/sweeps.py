"""A task's `sweep:` block expanded into points: each point is the task's lora/train/recovery
settings with some keys replaced, and a seed, under a readable id that stays the same as long
as its settings do (`r16-lr3e-4`, `r16-lr3e-4-s1`).

A point's QLoRA training is named by its lora/train keys and seed alone (its `qlora`), so
points that differ only in recovery keys share one training and each recover it their own way.

Expanded when the config is loaded, so a bad value fails before any job runs: every point's
settings are validated by the task schema like a task file's. Written by hand because the
expansion is two itertools calls; the rest is naming and checking.
"""

from __future__ import annotations

import copy
import itertools
import re

from ..core.errors import InputError
from .schema import did_you_mean, validate
from .trainings import BLOCKS
TRAINED = ("lora", "train")  # the blocks a QLoRA training reads
SHARED = "shared"  # the training id when no lora/train key is swept (and no seeds)
# Short names for the keys users sweep most; any other key is named by its last part.
SHORT = {"lora.r": "r", "lora.alpha": "alpha", "lora.dropout": "dropout",
         "lora.target_modules": "", "train.learning_rate": "lr", "train.max_steps": "steps",
         "train.batch_size": "bs", "train.warmup_ratio": "warmup",
         "recovery.steps": "rsteps", "recovery.learning_rate": "rlr"}
OPTIONS = ("mode", "seeds", "variants", "promote")


def expand(task: dict, schema: dict, where: str, seed: int) -> dict[str, dict]:
    """{point id: {"id", "settings": {dotted key: value}, "seed", "lora", "train", "recovery",
    "qlora": the id of its QLoRA training}} for a task with a sweep block, {} without one.
    `schema`: the task schema, which checks every point's blocks; `seed`: the run's seed, used
    when the sweep lists no seeds."""
    sweep = task.get("sweep")
    if not sweep:
        return {}
    keys = sorted(key for key in sweep if key not in OPTIONS)  # sorted, as the config is
    if not keys:
        raise InputError(f"{where}: key 'sweep': found no swept key (only {sorted(sweep)}); "
                         f"expected a dotted key with a list, such as lora.r: [4, 8, 16]")
    for key in keys:
        check_key(key, schema, where)
    check_options(task, keys, where)
    values = [sweep[key] for key in keys]
    lengths = {key: len(v) for key, v in zip(keys, values)}
    if sweep["mode"] == "zip" and len(set(lengths.values())) > 1:
        raise InputError(f"{where}: key 'sweep': mode zip pairs the i-th values of every "
                         f"key, found lists of lengths {lengths}; expected equal lengths")
    combos = zip(*values) if sweep["mode"] == "zip" else itertools.product(*values)
    seeds = sweep.get("seeds")
    points: dict[str, dict] = {}
    for combo in combos:
        settings = dict(zip(keys, combo))
        for point_seed in seeds or [seed]:
            name = point_id(settings, point_seed if seeds else None)
            if name in points:
                raise InputError(f"{where}: key 'sweep': two points are both named {name!r} "
                                 f"({points[name]['settings']} and {settings}); expected "
                                 f"distinct values")
            points[name] = point(task, settings, point_seed, schema, where, name)
            trained = {k: v for k, v in settings.items() if k.split(".")[0] in TRAINED}
            points[name]["qlora"] = point_id(trained, point_seed if seeds else None) or SHARED
    return points


def selection_variant(sweep: dict) -> str:
    """The variant the points are compared on: the most trained one they are scored as."""
    return "recovered" if "recovered" in sweep["variants"] else "qlora"


def check_key(key: str, schema: dict, where: str) -> None:
    candidates = [f"{b}.{k}" for b in BLOCKS for k in schema["properties"][b]["properties"]
                  if f"{b}.{k}" not in ("recovery.enabled", "train.report_to")]
    if key not in candidates:
        raise InputError(f"{where}: key 'sweep.{key}': not a setting a sweep can vary"
                         f"{did_you_mean(key, candidates)}; "
                         f"expected a dotted key of {', '.join(BLOCKS)} such as lora.r or "
                         f"train.learning_rate (recovery.enabled: list recovered in "
                         f"sweep.variants instead)")


def check_options(task: dict, keys: list[str], where: str) -> None:
    """What the schema cannot say: recovery keys and the recovered variant need recovered
    points, recovered points need the task's recovery, and promoting needs the points compared
    on the variant the task ships."""
    sweep, recovery = task["sweep"], task["recovery"]["enabled"]
    recovered = "recovered" in sweep["variants"]
    swept_recovery = [k for k in keys if k.startswith("recovery.")]
    if swept_recovery and not recovered:
        raise InputError(f"{where}: key 'sweep.{swept_recovery[0]}': found the points scored as "
                         f"{sweep['variants']} only, so a recovery setting changes no score; "
                         f"expected recovered in sweep.variants")
    if recovered and not recovery:
        raise InputError(f"{where}: key 'sweep.variants': found recovered, but the task's "
                         f"recovery.enabled is false; expected recovery enabled, so that the "
                         f"points recover as the task's own adapter does")
    if sweep.get("promote") and recovery and not recovered:
        raise InputError(f"{where}: key 'sweep.promote': the task ships a recovered adapter, "
                         f"found the points scored as {sweep['variants']}; expected recovered in "
                         f"sweep.variants, so that the point promoted is chosen on what ships")


def point(task: dict, settings: dict, seed: int, schema: dict, where: str, name: str) -> dict:
    """The point's lora/train/recovery blocks, checked by the task schema's own rules."""
    blocks = {block: copy.deepcopy(task[block]) for block in BLOCKS}
    for key, value in settings.items():
        block, _, leaf = key.partition(".")
        blocks[block][leaf] = copy.deepcopy(value)
    sub = {"type": "object", "properties": {b: schema["properties"][b] for b in BLOCKS}}
    validate(blocks, sub, f"{where} (sweep point {name})")
    return {"id": name, "settings": settings, "seed": seed, **blocks}


def point_id(settings: dict, seed: int | None) -> str:
    """`r16-lr3e-4` for {lora.r: 16, train.learning_rate: 3e-4}; `-s<seed>` when the sweep
    lists seeds."""
    parts = [f"{SHORT.get(key, key.rsplit('.', 1)[-1])}{value_text(value)}"
             for key, value in sorted(settings.items())]
    if seed is not None:
        parts.append(f"s{seed}")
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", "-".join(parts))


def value_text(value) -> str:
    """3e-4 for 0.0003, 0.05 for 0.05, 16 for 16, q_proj+v_proj for a list."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value != 0 and abs(value) < 0.01:
            mantissa, exponent = f"{value:.6e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(value_text(v) for v in value)
    return str(value)
