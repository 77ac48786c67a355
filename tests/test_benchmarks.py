"""`make bench` in its smoke version: every benchmark runs on tiny models (no SmolLM2, no
pipeline output, no network) and lands in the summary with the machine beside it. Nothing
here is timed: benchmarks measure (make bench), tests only keep them from rotting."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DRIVER = REPO / "benchmarks" / "run.py"


def driver():
    """benchmarks/run.py as a module (its registry and result check), without running it."""
    spec = importlib.util.spec_from_file_location("benchmarks_driver", DRIVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--results",
                             str(out), *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900, check=False)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("benchmarks")
    bench(out)
    return out


def test_summary_has_one_row_per_benchmark(smoke):
    names = list(driver().BENCHMARKS)
    summary = json.loads((smoke / "summary.json").read_text(encoding="utf-8"))
    assert summary["smoke"] is True
    assert [b["name"] for b in summary["benchmarks"]] == names
    for b in summary["benchmarks"]:
        assert isinstance(b["figure"], (int, float)) and math.isfinite(b["figure"]), b
        assert not isinstance(b["figure"], bool)
        assert b["met"] in (True, False, None) and b["goal"] and isinstance(b["details"], dict)
    table = (smoke / "summary.md").read_text(encoding="utf-8")
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]  # no header
    assert [row.split("|")[1].strip() for row in rows] == names


def test_machine_facts_beside_the_figures(smoke):
    summary = json.loads((smoke / "summary.json").read_text(encoding="utf-8"))
    cpu, torch = summary["machine"]["cpu"], summary["machine"]["torch"]
    assert cpu["model"] and cpu["cores"] >= 1 and isinstance(cpu["numeric_flags"], list)
    assert torch["threads"] >= 1 and torch["cpu_capability"]
    assert "Machine: " + cpu["model"] in (smoke / "summary.md").read_text(encoding="utf-8")


def test_each_benchmark_writes_its_own_files(smoke):
    for name in driver().BENCHMARKS:
        result = json.loads((smoke / f"{name}.json").read_text(encoding="utf-8"))
        assert result["name"] == name and "machine" in result
        assert (smoke / f"{name}.md").read_text(encoding="utf-8").startswith("# ")
    packing = json.loads((smoke / "packing.json").read_text(encoding="utf-8"))["details"]
    assert packing["modes"]["padded"]["padding_share"] > packing["modes"]["packed"]["padding_share"]
    serving = json.loads((smoke / "serving.json").read_text(encoding="utf-8"))["details"]
    assert set(serving["seconds_per_token"]) == {"quantized", "switching", "combined", "merged"}
    lora = {setup: m["adapter_bytes"] for setup, m in serving["memory"].items()}
    assert lora["switching"] > 0 and lora["combined"] > 0
    assert lora["quantized"] == lora["merged"] == 0
    assert serving["switch_microseconds"] > 0


def test_only_runs_the_named_benchmarks(tmp_path):
    bench(tmp_path, "--only", "bits_per_param")
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert [b["name"] for b in summary["benchmarks"]] == ["bits_per_param"]
    assert not (tmp_path / "train_step.json").exists()


@pytest.mark.parametrize("bad", [{"figure": "1.0"}, {"figure": float("nan")}, {"figure": True},
                                 {"met": "yes"}, {"name": "other"}])
def test_a_result_of_the_wrong_shape_is_refused(bad):
    good = {"name": "x", "figure": 1.0, "goal": "g", "met": None, "details": {}}
    driver().check(good, "x")
    with pytest.raises(ValueError):
        driver().check({**good, **bad}, "x")
