"""Bad input through the snakemake command line: the run stops before any job (or, for a bad
data file, in its job), the message names the key or file and says what was expected, and no
partial output is left."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import write_yaml


def edit_config(workdir, change) -> None:
    path = workdir / "config" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    change(config)
    write_yaml(path, config)


def output_of(result) -> str:
    return result.stdout + result.stderr


def assert_rejected(result, workdir, *needles: str) -> None:
    out = output_of(result)
    assert result.returncode != 0, out
    for needle in needles:
        assert needle in out, f"{needle!r} not in output:\n{out}"
    assert "expected" in out, out
    assert "Traceback" not in out, out
    assert not (workdir / "results").exists(), "a rejected config created results/"


def set_key(dotted: str, value):
    def change(config):
        *parents, last = dotted.split(".")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return change


@pytest.mark.parametrize("key, value", [
    ("seed", "abc"),
    ("quantization_report.max_examples", "many"),
    ("quantization.double_quant", "yes"),
    ("defaults.tokenize.max_length", 2.5),
])
def test_wrong_type_config_value(workdir, run_snakemake, key, value):
    edit_config(workdir, set_key(key, value))
    result = run_snakemake(workdir, "-n", check=False)
    assert_rejected(result, workdir, f"'{key}'", json.dumps(value))


def test_unknown_task_name(workdir, run_snakemake):
    edit_config(workdir, lambda c: c.update(tasks=["arithmetic", "no_such_task"]))
    result = run_snakemake(workdir, "-n", check=False)
    assert_rejected(result, workdir, "tasks", "no_such_task", "arithmetic, topic")


def test_unknown_prompt_format_in_task_file(workdir, run_snakemake):
    path = workdir / "config" / "tasks" / "topic.yaml"
    task = yaml.safe_load(path.read_text())
    task["format"] = "markdown"
    write_yaml(path, task)
    result = run_snakemake(workdir, "-n", check=False)
    assert_rejected(result, workdir, "topic.yaml", "'format'", "markdown",
                    "alpaca, chat, completion")


def test_unknown_base_model_source(workdir, run_snakemake):
    edit_config(workdir, set_key("base_model.source", "ftp"))
    result = run_snakemake(workdir, "-n", check=False)
    assert_rejected(result, workdir, "'base_model.source'", "ftp", "gguf, hub, local")


def test_unknown_config_key(workdir, run_snakemake):
    edit_config(workdir, lambda c: c.update(sead=1))
    result = run_snakemake(workdir, "-n", check=False)
    assert result.returncode != 0
    assert "sead" in output_of(result)
    assert not (workdir / "results").exists()


def test_malformed_json_line_in_local_dataset(workdir, run_snakemake):
    data = workdir / "data" / "qa.jsonl"
    data.parent.mkdir()
    lines = [json.dumps({"prompt": f"What is {i} + 1?", "completion": str(i + 1)})
             for i in range(30)]
    lines[6] = '{"prompt": "What is 6 + 1?", "completion": '  # line 7 is cut short
    data.write_text("\n".join(lines) + "\n")
    write_yaml(workdir / "config" / "tasks" / "qa.yaml",
               {"format": "completion", "dataset": {"source": "local", "path": "data/qa.jsonl"}})
    edit_config(workdir, lambda c: c.update(tasks=["qa"]))

    result = run_snakemake(workdir, "results/data/qa/raw", check=False)
    out = output_of(result)
    assert result.returncode != 0, out
    assert "data/qa.jsonl: line 7: malformed JSON" in out, out
    assert "expected" in out
    assert not (workdir / "results/data/qa/raw").exists()
    leftovers = list((workdir / "results").rglob("*.tmp-*"))
    assert not leftovers, leftovers
    # The full error is in the rule's log too.
    assert "line 7" in (workdir / "results/logs/fetch_dataset/qa.log").read_text()


def test_config_override_on_the_command_line(workdir, run_snakemake):
    result = run_snakemake(workdir, "-n", "--config", "seed=3", check=False)
    assert result.returncode == 0, output_of(result)
    # An override is validated and applied like the file: one task, one fetch job.
    result = run_snakemake(workdir, "-n", "--quiet", "rules", "--config", "tasks=[arithmetic]",
                           check=False)
    assert result.returncode == 0, output_of(result)
    counts = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()
              if len(line.split()) == 2}
    assert counts.get("fetch_dataset") == "1", result.stdout


def test_bad_config_override_on_the_command_line(workdir, run_snakemake):
    result = run_snakemake(workdir, "-n", "--config", "seed=abc", check=False)
    assert_rejected(result, workdir, "'seed'", '"abc"', "integer")
