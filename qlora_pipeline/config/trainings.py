"""The trainings table: every training the run makes, one row each, built when the config is
read. A task's own training is the row with id "" (its adapters are `qlora` and `recovered`);
each point of its sweep is a row under the point's id (sweeps.py), whose adapters are
`qlora@<training>` and `recovered@<point>` (core/layout.py's grammar). One set of rules
trains, recovers, scores and analyses any row (rules/train.smk): a new way to train is a new
row, never a copy of the rules.

A row: {"id", "lora", "train", "recovery", "seed", "settings" (its swept values), "qlora" (the
id of its QLoRA training, which rows that differ only in recovery keys share), "recovered"
(whether it is recovered), "scored" (the adapter kinds it is scored as), "report_to" (its
trackers, outside its train block)}.
"""

from __future__ import annotations

from ..core.layout import TRAINED

BLOCKS = ("lora", "train", "recovery")


def rows(task: dict, points: dict[str, dict], seed: int) -> dict[str, dict]:
    """{id: row} of one task: its own training and its sweep's `points` (sweeps.expand);
    `seed`: the run's, its own training's."""
    own = {"id": "", **{block: task[block] for block in BLOCKS}, "seed": seed, "settings": {},
           "qlora": "", "recovered": task["recovery"]["enabled"], "scored": []}
    # A point (sweeps.expand) has its row's id, blocks, seed, settings and qlora already.
    points = {name: {**point, "recovered": "recovered" in task["sweep"]["variants"],
                     "scored": list(task["sweep"]["variants"])} for name, point in points.items()}
    return {id: untracked(row) for id, row in {"": own, **points}.items()}


def untracked(row: dict) -> dict:
    """The row with train.report_to moved out of its train block to a key of its own: the
    tracker changes no adapter, so it is in no rule's train param (Snakemake's params trigger)
    and in no checkpoint key (stages/train.py). Changing it retrains nothing."""
    train = {key: value for key, value in row["train"].items() if key != "report_to"}
    return {**row, "train": train, "report_to": row["train"]["report_to"]}


def adapter_name(row: dict, kind: str) -> str:
    """The name of a row's adapter of `kind` (qlora: its QLoRA training's)."""
    training = row["qlora"] if kind == "qlora" else row["id"]
    return kind + (f"@{training}" if training else "")


def by_adapter(rows: dict[str, dict], name: str) -> dict:
    """The row that makes the adapter `name` (of rows sharing a QLoRA training, the first)."""
    kind, _, training = name.partition("@")
    assert kind in TRAINED, name
    return next(row for row in rows.values()
                if adapter_name(row, kind) == name and (kind == "qlora" or row["recovered"]))


def adapters(rows: dict[str, dict], kinds=TRAINED) -> list[str]:
    """Every adapter name the rows make of these kinds, each once, own first."""
    names = [adapter_name(row, kind) for row in rows.values() for kind in kinds
             if kind == "qlora" or row["recovered"]]
    return list(dict.fromkeys(names))
