"""A job loads only what its stage uses: each rule's job runs the one script (scripts/stage.py)
in a fresh interpreter, as Snakemake runs it, and the heavy packages it has imported are checked (no timings: those are
benchmarks). On a 2-core CPU torch takes ~1.3 s to import, and peft with the bitsandbytes it
imports (which compiles ops at import) seconds more: a data, spec or report job that paid for
them would spend most of its time starting."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, stage, task_blocks
from test_report import make_run

from qlora_pipeline.jobs.code_digest import stage_functions

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "lm_eval")
STAGES = stage_functions()
RULE_TEXT = "\n".join(path.read_text() for path in sorted((REPO / "rules").glob("*.smk")))

# One job: scripts/stage.py under a stand-in `snakemake` object; with "stub", the stage
# function is replaced by one that does nothing, so what is loaded is the job's start-up.
CHILD = """
import importlib, json, runpy, sys, types
job = json.loads(sys.argv[1])
if job["stub"]:
    def stub(**kwargs):
        pass
    stub.__name__ = job["rule"]
    setattr(importlib.import_module(job["module"]), job["rule"], stub)
smk = types.SimpleNamespace(rule=job["rule"], threads=1, resources=job["resources"], log=[],
                            input=job["input"], output=job["output"], params=job["params"],
                            wildcards=job["wildcards"])
runpy.run_path("scripts/stage.py", init_globals={"snakemake": smk}, run_name="__main__")
print(json.dumps([name for name in job["heavy"] if name in sys.modules]))
"""


def declares_gpu(rule: str) -> bool:
    block = re.search(rf"^rule {rule}:\n(.*?)(?=^rule |\Z)", RULE_TEXT,
                      re.MULTILINE | re.DOTALL)
    assert block, f"no rule {rule} in rules/*.smk"
    return bool(re.search(r"^\s+gpu=1,", block.group(1), re.MULTILINE))


def loaded(rule: str, *, stub: bool, wildcards=None, **groups) -> set[str]:
    """The heavy packages loaded when the job of `rule` ends (with `stub`: when it would have
    entered its stage function). `groups`: the job's input, output and params."""
    job = {"rule": rule, "module": STAGES[rule][0], "stub": stub, "heavy": HEAVY,
           "resources": {"gpu": 1} if declares_gpu(rule) else {},
           "wildcards": wildcards or {}, "input": {}, "output": {}, "params": {}}
    job.update({k: {n: v if isinstance(v, (list, dict, int)) else str(v) for n, v in d.items()}
                for k, d in groups.items()})
    run = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job, default=str)], cwd=REPO,
                         check=False, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    return set(json.loads(run.stdout.strip().splitlines()[-1]))


def not_needed_at_startup(rule: str) -> set[str]:
    """lm-eval, peft and bitsandbytes are the stages' own business (a script that loaded them
    before handing its job to the warm-start server would pay for nothing); a job that declares
    no GPU runs on the CPU and settles its policy without torch."""
    unused = {"lm_eval", "peft", "bitsandbytes"}
    if not declares_gpu(rule):
        unused |= {"torch", "transformers"}
    return unused


@pytest.mark.parametrize("rule", list(STAGES))
def test_a_job_starts_without_what_its_stage_does_not_use(rule, tmp_path):
    found = loaded(rule, stub=True, wildcards={"task": "t", "variant": "base"},
                   output={"out": tmp_path / "out"})
    assert not found & not_needed_at_startup(rule), (
        f"rule {rule}: {sorted(found & not_needed_at_startup(rule))} imported before the stage "
        f"runs; import them inside the function that uses them")


def test_the_data_stages_need_no_model_libraries(tmp_path, tiny_tokenizer):
    """Run through, fetch and report load no torch at all (their conda envs have none), and
    the stages that render prompts with the base's tokenizer load no peft, bitsandbytes or
    lm-eval."""
    task = task_blocks()
    dataset = {**task["dataset"], "num_examples": 40, "seed": 1}
    raw, base = tmp_path / "raw", tmp_path / "base"
    tiny_tokenizer.save_pretrained(base)
    model_stack = {"peft", "bitsandbytes", "lm_eval"}

    assert not loaded("fetch_dataset", stub=False, input={"files": []}, output={"raw": raw},
                      params={"dataset": dataset, "format": task["format"]}) & {*HEAVY}
    assert (raw / "test.jsonl").is_file()
    assert not loaded("eval_task_spec", stub=False, wildcards={"task": "t"},
                      input={"raw": raw, "base": base}, output={"spec": tmp_path / "spec"},
                      params={"format": task["format"], "max_gen_tokens": 8}) & model_stack
    assert (tmp_path / "spec" / "task.json").is_file()
    assert not loaded("tokenize", stub=False, input={"raw": raw, "base": base},
                      output={"tokenized": tmp_path / "tokenized"},
                      params={"format": task["format"], "tokenize": task["tokenize"]}) & model_stack
    assert (tmp_path / "tokenized" / "stats.json").is_file()

    run = make_run(tmp_path / "report")
    sections = {k: [str(p) for p in v] for k, v in run["sections"].items()}
    files = [f for fs in sections.values() for f in fs]
    assert not loaded("report", stub=False, input={"files": files}, output=run["outputs"],
                      params={"sections": sections, "tables": {}}) & {*HEAVY}
    assert run["outputs"]["markdown"].is_file()


def test_scoring_a_model_without_an_adapter_needs_no_peft(tmp_path, tiny_model_dir):
    """peft (and the bitsandbytes it imports) only where an adapter is put on the model."""
    task = task_blocks()
    stage("fetch_dataset")(raw=tmp_path / "raw", format=task["format"],
                           dataset={**task["dataset"], "num_examples": 40, "seed": 1})
    stage("eval_task_spec")(raw=tmp_path / "raw", base=tiny_model_dir, spec=tmp_path / "spec",
                            format=task["format"], max_gen_tokens=4, task="t")
    outputs = {name: tmp_path / "eval" / name for name in ("results", "samples", "provenance")}
    found = loaded("evaluate", stub=False, wildcards={"task": "t", "variant": "base"},
                   input={"spec": tmp_path / "spec", "base": tiny_model_dir}, output=outputs,
                   params={"seed": 0, "evaluation": {"benchmarks": [], "num_fewshot": 0,
                                                     "limit": 4, "batch_size": 2,
                                                     "max_gen_tokens": 4}})
    assert outputs["results"].is_file()
    assert "lm_eval" in found and not found & {"peft", "bitsandbytes"}
