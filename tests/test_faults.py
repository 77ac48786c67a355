"""The fault campaign's CI sample (benchmarks/faults.py): three faults while the tiny run remakes
one task's merged model, through the campaign's own trial code, each rerun to the end and
compared with the tiny run itself; and the comparison's checks shown to catch what they look
for."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks import faults

TARGET = "results/models/merged/arithmetic"
MERGED = Path(TARGET).relative_to("results")


@pytest.mark.parametrize("kind", ["kill_group", "sigterm", "kill_warm_server"])
def test_a_fault_during_the_merge_leaves_nothing_behind(tiny_run, tmp_path, kind):
    """The fault lands a second into the merge job; after the rerun the merged model is the
    tiny run's, byte for byte, no process of the working directory is left, and no temporary,
    socket or stray file stays under it."""
    def prepare(path: Path) -> None:
        shutil.copytree(tiny_run, path, symlinks=True)
        shutil.rmtree(path / TARGET)

    fault = {"kind": kind, "aim": "merge", "delay": 1.0}
    record = faults.trial(tmp_path / "trial", fault, {"seconds": 60.0}, prepare,
                          tiny_run / "results", settle=2.0, targets=(TARGET,))
    assert record["hit"] and record["rules"] == ["merge"], record
    assert record["rerun_status"][-1] == 0, record
    assert record["differing"] == [] and record["stale"] == [], record
    assert record["processes_left"] == [], record


def test_the_comparison_catches_a_flipped_byte_and_a_stale_temporary(copy_run, tiny_run):
    run = copy_run()
    weights = next((run / "results" / MERGED).glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    (run / "results" / "adapters" / ".qlora.tmp-x1").mkdir()
    reference = tiny_run / "results"
    assert faults.differing(reference, run / "results") == [str(weights.relative_to(
        run / "results"))]
    assert faults.stale(reference, run) == ["results/adapters/.qlora.tmp-x1"]
