"""The variants a run makes of each task (core/layout.py's grammar), one definition for the
rules (what the report scores) and for qlora-chat --variant (what it may open)."""

from __future__ import annotations

from ..core.layout import COMBINED, VARIANT_KINDS, Variant
from . import trainings


def kinds(task: dict) -> list[str]:
    """The kinds of a task's own models: recovered and compressed only where it enables them."""
    left_out = {"recovered": not task["recovery"]["enabled"],
                "compressed": task["compress"] is None}
    return [kind for kind in VARIANT_KINDS if not left_out.get(kind)]


def of_task(task: str, tasks: dict[str, dict], combinations: list[dict]) -> list[str]:
    """Every variant of `task`'s own: its kinds, its sweep's trainings (qlora@<training>,
    recovered@<point>) and the combinations holding it (combined+<name>)."""
    points = {id: row for id, row in tasks[task]["trainings"].items() if id}
    return [*kinds(tasks[task]), *trainings.adapters(points),
            *[f"{COMBINED}+{c['name']}" for c in combinations if task in c["tasks"]]]


def made(variant: str, task: str, tasks: dict[str, dict], combinations: list[dict]) -> bool:
    """Whether the run makes `variant` for `task`: one of its own, or another task's model
    (`<kind>+<task>[@<training>]`: that task's own variant without the source)."""
    try:
        found = Variant.parse(variant)
    except ValueError:
        return False
    if found.source and found.kind != COMBINED:
        return found.source in tasks and found.adapter_name in of_task(found.source, tasks, [])
    return variant in of_task(task, tasks, combinations)
