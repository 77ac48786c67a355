"""The one owner of a stage's outputs (jobs/outputs.stage_outputs, run by the job): complete
or absent, one provenance shape with the rule's own inputs and params, the job's real device
and the stage's code digest."""

from __future__ import annotations

import errno
import json
import os
import re

import pytest

from qlora_pipeline.core.errors import DiskFull
from qlora_pipeline.core.files import read_jsonl, write_json, write_jsonl
from qlora_pipeline.core.policy import Policy
from qlora_pipeline.jobs import code_digest
from qlora_pipeline.jobs.outputs import stage_outputs
from qlora_pipeline.jobs.runner import Job

POLICY = Policy("cpu", "cpu:2 cores", bf16=False, threads=2)


def job(rule: str, outputs: dict, inputs=None, params=None, wildcards=None) -> Job:
    return Job(rule=rule, inputs=inputs or {}, outputs={k: str(v) for k, v in outputs.items()},
               params=params or {}, wildcards=wildcards or {})


def test_a_directory_output(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("x")
    target = tmp_path / "out" / "raw"
    with stage_outputs(job("fetch_dataset", {"raw": target}, inputs={"source": str(source)},
                           params={"k": 1, "seed": 3}, wildcards={"task": "t"}),
                       POLICY) as out:
        assert out["raw"] != target and out["raw"].parent == target.parent
        (out["raw"] / "data.txt").write_text("done")
        assert not target.exists()  # nothing appears before the block succeeds
    assert (target / "data.txt").read_text() == "done"
    record = json.loads((target / "provenance.json").read_text())
    assert record["stage"] == "fetch_dataset" and record["seed"] == 3
    assert record["params"] == {"k": 1, "seed": 3} and record["device"] == "cpu:2 cores"
    assert record["wildcards"] == {"task": "t"}
    assert record["policy"] == {"device": "cpu:2 cores", "bf16": False, "threads": 2}
    assert record["code"] == code_digest.for_rule("fetch_dataset")
    assert record["inputs"]["source"]["path"] == str(source)
    assert len(record["inputs"]["source"]["sha256"]) == 64
    assert os.stat(target).st_mode & 0o755 == 0o755
    assert [p.name for p in target.parent.iterdir()] == ["raw"]


def test_file_outputs_are_moved_together_with_provenance_last(tmp_path):
    outputs = {"results": tmp_path / "e/results.json", "samples": tmp_path / "e/samples.jsonl",
               "provenance": tmp_path / "e/provenance.json"}
    with stage_outputs(job("evaluate", outputs, inputs={"several": [str(tmp_path)]}),
                       POLICY) as out:
        out["results"].write_text("{}")
        write_jsonl(out["samples"], [{"a": "\u2028"}])
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == [
        "provenance.json", "results.json", "samples.jsonl"]
    assert read_jsonl(outputs["samples"]) == [{"a": "\u2028"}]
    record = json.loads(outputs["provenance"].read_text())
    assert record["stage"] == "evaluate"
    assert [i["path"] for i in record["inputs"]["several"]] == [str(tmp_path)]


def synced(monkeypatch) -> list[str]:
    """The paths os.fsync is called on from now, in order (each fd's path, from /proc)."""
    calls, fsync = [], os.fsync

    def record(fd: int) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    return calls


def test_an_output_is_synced_before_its_rename_and_its_folder_after(tmp_path, monkeypatch):
    calls = synced(monkeypatch)
    target = tmp_path / "out" / "raw"
    with stage_outputs(job("fetch_dataset", {"raw": target}), POLICY) as out:
        (out["raw"] / "sub").mkdir()
        (out["raw"] / "sub" / "b.bin").write_bytes(b"b")
        (out["raw"] / "a.txt").write_text("a")
    temporary = [re.sub(r"/\.raw\.tmp-[^/]+", "/raw", c) for c in calls if ".raw.tmp-" in c]
    assert {str(target / name) for name in ("a.txt", "sub/b.bin", "sub", "provenance.json",
                                            "")} <= set(temporary)  # before the rename
    assert calls[-1] == str(target.parent)  # the rename itself, after it
    assert json.loads((target / "provenance.json").read_text())["fsync_seconds"] >= 0

    calls.clear()
    outputs = {"results": tmp_path / "e/results.json", "provenance": tmp_path / "e/provenance.json"}
    with stage_outputs(job("evaluate", outputs), POLICY) as out:
        out["results"].write_text("{}")
    staged = rf"{tmp_path}/e/\.evaluate\.tmp-\w+/"
    assert [c for c in calls if re.fullmatch(staged + "results-results.json", c)]
    # provenance moved last, after results.json landed and its folder was synced
    assert calls[-3] == calls[-1] == str(tmp_path / "e")
    assert re.fullmatch(staged + "provenance-provenance.json", calls[-2])


def test_json_lands_synced(tmp_path, monkeypatch):
    calls = synced(monkeypatch)
    write_json(tmp_path / "x.json", [1])
    assert len(calls) == 2 and re.fullmatch(rf"{tmp_path}/\.x\.json\.tmp-\w+", calls[0])
    assert calls[1] == str(tmp_path) and json.loads((tmp_path / "x.json").read_text()) == [1]


def test_failure_leaves_nothing(tmp_path):
    outputs = {"results": tmp_path / "e/results.json", "provenance": tmp_path / "e/provenance.json"}
    with pytest.raises(RuntimeError):
        with stage_outputs(job("evaluate", outputs), POLICY) as out:
            out["results"].write_text("{}")
            raise RuntimeError("boom")
    assert not (tmp_path / "e").exists()  # nor the folder made for the outputs
    with pytest.raises(RuntimeError):
        with stage_outputs(job("tokenize", {"t": tmp_path / "t"}), POLICY) as out:
            raise RuntimeError("boom")
    assert not (tmp_path / "t").exists() and not list(tmp_path.glob(".t.tmp-*"))


def test_a_full_disk_while_landing_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    from qlora_pipeline.jobs import outputs as module

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "f.json")

    outputs = {"results": tmp_path / "e/results.json", "provenance": tmp_path / "e/provenance.json"}
    message = (rf"^evaluate: no space left on device writing {tmp_path}/e/results\.json, "
               rf"{tmp_path}/e/provenance\.json \(at f\.json\); [\d.]+ MiB \(\d+ bytes\) free "
               rf"in {tmp_path}; nothing was kept; [^\n]*$")
    monkeypatch.setattr(module, "write_json", full)  # provenance.json cannot be written
    with pytest.raises(DiskFull, match=message):
        with stage_outputs(job("evaluate", outputs), POLICY) as out:
            out["results"].write_text("{}")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    replace = os.replace  # provenance's rename, after results.json's, fails: neither is kept
    monkeypatch.setattr(os, "replace", lambda source, target: full() if
                        target.name == "provenance.json" else replace(source, target))
    with pytest.raises(DiskFull, match=message):
        with stage_outputs(job("evaluate", outputs), POLICY) as out:
            out["results"].write_text("{}")
    assert list(tmp_path.iterdir()) == []


def test_an_undeclared_file_left_unwritten_fails(tmp_path):
    outputs = {"results": tmp_path / "e/results.json", "provenance": tmp_path / "e/provenance.json"}
    with pytest.raises(FileNotFoundError):
        with stage_outputs(job("evaluate", outputs), POLICY):
            pass  # results.json never written
    assert not outputs["provenance"].exists()


def test_leftovers_of_a_killed_job_are_removed(tmp_path):
    (tmp_path / ".adapter.tmp-dead").mkdir()
    (tmp_path / ".other.tmp-keep").mkdir()
    with stage_outputs(job("train_qlora", {"adapter": tmp_path / "adapter"}), POLICY):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-keep", "adapter"]


def test_two_directories_are_refused(tmp_path):
    with pytest.raises(ValueError, match="expected one directory or files"):
        with stage_outputs(job("x", {"a": tmp_path / "a", "b": tmp_path / "b"}), POLICY):
            pass


def snakemake_record(workdir, output) -> dict | None:
    """Snakemake's own record of the job that made `output` (.snakemake/metadata)."""
    from base64 import urlsafe_b64encode

    path = workdir / ".snakemake/metadata" / urlsafe_b64encode(str(output).encode()).decode()
    return json.loads(path.read_text()) if path.exists() else None


def flat(inputs: dict) -> list[str]:
    return [i["path"] for value in inputs.values()
            for i in (value if isinstance(value, list) else [value])]


def test_provenance_records_the_rules_own_inputs_and_params(tiny_run):
    """Every job of the tiny run recorded exactly what Snakemake gave it: the input files and
    param values of Snakemake's own record of the job, nothing restated by stage code."""
    import ast

    stages = set()
    for path in sorted((tiny_run / "results").rglob("provenance.json")):
        provenance = json.loads(path.read_text())
        output = path.parent.relative_to(tiny_run)  # a directory output, or files beside it
        record = snakemake_record(tiny_run, output) or \
            snakemake_record(tiny_run, path.relative_to(tiny_run))
        assert record and record["rule"] == provenance["stage"], path
        assert sorted(flat(provenance["inputs"])) == sorted(record["input"]), path
        given = [ast.literal_eval(value) for value in record["params"]]
        # A training's trackers: a param Snakemake counts derived, in no record of its own
        # (no rerun trigger: rules/common.smk)
        recorded = [v for k, v in provenance["params"].items() if k != "trackers"]
        for value in [*recorded, provenance["code"]]:
            assert value in given, (path, value)
            given.remove(value)
        assert given == [], path  # every param recorded
        stages.add(provenance["stage"])
    assert stages == {"fetch_dataset", "tokenize", "import_base_model", "quantize",
                      "quantization_report", "train_qlora", "recover", "merge",
                      "analyze_adapter", "compress_adapter", "combine_adapters",
                      "eval_task_spec", "evaluate", "report"}
    merged = json.loads((tiny_run / "results/models/merged/arithmetic/provenance.json")
                        .read_text())
    assert set(merged["inputs"]) == {"base", "quantized", "adapter", "tokenized"}
