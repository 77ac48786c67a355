"""Files written complete or not at all (a temporary sibling renamed into place at the end,
durably: its files fsynced before the rename, the folder that holds the name after it), and
the JSON and JSON-lines format every stage writes its records in."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator


def sync_tree(path: str | Path) -> float:
    """fsync every file under `path` (or the file) and every folder, deepest first, so that
    what a rename publishes is on disk, not only in the page cache; returns the seconds spent.
    By hand: the standard library and the usual packages (atomicwrites, filelock) sync one
    file, never a folder's contents."""
    path, started = Path(path), time.perf_counter()
    if path.is_dir():
        for folder, _, names in os.walk(path, topdown=False):
            for name in names:
                if not os.path.islink(Path(folder, name)):  # its target is not the output's
                    _fsync(Path(folder, name), os.O_RDONLY)
            _fsync(Path(folder), os.O_DIRECTORY)
    else:
        _fsync(path, os.O_RDONLY)
    return time.perf_counter() - started


def replace_durably(source: str | Path, target: str | Path) -> None:
    """Rename a synced `source` (file or folder) to `target`, then sync the folder holding the
    new name: after a power loss `target` is the old one or the complete new one."""
    sync_tree(source)
    os.replace(source, target)
    _fsync(Path(target).parent, os.O_DIRECTORY)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; outputs are for everyone to read
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        replace_durably(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file that replaces `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        replace_durably(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_file(path) as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    with atomic_file(path) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file. Lines end at "\n" only: JSON strings may hold raw
    U+2028 or U+0085, at which str.splitlines() would also cut."""
    return [json.loads(line) for line in
            Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]


def config_hash(config_slice: Any) -> str:
    canonical = json.dumps(config_slice, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def checksum(path: str | Path) -> str:
    """sha256 of a file, or of a directory's files (names and contents, sorted)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
