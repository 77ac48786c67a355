"""The dataset stage: read a task's examples from its source and write train/validation/test.

Sources: `builtin` generators, `local` files (jsonl, json, csv, parquet) and the `hub`
(through datasets.load_dataset at a pinned revision). Given splits are used as they are;
missing validation/test splits are carved from train with the dataset's seed.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from ..errors import InputError
from . import builtin, formats

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


# ---- local files -----------------------------------------------------------------------------

def _text(path: Path) -> str:
    """The file's text; a non-UTF-8 byte is reported with its line and byte offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise InputError(f"{path}: line {line}: not valid UTF-8 (byte {data[err.start]:#04x} at "
                         f"offset {err.start}); expected a UTF-8 encoded file") from None


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    # Read by hand rather than with datasets' json builder: its errors do not say which line.
    rows = []
    for number, line in enumerate(_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}: line {number}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: line {number}: malformed JSON ({err.msg} at column "
                             f"{err.colno}); expected one JSON object per line") from None
    return rows


def _read_json(path: Path) -> list[tuple[str, dict]]:
    try:
        data = json.loads(_text(path))
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: line {err.lineno}: malformed JSON ({err.msg}); expected a "
                         f"list of records or {{\"data\": [records]}}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of records or {{\"data\": [records]}}, "
                         f"found {type(data).__name__}")
    return [(f"{path}: record {i}", row) for i, row in enumerate(data)]


def _read_table(path: Path) -> list[tuple[str, dict]]:
    import pandas as pd

    if path.suffix == ".csv":
        _text(path)  # the UTF-8 check, with a line number
        try:
            frame = pd.read_csv(path, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise InputError(f"{path}: not a readable CSV file: {err}") from None
        first_line = 2  # after the header
    else:
        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # pyarrow raises several types for a broken file
            raise InputError(f"{path}: not a readable parquet file: {err}") from None
        first_line = None
    rows = []
    for i, row in enumerate(frame.to_dict(orient="records")):
        where = f"{path}: line {i + first_line}" if first_line else f"{path}: row {i}"
        rows.append((where, {k: _plain(v) for k, v in row.items()}))
    return rows


def _plain(value):
    """numpy/arrow values from pandas as plain Python (lists of messages, ints)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def read_local(path: str | Path) -> list[tuple[str, dict]]:
    """Rows of a local file as (where, record) pairs, `where` naming file and line/row."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: dataset file not found")
    if path.suffix not in LOCAL_SUFFIXES:
        raise InputError(f"{path}: unsupported file type '{path.suffix}'; "
                         f"expected one of {', '.join(LOCAL_SUFFIXES)}")
    reader = {".jsonl": _read_jsonl, ".json": _read_json}.get(path.suffix, _read_table)
    rows = reader(path)
    if not rows:
        raise InputError(f"{path}: the dataset is empty; expected at least one record")
    return rows


# ---- hub ---------------------------------------------------------------------------------

def read_hub(cfg: dict) -> dict[str, list[tuple[str, dict]]]:
    """Splits from datasets.load_dataset at the pinned revision.

    `name` may also be a local folder laid out like a hub dataset repo (how the tests run
    this path without a network).
    """
    import datasets

    wanted = cfg.get("splits") or {"train": "train"}
    out = {}
    for split, source_split in wanted.items():
        try:
            data = datasets.load_dataset(cfg["name"], cfg.get("subset"), split=source_split,
                                         revision=cfg["revision"])
        except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
            raise InputError(f"dataset.name '{cfg['name']}' (revision {cfg['revision']}, split "
                             f"'{source_split}'): could not be loaded: {err}") from None
        where = f"hub dataset {cfg['name']}@{cfg['revision']} split {source_split}"
        out[split] = [(f"{where}: row {i}", row) for i, row in enumerate(data)]
        if not out[split]:
            raise InputError(f"{where}: the split is empty; expected at least one record")
    return out


# ---- assembling the splits ---------------------------------------------------------------

def _map_columns(record: dict, columns: dict[str, str], where: str) -> dict:
    if not columns:
        return record
    mapped = dict(record)
    for field, column in columns.items():
        if column not in record:
            raise InputError(f"{where}: dataset.columns maps '{field}' to column '{column}', "
                             f"which is missing (found columns: {sorted(record)})")
        mapped[field] = record[column]
    return mapped


def _prepare(rows: list[tuple[str, dict]], cfg: dict, fmt: str) -> list[dict]:
    out = []
    for where, record in rows:
        record = _map_columns(record, cfg.get("columns") or {}, where)
        out.append(formats.clean(formats.check_record(record, fmt, where), fmt))
    return out


def carve(splits: dict[str, list], cfg: dict) -> dict[str, list]:
    """Fill missing validation/test splits from a seeded shuffle of train."""
    splits = dict(splits)
    train = list(splits["train"])
    random.Random(cfg.get("seed", 0)).shuffle(train)
    n = len(train)
    for split in ("validation", "test"):
        if split not in splits:
            take = max(1, round(n * cfg[f"{split}_fraction"]))
            splits[split], train = train[:take], train[take:]
    if not train:
        raise InputError(f"dataset: only {n} training examples, too few to carve validation "
                         f"and test splits from; add examples or give those splits")
    splits["train"] = train
    return splits


def fetch(cfg: dict, fmt: str) -> dict[str, list[dict]]:
    """All three splits of a task's dataset, each record checked and in `fmt`'s fields."""
    source = cfg["source"]
    if source == "builtin":
        generated = builtin.generate(cfg["name"], cfg["num_examples"], cfg.get("seed", 0))
        splits = {"train": [formats.from_prompt_completion(r, fmt) for r in generated]}
    elif source == "local":
        files = cfg.get("files") or {"train": cfg["path"]}
        splits = {s: _prepare(read_local(p), cfg, fmt) for s, p in files.items()}
    elif source == "hub":
        splits = {s: _prepare(rows, cfg, fmt) for s, rows in read_hub(cfg).items()}
    else:
        raise InputError(f"dataset.source: unknown source '{source}'; "
                         f"expected builtin, local or hub")
    splits = carve(splits, cfg)
    if cfg.get("max_examples"):
        splits = {s: rows[: cfg["max_examples"]] for s, rows in splits.items()}
    for split in SPLITS:
        log.info("split %s: %d examples", split, len(splits[split]))
    return splits
