"""The fault campaign's CI sample (benchmarks/faults.py): three faults while the tiny run remakes
one task's compressed adapter (its cheapest model job: the sample must fit in a minute),
through the campaign's own trial code, each rerun to the end and compared with the tiny run
itself; and the comparison's checks shown to catch what they look for."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import faults

TARGET = "results/adapters/topic/compressed"


@pytest.mark.parametrize("kind", ["kill_group", "sigterm", "kill_warm_server"])
def test_a_fault_during_a_job_leaves_nothing_behind(tiny_run, tmp_path, kind):
    """The fault lands half a second into the job; after the rerun the adapter is the tiny
    run's, byte for byte, no process of the working directory is left 2 s after the faulted
    Snakemake ended, no temporary, socket or stray file stays under it, and neither run printed
    a traceback."""
    def prepare(path: Path) -> None:
        shutil.copytree(tiny_run, path, symlinks=True)
        shutil.rmtree(path / TARGET)

    fault = {"kind": kind, "aim": "compress_adapter", "delay": 0.5}
    record = faults.trial(tmp_path / "trial", fault, {"seconds": 60.0}, prepare,
                          tiny_run / "results", settle=2.0, targets=(TARGET,))
    assert record["hit"] and record["rules"] == ["compress_adapter"], record
    assert record["rerun_status"][-1] == 0, record
    assert record["differing"] == [] and record["stale"] == [], record
    assert record["processes_left"] == [], record
    assert record["tracebacks"] == [] and record["rerun_tracebacks"] == [], record


def test_the_comparison_catches_a_flipped_byte_and_a_stale_temporary(copy_run, tiny_run):
    run = copy_run()
    weights = next((run / "results" / "models" / "merged" / "topic").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    (run / "results" / "adapters" / ".qlora.tmp-x1").mkdir()
    reference = tiny_run / "results"
    assert faults.differing(reference, run / "results") == [str(weights.relative_to(
        run / "results"))]
    assert faults.stale(reference, run) == ["results/adapters/.qlora.tmp-x1"]


def test_the_table_since_a_fix_keeps_the_trials_of_that_commit_and_after(tmp_path):
    """--since: a trial at the second commit descends from the first, one at the first not
    from the second; a name that is no commit is refused in one line."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              cwd=tmp_path, text=True, capture_output=True,
                              check=True).stdout.strip()
    git("init", "-q")
    first, second = [(git("commit", "-q", "--allow-empty", "-m", m), git("rev-parse", "HEAD"))[1]
                     for m in ("fault found", "fixed")]
    records = [{"trial": 0, "commit": first}, {"trial": 1, "commit": second}, {"trial": 2}]
    assert [r["trial"] for r in faults.since(records, second, tmp_path)] == [1]
    assert [r["trial"] for r in faults.since(records, first, tmp_path)] == [0, 1]
    with pytest.raises(SystemExit, match="'nope' is no commit"):
        faults.since(records, "nope", tmp_path)
