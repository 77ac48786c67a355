"""benchmarks/gpu.sh does not rot: its shell parses, and its CPU dry run (the same code as on
a GPU, at a tiny scale) writes a complete record. The GPU figures themselves come only from a
machine with a GPU (docs/performance.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

SCRIPTS = [REPO / "benchmarks" / name for name in ("gpu.sh", "gpu_wheels.sh")]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-bench") / "gpu.json"
    # The test's interpreter; $OUT unset, so only --out decides where the record goes.
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--dry-run",
                             "--out", str(out)], capture_output=True, text=True, timeout=600, check=False,
                            env={**env, "PYTHON": sys.executable}, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_dry_run_record(dry_run):
    out, _ = dry_run
    result = json.loads(out.read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert set(rows) == {"full", "padded", "packed"}
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["steps"] >= 1
        assert row["peak_memory_gib"] > 0 and "peak_reserved_gib" in row
        assert row["loss_first"] == row["loss_first"]  # finite: NaN != NaN
    assert rows["full"]["padding_pct"] == 0
    # padded and packed trained on the same examples: the same non-padding tokens.
    assert rows["padded"]["tokens"] == rows["packed"]["tokens"]
    assert rows["packed"]["steps"] < rows["padded"]["steps"]
    assert result["packed_isolation"]["ok"], result["packed_isolation"]
    assert result["parameters"]["trainable_params"] > 0
    assert result["published"]["tokens_per_s"] == 2413.0


def test_dry_run_table(dry_run):
    out, stdout = dry_run
    table = out.with_suffix(".md").read_text()
    assert "published, not measured here" in table and table in stdout
    assert "| padded" in table and "| packed" in table


def test_pipeline_needs_cuda_and_says_so(tmp_path):
    """Without a GPU, the real run stops before any work with a message that says why."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the real run would start")
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--out",
                             str(tmp_path / "x.json")], capture_output=True, text=True,
                            timeout=300, check=False, env={**os.environ, "PYTHON": sys.executable}, cwd=REPO)
    assert result.returncode != 0 and "no CUDA device" in result.stderr
    assert not (tmp_path / "x.json").exists()
