"""The one owner of a stage's outputs (outputs.stage_outputs): complete or absent, one
provenance shape with the job's real device and the stage's code digest."""

from __future__ import annotations

import json
import os

import pytest

from qlora_pipeline import code_digest
from qlora_pipeline.outputs import read_jsonl, stage_outputs, write_jsonl
from qlora_pipeline.policy import Policy

POLICY = Policy("cpu", "cpu:2 cores", bf16=False, threads=2)


def test_a_directory_output(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("x")
    target = tmp_path / "out" / "raw"
    with stage_outputs("fetch_dataset", {"raw": target}, config={"k": 1},
                       inputs={"source": source}, policy=POLICY, seed=3) as out:
        assert out["raw"] != target and out["raw"].parent == target.parent
        (out["raw"] / "data.txt").write_text("done")
        assert not target.exists()  # nothing appears before the block succeeds
    assert (target / "data.txt").read_text() == "done"
    record = json.loads((target / "provenance.json").read_text())
    assert record["stage"] == "fetch_dataset" and record["seed"] == 3
    assert record["config"] == {"k": 1} and record["device"] == "cpu:2 cores"
    assert record["policy"] == {"device": "cpu:2 cores", "bf16": False, "threads": 2}
    assert record["code"] == code_digest.for_rule("fetch_dataset")
    assert len(record["inputs"]["source"]["sha256"]) == 64
    assert os.stat(target).st_mode & 0o755 == 0o755
    assert [p.name for p in target.parent.iterdir()] == ["raw"]


def test_file_outputs_are_moved_together_with_provenance_last(tmp_path):
    outputs = {"results": tmp_path / "e/results.json", "samples": tmp_path / "e/samples.jsonl",
               "provenance": tmp_path / "e/provenance.json"}
    with stage_outputs("evaluate", outputs, config={}, inputs={}, policy=POLICY) as out:
        out["results"].write_text("{}")
        write_jsonl(out["samples"], [{"a": "\u2028"}])
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == [
        "provenance.json", "results.json", "samples.jsonl"]
    assert read_jsonl(outputs["samples"]) == [{"a": "\u2028"}]
    assert json.loads(outputs["provenance"].read_text())["stage"] == "evaluate"


def test_failure_leaves_nothing(tmp_path):
    outputs = {"results": tmp_path / "e/results.json", "provenance": tmp_path / "e/provenance.json"}
    with pytest.raises(RuntimeError):
        with stage_outputs("evaluate", outputs, config={}, inputs={}, policy=POLICY) as out:
            out["results"].write_text("{}")
            raise RuntimeError("boom")
    assert list((tmp_path / "e").iterdir()) == []
    with pytest.raises(RuntimeError):
        with stage_outputs("tokenize", {"t": tmp_path / "t"}, config={}, inputs={},
                           policy=POLICY) as out:
            raise RuntimeError("boom")
    assert not (tmp_path / "t").exists() and not list(tmp_path.glob(".t.tmp-*"))


def test_an_undeclared_file_left_unwritten_fails(tmp_path):
    outputs = {"results": tmp_path / "e/results.json", "provenance": tmp_path / "e/provenance.json"}
    with pytest.raises(FileNotFoundError):
        with stage_outputs("evaluate", outputs, config={}, inputs={}, policy=POLICY):
            pass  # results.json never written
    assert not outputs["provenance"].exists()


def test_leftovers_of_a_killed_job_are_removed(tmp_path):
    (tmp_path / ".adapter.tmp-dead").mkdir()
    (tmp_path / ".other.tmp-keep").mkdir()
    with stage_outputs("train_qlora", {"adapter": tmp_path / "adapter"}, config={}, inputs={},
                       policy=POLICY):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-keep", "adapter"]


def test_two_directories_are_refused(tmp_path):
    with pytest.raises(ValueError, match="expected one directory or files"):
        with stage_outputs("x", {"a": tmp_path / "a", "b": tmp_path / "b"}, config={},
                           inputs={}, policy=POLICY):
            pass
