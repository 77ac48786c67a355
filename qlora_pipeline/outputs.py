"""Complete-or-absent outputs: build in a temporary sibling, rename into place at the end.

`stage_outputs` is the one owner of a stage's outputs; `atomic_dir` / `atomic_file` are its
parts (and serve files that are not a stage's declared outputs)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from . import provenance


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
        os.replace(tmp, target)
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
        os.replace(tmp, target)
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


@contextlib.contextmanager
def stage_outputs(stage: str, outputs: dict[str, str | Path], *, config: Any, inputs: dict,
                  policy, seed: int | None = None) -> Iterator[dict[str, Path]]:
    """Own one stage's declared outputs: yield a temporary path for each (same names); when
    the block succeeds, write provenance.json and move every output into place.

    A rule declares either one directory (provenance.json goes inside it) or files, one of
    them named `provenance` (written last, so its presence means the rest are in place).
    On failure nothing is left that looks finished.
    """
    started = provenance.now()
    targets = {name: Path(path) for name, path in outputs.items()}
    _remove_leftovers(targets, stage)

    def record(path: Path) -> None:
        write_json(path, provenance.build(stage=stage, config_slice=config, inputs=inputs,
                                          policy=policy, seed=seed, started=started))

    if "provenance" not in targets:
        if len(targets) != 1:
            raise ValueError(f"stage {stage}: outputs {sorted(targets)}: expected one "
                             f"directory or files that include 'provenance'")
        (name, target), = targets.items()
        with atomic_dir(target) as tmp:
            yield {name: tmp}
            record(tmp / "provenance.json")
        return
    staging = targets["provenance"].parent
    staging.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{stage}.tmp-", dir=staging))
    try:
        paths = {name: tmp / f"{name}-{target.name}" for name, target in targets.items()}
        yield paths
        record(paths["provenance"])
        for name in sorted(targets, key=lambda n: n == "provenance"):
            targets[name].parent.mkdir(parents=True, exist_ok=True)
            os.replace(paths[name], targets[name])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_leftovers(targets: dict[str, Path], stage: str) -> None:
    """Temporary folders of an earlier job on these outputs that was killed (a finally block
    does not run under SIGKILL). Safe: Snakemake runs one job per output at a time."""
    if "provenance" in targets:
        patterns = [(targets["provenance"].parent, f".{stage}.tmp-*")]
    else:
        patterns = [(target.parent, f".{target.name}.tmp-*") for target in targets.values()]
    for folder, pattern in patterns:
        for leftover in folder.glob(pattern) if folder.is_dir() else ():
            shutil.rmtree(leftover, ignore_errors=True)
