"""The dataset stage: read a task's examples from its source and write train/validation/test.

Sources: `builtin` generators, `local` files (jsonl, json, csv, parquet) and the `hub`
(through datasets.load_dataset at a pinned revision). Given splits are used as they are;
missing validation/test splits are carved from train with the dataset's seed.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import random
from pathlib import Path

from ..core.errors import InputError
from ..core.files import read_jsonl
from . import builtin, formats

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")


# ---- local files -----------------------------------------------------------------------------

def _text(path: Path) -> str:
    """The file's text; a non-UTF-8 byte is reported with its line and byte offset.

    A leading UTF-8 byte-order mark (as spreadsheet programs write) is dropped.
    """
    data = path.read_bytes()
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = err.start + skip
        line = data[:offset].count(b"\n") + 1
        raise InputError(f"{path}: line {line}: not valid UTF-8 (byte {data[offset]:#04x} at "
                         f"offset {offset}); expected a UTF-8 encoded file") from None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """An object whose keys repeat is refused: json keeps the last silently, so a record
    would lose the text its earlier key held."""
    record = dict(pairs)
    if len(record) < len(pairs):
        seen = [key for key, _ in pairs]
        raise ValueError(f"key {next(k for k in seen if seen.count(k) > 1)!r} repeated")
    return record


def _loads(text: str, path: Path, line: int | None, expected: str):
    """JSON text read as Python, or one line naming the file and the line (of a JSON-lines
    file; of the error in a JSON file, where known)."""
    where = f"{path}: line {line}" if line else str(path)
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: line {line or err.lineno}: malformed JSON ({err.msg} at "
                         f"column {err.colno}); expected {expected}") from None
    except ValueError as err:  # a repeated key
        raise InputError(f"{where}: {err}; expected each key once per object") from None
    except RecursionError:
        raise InputError(f"{where}: JSON nested deeper than Python reads; expected "
                         f"{expected}") from None


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    # Read by hand rather than with datasets' json builder: its errors do not say which line.
    # Split on "\n" only: str.splitlines() also splits on U+2028, U+0085 and friends, which
    # JSON strings may contain unescaped.
    rows = []
    for number, line in enumerate(_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        rows.append((f"{path}: line {number}",
                     _loads(line, path, number, "one JSON object per line")))
    return rows


def _read_json(path: Path) -> list[tuple[str, dict]]:
    data = _loads(_text(path), path, None, 'a list of records or {"data": [records]}')
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of records or {{\"data\": [records]}}, "
                         f"found {type(data).__name__}")
    return [(f"{path}: record {i}", row) for i, row in enumerate(data)]


def _read_csv(path: Path) -> list[tuple[str, dict]]:
    """CSV with a header line; every value is kept as text.

    Read with the csv module rather than pandas: pandas turns a column of numbers (the
    answers of an arithmetic task) into ints, silently uses an extra field as the row index,
    and cannot say on which line a multi-line quoted record starts.
    """
    # A record's text may be long (a 1 MB document, as a JSON line may hold): no field limit
    # beyond the largest the csv module takes (its default is 128 KiB).
    csv.field_size_limit(2**31 - 1)
    reader = csv.reader(io.StringIO(_text(path), newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise InputError(f"{path}: the dataset is empty; expected a header line and at "
                             f"least one record")
        if len(set(header)) != len(header) or not all(header):
            raise InputError(f"{path}: line 1: header {header}; expected distinct, non-empty "
                             f"column names")
        rows, end = [], reader.line_num
        for row in reader:
            start, end = end + 1, reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise InputError(f"{path}: line {start}: {len(row)} fields; expected "
                                 f"{len(header)}, one per header column {header}")
            rows.append((f"{path}: line {start}", dict(zip(header, row))))
    except csv.Error as err:
        raise InputError(f"{path}: line {reader.line_num}: not readable as CSV ({err}); "
                         f"expected comma-separated values with a header line") from None
    return rows


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    # pyarrow rather than pandas: pandas turns a null in a text column into a float NaN and
    # lists into numpy arrays; to_pylist gives plain Python (None, lists, dicts).
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a broken file
        raise InputError(f"{path}: not a readable parquet file ({err}); expected an Apache "
                         f"Parquet table") from None
    return [(f"{path}: row {i}", row) for i, row in enumerate(records)]


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
           ".parquet": _read_parquet}


def read_local(path: str | Path) -> list[tuple[str, dict]]:
    """Rows of a local file as (where, record) pairs, `where` naming file and line/row."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: dataset file not found; expected an existing file (a "
                         f"relative path is taken from the working directory)")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise InputError(f"{path}: unsupported file type '{path.suffix}'; "
                         f"expected one of {', '.join(READERS)}")
    rows = reader(path)
    if not rows:
        raise InputError(f"{path}: the dataset is empty; expected at least one record")
    return rows


# ---- hub ---------------------------------------------------------------------------------

def read_hub(cfg: dict) -> dict[str, list[tuple[str, dict]]]:
    """Splits from datasets.load_dataset at the pinned revision.

    `name` may also be a local folder laid out like a hub dataset repo (how the tests run
    this path without a network): datasets reads its data files (data/<split>-*.parquet,
    <split>.jsonl, ...) with the packaged builders. A local folder has no git history, so
    datasets ignores `revision` there (checked with datasets 5.2); it is still required so
    that the same task file pins a revision once it points at the hub.
    """
    import datasets

    wanted = cfg.get("splits") or {"train": "train"}
    out = {}
    for split, source_split in wanted.items():
        try:
            data = datasets.load_dataset(cfg["name"], cfg.get("subset"), split=source_split,
                                         revision=cfg["revision"])
        except (FileNotFoundError, ValueError, ConnectionError,
                datasets.exceptions.DatasetNotFoundError) as err:
            raise InputError(f"dataset.name '{cfg['name']}' (revision {cfg['revision']}, split "
                             f"'{source_split}'): could not be loaded: {err}; expected a dataset "
                             f"on the hub (reachable, or in the local cache when offline) or a "
                             f"local folder, with that subset and split") from None
        where = f"hub dataset {cfg['name']}@{cfg['revision']} split {source_split}"
        out[split] = [(f"{where}: row {i}", row) for i, row in enumerate(data)]
        if not out[split]:
            raise InputError(f"{where}: the split is empty; expected at least one record")
    return out


# ---- assembling the splits ---------------------------------------------------------------

def _map_columns(record: dict, columns: dict[str, str], where: str) -> dict:
    if not columns:
        return record  # as it is: check_record refuses a record that is not an object
    for field, column in columns.items():
        if column not in record:
            raise InputError(f"{where}: dataset.columns maps '{field}' to column '{column}', "
                             f"which is missing (found columns: {sorted(record)})")
    return {**record, **{field: record[column] for field, column in columns.items()}}


def _prepare(rows: list[tuple[str, dict]], cfg: dict, fmt: str) -> list[dict]:
    out = []
    for where, record in rows:
        record = _map_columns(record, cfg.get("columns") or {}, where)
        out.append(_writable(formats.clean(formats.check_record(record, fmt, where), fmt), where))
    return out


def _writable(record: dict, where: str) -> dict:
    """The record as the split file will hold it (UTF-8 JSON), refused here where it cannot:
    a lone surrogate ("\\ud800" in JSON) reads as text but encodes to no UTF-8; a parquet
    value such as a timestamp has no JSON form."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(f"{where}: text holds {err.object[err.start:err.end]!r}, a lone UTF-16 "
                         f"surrogate; expected Unicode text") from None
    except (TypeError, ValueError) as err:
        raise InputError(f"{where}: {err}; expected values JSON holds (text, numbers, lists, "
                         f"objects)") from None
    return record


def carve(splits: dict[str, list], cfg: dict) -> dict[str, list]:
    """Fill missing validation/test splits from a seeded shuffle of train."""
    splits = dict(splits)
    train = list(splits["train"])
    random.Random(cfg.get("seed", 0)).shuffle(train)
    n = len(train)
    for split in ("validation", "test"):
        if split not in splits:
            take = max(1, round(n * cfg.get(f"{split}_fraction", 0.1)))
            splits[split], train = train[:take], train[take:]
    if not train:
        raise InputError(f"dataset: only {n} training examples, too few to carve validation "
                         f"and test splits from; add examples or give those splits")
    splits["train"] = train
    return splits


def with_system_prompt(record: dict, text: str) -> dict:
    """A chat record with `text` as its system message, unless it has its own. Without one,
    chat templates such as SmolLM2's insert a default system prompt of their own."""
    if record["messages"][0]["role"] == "system":
        return record
    return {**record, "messages": [{"role": "system", "content": text}, *record["messages"]]}


def read_split(raw_dir: str | Path, split: str) -> list[dict]:
    """One split written by the fetch_dataset stage."""
    return read_jsonl(Path(raw_dir) / f"{split}.jsonl")


def fetch(cfg: dict, fmt: str) -> dict[str, list[dict]]:
    """All three splits of a task's dataset, each record checked and in `fmt`'s fields."""
    source = cfg["source"]
    if source == "builtin":
        generated = builtin.generate(cfg["name"], cfg["num_examples"], cfg.get("seed", 0),
                                     cfg.get("options"))
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
    if cfg.get("system_prompt") is not None:
        splits = {s: [with_system_prompt(r, cfg["system_prompt"]) for r in rows]
                  for s, rows in splits.items()}
    if cfg.get("max_examples"):
        splits = {s: rows[: cfg["max_examples"]] for s, rows in splits.items()}
    for split in SPLITS:
        log.info("split %s: %d examples", split, len(splits[split]))
    return splits
