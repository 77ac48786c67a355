"""The config's `combinations:`: several tasks' QLoRA adapters combined into one adapter
(analysis/combine.py computes it), each scored on its tasks beside the adapters it came from.

Checked when the config is loaded, so a bad combination fails before any job with one line
naming it; torch-free, as everything the rules import at parse time. The method names are
here, the arithmetic in analysis/combine.py.
"""

from __future__ import annotations

from ..analysis.combination_methods import DENSITY, EXACT, FACTOR_WISE, METHODS, TRUNCATED
from ..core.errors import InputError
from ..core.layout import COMBINED


def check(combinations: list[dict], tasks: list[str], known: list[str]) -> dict[str, dict]:
    """{name: the combination with weights filled in (1 each by default)}, or InputError.
    A combination of known tasks (files in task_dir) that this run does not list is left out,
    so that `--config 'tasks=[one]'` runs one task of a config that combines two."""
    if combinations and COMBINED in tasks:
        raise InputError(f"config key 'tasks': a task named {COMBINED!r} with combinations; "
                         f"expected another name (adapters/{COMBINED}/ holds the combinations)")
    found = {}
    for i, item in enumerate(combinations):
        where = f"config key 'combinations[{i}]' ({item['name']})"
        if item["name"] in found:
            raise InputError(f"{where}: name {item['name']!r} is used twice; expected one "
                             f"name per combination (its folder is adapters/combined/<name>)")
        unknown = [t for t in item["tasks"] if t not in known]
        if unknown:
            raise InputError(f"{where}: tasks {unknown} have no file in the task folder; "
                             f"expected tasks among {', '.join(known)}")
        if all(t in tasks for t in item["tasks"]):
            found[item["name"]] = checked(item, where)
    return found


def check_bases(combinations: list[dict], bases: dict[str, str | None]) -> None:
    """Refuse a combination of a task whose adapter was trained on a base of its own (lora.init
    pissa, or loftq with iterations > 1): that adapter holds part of its own base, and a
    combination is built and scored on the shared quantized base. `bases`: {task: its own
    training's base id, or None}."""
    for i, item in enumerate(combinations):
        own = [task for task in item["tasks"] if bases.get(task)]
        if own:
            raise InputError(f"config key 'combinations[{i}]' ({item['name']}): tasks {own} "
                             f"train on a quantized base of their own ({bases[own[0]]}: "
                             f"lora.init pissa, or loftq with iterations > 1), not the shared "
                             f"one the combination is built on; expected tasks trained on "
                             f"the shared base (lora.init true, gaussian, or loftq with "
                             f"iterations 1)")


def checked(item: dict, where: str) -> dict:
    method = item["method"]
    if method in FACTOR_WISE:
        raise InputError(f"{where}: method {method!r} is PEFT's, which combines A and B "
                         f"separately and adds cross terms no task trained (PEFT #3004); "
                         f"expected {FACTOR_WISE[method]!r}, the same on the updates ΔW")
    if method not in METHODS:
        raise InputError(f"{where}: method {method!r}; expected one of {', '.join(METHODS)}")
    weights = item["weights"] if item["weights"] is not None else [1.0] * len(item["tasks"])
    if len(weights) != len(item["tasks"]):
        raise InputError(f"{where}: {len(weights)} weights for {len(item['tasks'])} tasks; "
                         f"expected one weight per task, in the order of 'tasks'")
    if (item["density"] is None) == (method in DENSITY):
        raise InputError(f"{where}: density {item['density']!r} with method {method!r}; "
                         f"expected a density in (0, 1] for {', '.join(DENSITY)} and none "
                         f"for the others")
    if item["svd_rank"] is not None and method in EXACT:
        raise InputError(f"{where}: svd_rank {item['svd_rank']} with method {method!r}, which "
                         f"keeps every rank; expected svd_rank only with {', '.join(TRUNCATED)}")
    return {**item, "weights": [float(w) for w in weights]}

