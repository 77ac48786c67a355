"""The trainings table: every training the run makes, one row each, built when the config is
read. A task's own training is the row with id "" (its adapters are `qlora` and `recovered`);
each point of its sweep is a row under the point's id (sweeps.py), whose adapters are
`qlora@<training>` and `recovered@<point>` (core/layout.py's grammar). One set of rules
trains, recovers, scores and analyses any row (rules/train.smk): a new way to train is a new
row, never a copy of the rules.

A row: {"id", "lora", "train", "recovery", "seed", "settings" (its swept values), "qlora" (the
id of its QLoRA training, which rows that differ only in recovery keys share), "recovered"
(whether it is recovered), "scored" (the adapter kinds it is scored as), "report_to" (its
trackers, outside its train block), "base" (None: it trains on the shared quantized base; else
the id of its own, `with_bases`)}.
"""

from __future__ import annotations

from ..core.files import config_hash
from ..core import layout
from ..core.errors import InputError
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


# lora.init values set from the base's weights (training/init.py; training/lora.WEIGHT_DERIVED,
# not imported: it loads torch, and the config is read when the workflow is parsed).
WEIGHT_DERIVED = ("loftq", "pissa")


def check_inits(rows: dict[str, dict], merge_base: str, where: str) -> None:
    """Refuse what would put an adapter initialised from the base's weights on the
    full-precision base W0: it holds part of the base it was trained on (PiSSA's top
    directions, LoftQ's correction of the quantization error), so W0 + ΔW counts that part
    twice. Recovery continues an adapter on W0; merge.base full merges into W0."""
    derived = {id or "the task's own": row for id, row in rows.items()
               if row["lora"]["init"] in WEIGHT_DERIVED}
    recovered = [name for name, row in derived.items() if row["recovered"]]
    if recovered:
        raise InputError(f"{where}: trainings {recovered} have lora.init loftq or pissa and are "
                         f"recovered; expected no recovery for them (recovery.enabled false, no "
                         f"'recovered' in sweep.variants): recovery continues an adapter on the "
                         f"full-precision base, and theirs holds part of the base they trained on")
    patterned = [name for name, row in derived.items()
                 if row["lora"]["use_rslora"] and row["lora"]["rank_pattern"]]
    if patterned:
        raise InputError(f"{where}: trainings {patterned} have lora.init loftq or pissa with "
                         f"use_rslora and a rank_pattern; expected one of the two: PEFT cannot "
                         f"convert such an adapter to a plain LoRA adapter (converted/)")
    own = derived.get("the task's own")
    if merge_base == "full" and own:
        raise InputError(f"{where}: merge.base full with lora.init {own['lora']['init']}; "
                         f"expected auto or dequantized: the adapter holds part of the base it "
                         f"trained on, which the full-precision base holds too")


# The lora keys that decide a training's own quantized base (with the init's own block and the
# quantization and seed): rows equal in these share one base.
BASE_KEYS = ("init", "r", "alpha", "use_rslora", "target_modules", "layers_to_transform",
             "rank_pattern")


def has_own_base(lora: dict) -> bool:
    """PiSSA quantizes its residual W − s·BA, LoftQ with more than one step quantizes
    W − s·BA again: a base of the training's own. LoftQ's one step keeps the shared base."""
    return lora["init"] == "pissa" or (lora["init"] == "loftq"
                                       and lora["loftq"]["iterations"] > 1)


def base_settings(lora: dict) -> dict:
    """What of a lora block its own base is built from (the stage's `lora` param)."""
    return {**{key: lora[key] for key in BASE_KEYS}, lora["init"]: lora[lora["init"]]}


def with_bases(rows: dict[str, dict], quantization: dict) -> dict[str, dict]:
    """The rows with "base": None, or `<init>-<hash>` of exactly what builds that base (the
    settled quantization, base_settings, the seed), so rows that would build one share it."""
    def base(row):
        settings = {"quantization": quantization, "lora": base_settings(row["lora"]),
                    "seed": row["seed"]}
        return f"{row['lora']['init']}-{config_hash(settings)[:10]}"

    return {id: {**row, "base": base(row) if has_own_base(row["lora"]) else None}
            for id, row in rows.items()}


def bases(rows: dict[str, dict]) -> dict[str, dict]:
    """{base id: the first row that trains on it}, of the rows with a base of their own."""
    found: dict[str, dict] = {}
    for row in rows.values():
        if row["base"]:
            found.setdefault(row["base"], row)
    return found


def own_base(tables: dict[str, dict], variant: str, task: str) -> str | None:
    """The folder of the quantized base `variant` (scored on `task`) was trained on when it is
    its training's own (None: the shared one, or no quantized base). `tables`: {task: rows}."""
    found = layout.Variant.parse(variant)
    source = found.source or task
    if layout.ADAPTERS.get(found.kind) != "quantized" or source not in tables:
        return None
    name = found.adapter_name if found.kind in TRAINED else "qlora"  # compressed: its qlora's
    own = by_adapter(tables[source], name)["base"]
    return layout.training_base(own) if own else None
