"""A stage started from the command line (`qlora-stage`, for launchers such as torchrun)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_pipeline import cli
from qlora_pipeline.data.sources import read_split

DATASET = {"source": "builtin", "name": "topic", "num_examples": 30, "seed": 4,
           "validation_fraction": 0.1, "test_fraction": 0.1, "columns": {}}


def test_a_stage_runs_from_the_command_line(tmp_path):
    beside = Path(sys.executable).with_name("qlora-stage")  # the venv's, activated or not
    entry = str(beside) if beside.exists() else shutil.which("qlora-stage")
    assert entry, "qlora-stage is not installed (make setup installs it)"
    out = tmp_path / "raw"
    result = subprocess.run([entry, "fetch_dataset", f"raw={out}", "format=completion",
                             f"dataset={json.dumps(DATASET)}", "--threads", "1"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(read_split(out, "train")) == 24
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["stage"] == "fetch_dataset" and provenance["policy"]["threads"] == 1


def test_module_form_and_stage_list():
    result = subprocess.run([sys.executable, "-m", "qlora_pipeline.cli", "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0
    assert "train_qlora" in result.stdout and "quantization_report" in result.stdout


@pytest.mark.parametrize("argv, message", [
    (["nope"], "no stage named 'nope'"),
    (["fetch_dataset", "raw=/tmp/x"], "missing ['dataset', 'format']"),
    (["fetch_dataset", "raw=x", "format=chat", "dataset={}", "colour=red"], "unknown ['colour']"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_values_are_json_or_text():
    assert cli._value('{"a": [1, 2]}') == {"a": [1, 2]}
    assert cli._value("7") == 7 and cli._value("results/raw") == "results/raw"


def test_a_stopped_training_exits_75_and_a_rank_tells_its_job_by_a_file(tmp_path, monkeypatch):
    """ResumeLater's status from the command line; a torchrun rank exits 0 instead, having
    made the file its job looks for (on the job's node: where the file's folder exists)."""
    from qlora_pipeline.jobs import launch

    marker = tmp_path / "stopped"
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv(launch.STOPPED_ENV, str(marker))
    assert cli.stopped_status() == 75 and not marker.exists()  # not a rank: nothing to tell
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert cli.stopped_status() == 0 and marker.exists()
    elsewhere = tmp_path / "another-node" / "stopped"  # the job's folder is not on this node
    monkeypatch.setenv(launch.STOPPED_ENV, str(elsewhere))
    assert cli.stopped_status() == 0 and not elsewhere.parent.exists()
    monkeypatch.delenv(launch.STOPPED_ENV)  # a rank of a job that did not ask
    assert cli.stopped_status() == 75
