"""Checkpoints a resume can trust, and one training at a time per checkpoint folder.

Trainer writes a checkpoint's files without a mark of completeness that survives damage: a
job killed while saving, a full disk or a flipped bit leaves files that still load, wrongly.
After Trainer's save we write a manifest, last (each file's size and sha256, the files
fsynced first); a resume trusts only a checkpoint whose files match it.

The lock: the job that trains holds an exclusive fcntl.flock on `<root>/.lock` for the whole
training, so a second job (a rerun while a warm-start copy still finishes its save) refuses
instead of writing into, or discarding, the same checkpoints. The kernel drops the lock when
the holder dies, so a killed job leaves no stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
from pathlib import Path
from typing import Iterator

from ..core.errors import InputError
from ..core.files import read_json, write_json

MANIFEST = "manifest.json"
LOCK = ".lock"


def _synced_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())  # on disk before the manifest vouches for it
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: str | Path) -> None:
    """Record every file of the checkpoint `folder` (relative path, size, sha256) in its
    manifest, written atomically and last."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): {"size": p.stat().st_size,
                                            "sha256": _synced_digest(p)} for p in files}
    write_json(folder / MANIFEST, {"files": entries})
    _synced_digest(folder / MANIFEST)
    _fsync_dir(folder)


def verify(folder: str | Path) -> str | None:
    """What is wrong with the checkpoint `folder` (the first file found wrong: missing, its
    size, its checksum), or None where every file matches its manifest."""
    folder = Path(folder)
    try:
        wants = {name: (want["size"], want["sha256"])
                 for name, want in read_json(folder / MANIFEST)["files"].items()}
    except FileNotFoundError:
        return f"{MANIFEST} missing (the save did not finish)"
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # damaged itself
        return f"{MANIFEST} unreadable ({type(error).__name__}: {error})"
    for name, (size, sha256) in sorted(wants.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != size:
            return f"{name}: size {path.stat().st_size} bytes, expected {size}"
        with open(path, "rb") as handle:
            if hashlib.file_digest(handle, "sha256").hexdigest() != sha256:
                return f"{name}: sha256 differs from the manifest's"
    return None


@contextlib.contextmanager
def locked(root: str | Path) -> Iterator[None]:
    """Hold the checkpoint folder `root` for this process; refuse (InputError naming the
    folder and the holder written in the lock file) while another job holds it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "holder not recorded"
            raise InputError(f"checkpoints {root} are being written by another running job "
                             f"({holder}); wait for it or stop it") from None
        # The holder may have removed the folder on success (runner.py) between our open and
        # our lock: ours is then on a deleted file, which a newcomer would not see.
        if not path.exists() or os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino:
            with locked(root):
                yield
            return
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield
