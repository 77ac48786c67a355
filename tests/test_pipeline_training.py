"""The training stages through Snakemake on the tiny model: QLoRA for every task, recovery
where a task enables it, and the merge of each task's final adapter.

Reads the session's tiny run (conftest.tiny_run); the test that edits a task file works on a
copy of it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import TINY_TASKS, snakemake, tiny_config, write_yaml

RECOVERED = [t for t, cfg in TINY_TASKS.items() if cfg.get("recovery", {}).get("enabled")]
PLAIN = [t for t in TINY_TASKS if t not in RECOVERED]


def train_steps(task: str) -> int:
    train = {**tiny_config(Path("."))["defaults"].get("train", {}),
             **TINY_TASKS[task].get("train", {})}
    return train["max_steps"]


def targets(recovered: list[str] = RECOVERED) -> list[str]:
    """The training outputs only (the default target also runs evaluation and the report)."""
    return ([f"results/adapters/{t}/qlora" for t in TINY_TASKS]
            + [f"results/adapters/{t}/recovered" for t in recovered]
            + [f"results/models/merged/{t}" for t in TINY_TASKS])


def scheduled(stdout: str) -> dict[str, int]:
    """Rule name -> job count, from the job stats table of a dry run."""
    counts, in_table = {}, False
    for line in stdout.splitlines():
        parts = line.split()
        if parts == ["job", "count"]:
            in_table = True
        elif in_table and parts[:1] == ["total"]:
            in_table = False
        elif in_table and len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


@pytest.fixture(scope="module")
def finished(tiny_run):
    return tiny_run


def test_tiny_tasks_cover_both_cases():
    assert RECOVERED and PLAIN  # one task with recovery, one without


def test_dry_run_schedules_recovery_only_where_enabled(workdir):
    counts = scheduled(snakemake(workdir, "-n", *targets()).stdout)
    assert counts.get("train_qlora") == len(TINY_TASKS)
    assert counts.get("recover") == len(RECOVERED)
    assert counts.get("merge") == len(TINY_TASKS)


def test_adapters_and_merged_models_for_every_task(finished):
    results = finished / "results"
    for task in TINY_TASKS:
        qlora = results / "adapters" / task / "qlora"
        assert (qlora / "adapter_config.json").is_file()
        assert (qlora / "adapter_model.safetensors").is_file()
        summary = json.loads((qlora / "summary.json").read_text())
        assert summary["steps"] == train_steps(task)
        merged = results / "models/merged" / task
        assert (merged / "config.json").is_file() and (merged / "merge_check.json").is_file()
        assert list(merged.glob("*.safetensors"))
        assert (merged / "provenance.json").is_file()
        recovered = results / "adapters" / task / "recovered"
        if task in RECOVERED:
            assert (recovered / "adapter_model.safetensors").is_file()
            summary = json.loads((recovered / "summary.json").read_text())
            assert summary["steps"] == TINY_TASKS[task]["recovery"]["steps"]
        else:
            assert not recovered.exists()


def test_merge_base_follows_recovery(finished):
    results = finished / "results/models/merged"
    for task in TINY_TASKS:
        check = json.loads((results / task / "merge_check.json").read_text())
        kind = "recovered" if task in RECOVERED else "qlora"
        expected = "full" if task in RECOVERED else "dequantized"  # merge.base: auto
        assert (check["chosen"], check["recovered"]) == (expected, task in RECOVERED)
        assert set(check["checks"]) == {"full", "dequantized"}  # compare_bases: true
        # The merge read the task's final adapter.
        prov = json.loads((results / task / "provenance.json").read_text())
        assert prov["inputs"]["adapter"]["path"].endswith(f"adapters/{task}/{kind}")


def test_logs_show_training_progress(finished):
    logs = finished / "results/logs"
    for task in TINY_TASKS:
        text = (logs / "train_qlora" / task / "qlora.log").read_text()
        assert "%|" in text and "'loss'" in text and "eval_loss" in text
        assert "rule train_qlora: done" in text
        assert "rule merge: done" in (logs / "merge" / f"{task}.log").read_text()
    for task in RECOVERED:
        assert "rule recover: done" in (logs / "recover" / task / "recovered.log").read_text()
    checkpoints = finished / "results/checkpoints"
    assert not [p for p in checkpoints.rglob("*") if p.is_file()]  # removed once complete


def test_rerun_with_no_change_does_nothing(finished):
    out = snakemake(finished, "-n", *targets()).stdout
    assert "Nothing to be done" in out, out


def test_disabling_recovery_merges_the_qlora_adapter(copy_run):
    workdir = copy_run()
    task = RECOVERED[0]
    path = workdir / "config/tasks" / f"{task}.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["recovery"]["enabled"] = False
    write_yaml(path, cfg)  # key order does not matter: params are canonical (config.canonical)

    result = snakemake(workdir, "-n", *targets(recovered=RECOVERED[1:]))
    assert scheduled(result.stdout) == {"merge": 1}, result.stdout  # no recover, no retrain
    # The one merge job reads the task's QLoRA adapter, not the recovered one.
    job = result.stdout[result.stdout.index("rule merge:"):]
    inputs = re.search(r"input:(.*)", job).group(1)
    assert f"results/adapters/{task}/qlora" in inputs, job
    assert "recovered" not in inputs
    assert f"results/models/merged/{task}" in job
