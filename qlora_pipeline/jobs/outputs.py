"""Complete-or-absent outputs: a stage writes into temporary paths, which are renamed into
place with a provenance.json once it succeeds. The one owner of every stage's outputs."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..core.files import atomic_dir, write_json
from . import provenance


@contextlib.contextmanager
def stage_outputs(job, policy) -> Iterator[dict[str, Path]]:
    """Own one job's declared outputs (runner.Job): yield a temporary path for each (same
    names); when the block succeeds, write provenance.json and move every output into place.

    A rule declares either one directory (provenance.json goes inside it) or files, one of
    them named `provenance` (written last, so its presence means the rest are in place).
    On failure nothing is left that looks finished, nor a folder made for the outputs.
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
                write_json(tmp / "provenance.json", provenance.build(job, policy, started))
        else:
            with _files(targets, job.rule) as paths:
                yield paths
                write_json(paths["provenance"], provenance.build(job, policy, started))
    except BaseException:
        for folder in made:  # deepest first; only those left empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


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
        for name in sorted(targets, key=lambda n: n == "provenance"):
            targets[name].parent.mkdir(parents=True, exist_ok=True)
            os.replace(paths[name], targets[name])


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
