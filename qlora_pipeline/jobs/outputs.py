"""Complete-or-absent outputs: a stage writes into temporary paths, which are synced to disk
and renamed into place with a provenance.json once it succeeds (core/files.replace_durably).
The one owner of every stage's outputs; a full disk ends it in one line (core/disk.py)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..core import disk
from ..core.files import atomic_dir, replace_durably, sync_tree, write_json
from . import provenance


@contextlib.contextmanager
def stage_outputs(job, policy) -> Iterator[dict[str, Path]]:
    """Own one job's declared outputs (runner.Job): yield a temporary path for each (same
    names); when the block succeeds, write provenance.json and move every output into place.

    A rule declares either one directory (provenance.json goes inside it) or files, one of
    them named `provenance` (written last, so its presence means the rest are in place).
    On failure nothing is left that looks finished, nor a folder made for the outputs; a full
    disk (ENOSPC) is a one-line DiskFull naming the output. provenance records the seconds
    spent making the stage's files durable (fsync_seconds).
    """
    started = provenance.now()
    targets = {name: Path(path) for name, path in job.outputs.items()}
    _remove_leftovers(targets, job.rule)
    made = _missing_folders(targets.values())

    try:
        if not targets:  # a job that declares no output (a test's probe)
            yield {}
        elif "provenance" not in targets:
            if len(targets) != 1:
                raise ValueError(f"rule {job.rule}: outputs {sorted(targets)}: expected one "
                                 f"directory or files that include 'provenance'")
            (name, target), = targets.items()
            with atomic_dir(target) as tmp:
                yield {name: tmp}
                _write_provenance(tmp / "provenance.json", tmp, job, policy, started)
        else:
            with _files(targets, job.rule) as paths:
                yield paths
                _write_provenance(paths["provenance"], paths["provenance"].parent, job,
                                  policy, started)
    except BaseException as err:
        for folder in made:  # deepest first; only those left empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        if full := disk.full_disk(err):
            raise disk.refusal(job.rule, full, targets) from None
        raise


def _write_provenance(path: Path, written: Path, job, policy, started: str) -> None:
    """provenance.json, after the stage's files are synced (the time it took recorded; the
    rename's own sync then finds them clean)."""
    record = provenance.build(job, policy, started)
    write_json(path, {**record, "fsync_seconds": round(sync_tree(written), 3)})


@contextlib.contextmanager
def _files(targets: dict[str, Path], rule: str) -> Iterator[dict[str, Path]]:
    """Temporary paths in one hidden folder beside provenance.json, moved into place after
    the block (provenance last)."""
    staging = targets["provenance"].parent
    staging.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{rule}.tmp-", dir=staging,
                                     ignore_cleanup_errors=True) as tmp:
        paths = {name: Path(tmp, f"{name}-{target.name}") for name, target in targets.items()}
        yield paths
        moved = []
        try:
            for name in sorted(targets, key=lambda n: n == "provenance"):
                targets[name].parent.mkdir(parents=True, exist_ok=True)
                replace_durably(paths[name], targets[name])
                moved.append(targets[name])
        except BaseException:  # e.g. a full disk: no output without the others
            for target in moved:
                target.unlink(missing_ok=True)
            raise


def _missing_folders(targets) -> list[Path]:
    """The folders above the outputs that do not exist yet, deepest first."""
    missing = {folder for target in targets for folder in Path(target).parents
               if not folder.exists()}
    return sorted(missing, key=lambda folder: len(folder.parts), reverse=True)


def _remove_leftovers(targets: dict[str, Path], stage: str) -> None:
    """Temporary folders of an earlier job on these outputs that was killed (a finally block
    does not run under SIGKILL). Safe: Snakemake runs one job per output at a time."""
    if "provenance" in targets:
        patterns = [(targets["provenance"].parent, f".{stage}.tmp-*")]
    else:
        patterns = [(target.parent, f".{target.name}.tmp-*") for target in targets.values()]
    for folder, pattern in patterns:
        for leftover in folder.glob(pattern):  # none where the folder does not exist
            shutil.rmtree(leftover, ignore_errors=True)
