"""Runs side by side: a `run` name puts every output under results/<run>/, `qlora-compare`
tables finished runs, and every training writes its curves as TensorBoard event files."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from conftest import snakemake
from test_incremental import edit

from qlora_pipeline.core import layout
from qlora_pipeline.report import runs


def planned_paths(workdir) -> list[str]:
    out = snakemake(workdir, "-n", "--printshellcmds").stdout
    return re.findall(r"^\s+(?:output|log): (.+)$", out, re.M)


def test_a_run_name_puts_every_output_under_its_folder(workdir):
    edit(workdir / "config/config.yaml", lambda c: c.update(run="rank8"))
    paths = [p for line in planned_paths(workdir) for p in line.split(", ")]
    assert len(paths) > 40
    assert all(p.startswith("results/rank8/") for p in paths), \
        [p for p in paths if not p.startswith("results/rank8/")]


@pytest.mark.parametrize("name, message", [
    ("models", "config key 'run': found 'models', a folder every run has"),
    ("a/b", "key 'run': found \"a/b\", expected a string matching"),
])
def test_bad_run_names_are_refused(workdir, name, message):
    edit(workdir / "config/config.yaml", lambda c: c.update(run=name))
    result = snakemake(workdir, "-n", check=False)
    assert result.returncode != 0 and message in result.stdout + result.stderr


def write_run(folder, scores: dict, commit: str) -> None:
    """A finished run's report as qlora-compare reads it."""
    rows = [{"task": "t", "variant": v, "benchmark": "t", "metric": "acc", "value": value,
             "stderr": 0.05} for v, value in scores.items()]
    (folder / "report").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(folder / "report/scores.csv", index=False)
    (folder / "report/provenance.json").write_text(json.dumps({"git_commit": commit,
                                                               "finished": "today"}))


def test_compare_tables_every_finished_run(tmp_path, capsys):
    results = tmp_path / "results"
    write_run(results, {"base": 0.5, "qlora": 0.7}, "c0")  # the unnamed run: results/ itself
    write_run(results / "rank8", {"base": 0.5, "qlora": 0.8}, "c1")
    write_run(results / "rank16", {"qlora": 0.9}, "c2")
    (results / "models").mkdir()  # a run's folder, not a run
    assert runs.main(["--results", str(results)]) == 0
    frame = pd.read_csv(results / "runs.csv")
    assert sorted(set(frame["run"])) == sorted([runs.DEFAULT, "rank8", "rank16"])
    assert frame.set_index(["run", "variant"])["value"][("rank8", "qlora")] == 0.8
    text = (results / "runs.md").read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    row = next(line for line in text.splitlines() if "| qlora" in line)
    assert re.search(r"0\.7 ± 0\.05\s*\|\s*0\.9 ± 0\.05\s*\|\s*0\.8 ± 0\.05", row), row
    assert "| base" in text and "—" in text  # rank16 has no base score
    assert "**rank16**: commit c2" in text
    # Named runs only, in the order given; another checkout's results/ by its parent's name.
    write_run(tmp_path / "other/results", {"qlora": 0.6}, "c3")
    assert runs.main(["--results", str(results), "rank8", str(results / "rank16"),
                      str(tmp_path / "other/results")]) == 0
    assert list(dict.fromkeys(pd.read_csv(results / "runs.csv")["run"])) == [
        "rank8", "rank16", "other/results"]


def test_compare_refuses_a_run_that_did_not_finish(tmp_path, capsys):
    results = tmp_path / "results"
    write_run(results / "done", {"qlora": 0.8}, "c1")
    (results / "half/models").mkdir(parents=True)
    assert runs.main(["--results", str(results), "half"]) == 2
    err = capsys.readouterr().err
    assert "run 'half': found no" in err and "runs under" in err and "done" in err
    assert not (results / "runs.csv").exists()
    assert runs.main(["--results", str(tmp_path / "empty")]) == 2


def test_training_curves_go_to_tensorboard(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for task, name in (("topic", "qlora"), ("arithmetic", "recovered"), ("topic", "qlora@r1")):
        folder = tiny_run / layout.tensorboard(task, name)
        events = EventAccumulator(str(folder))
        events.Reload()
        losses = {e.step: e.value for e in events.Scalars("train/loss")}
        adapter = layout.adapter(task, name)
        logged = [json.loads(line) for line in
                  (tiny_run / adapter / "metrics.jsonl").read_text().splitlines()]
        expected = {r["step"]: r["loss"] for r in logged if "loss" in r}
        assert losses.keys() == expected.keys(), folder
        assert all(abs(losses[s] - expected[s]) < 1e-5 for s in expected), folder
        assert "eval/loss" in events.Tags()["scalars"]
