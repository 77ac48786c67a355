"""A config edit reruns exactly the stages that depend on it (Snakemake's params trigger; a
library edit: tests/test_code_digest.py).

Each test edits a private copy of one finished tiny run and asks a dry run which jobs would
run; jobs are compared as (rule, task, variant) triples.
"""

from __future__ import annotations

import re
import time

import yaml

from conftest import snakemake

TASKS = ("arithmetic", "topic")


def planned(workdir) -> set[tuple[str, str, str]]:
    """The jobs a dry run would execute, as (rule, task, variant)."""
    return planned_with(workdir)


def planned_with(workdir, **options) -> set[tuple[str, str, str]]:
    """planned(), with conftest.snakemake's options (e.g. repo: an edited copy of the
    workflow and its library)."""
    return jobs_of(snakemake(workdir, "-n", **options).stdout)


def jobs_of(out: str) -> set[tuple[str, str, str]]:
    """The jobs of a dry run's output, as (rule, task, variant)."""
    jobs = set()
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        head = re.match(r"(?:local)?rule (\w+):", block.strip())
        if not head or head[1] == "all":
            continue
        wildcards = dict(re.findall(r"(\w+)=([\w+.@-]+)", (re.search(r"wildcards: (.*)", block)
                                                      or [None, ""])[1]))
        # the third field: an evaluation's variant, an adapter's name (a training's, an
        # analysis's: qlora, recovered@r1, ...), a combination
        third = next((wildcards[k] for k in ("variant", "name", "combination")
                      if k in wildcards), "")
        jobs.add((head[1], wildcards.get("task", ""), third))
    return jobs


def edit(path, change) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def rules(jobs) -> set[str]:
    return {rule for rule, _, _ in jobs}


def test_no_change_nothing_to_do_and_fast(copy_run):
    workdir = copy_run()
    started = time.time()
    assert planned(workdir) == set()
    assert time.time() - started < 5


def test_a_tracker_retrains_nothing(copy_run):
    """train.report_to is in no rule's train param and is itself a derived param, which
    Snakemake's params trigger skips (rules/common.smk's trackers)."""
    workdir = copy_run()
    edit(workdir / "config/config.yaml",
         lambda c: c["defaults"]["train"].update(report_to=["mlflow", "tensorboard"]))
    assert planned(workdir) == set()


def test_evaluation_settings_rerun_only_scoring_and_report(copy_run):
    workdir = copy_run()
    edit(workdir / "config/config.yaml", lambda c: c["evaluation"].update(limit=5, num_fewshot=1))
    jobs = planned(workdir)
    assert rules(jobs) == {"evaluate", "report"}
    variants = {"arithmetic": {"base", "quantized", "qlora", "recovered", "merged",
                               "qlora+topic", "combined+both"},
                "topic": {"base", "quantized", "qlora", "compressed", "merged",
                          "qlora+arithmetic", "combined+both", "qlora@r1", "qlora@r2"}}
    assert {(t, v) for r, t, v in jobs if r == "evaluate"} == {
        (t, v) for t, vs in variants.items() for v in vs}


def test_lora_rank_of_one_task(copy_run):
    workdir = copy_run()
    edit(workdir / "config/tasks/arithmetic.yaml", lambda t: t.setdefault("lora", {}).update(r=4))
    jobs = planned(workdir)
    assert jobs == {
        ("train_qlora", "arithmetic", "qlora"), ("recover", "arithmetic", "recovered"),
        ("merge", "arithmetic", ""), ("evaluate", "arithmetic", "qlora"),
        ("evaluate", "arithmetic", "recovered"), ("evaluate", "arithmetic", "merged"),
        ("analyze_adapter", "arithmetic", "qlora"), ("analyze_adapter", "arithmetic", "recovered"),
        # the combination of both tasks, and arithmetic's adapter where it is scored on topic
        ("combine_adapters", "", "both"), ("evaluate", "arithmetic", "combined+both"),
        ("evaluate", "topic", "combined+both"), ("evaluate", "topic", "qlora+arithmetic"),
        ("report", "", ""),
    }


def test_dataset_of_one_task(copy_run):
    workdir = copy_run()
    edit(workdir / "config/tasks/topic.yaml", lambda t: t["dataset"].update(num_examples=70))
    jobs = planned(workdir)
    # of arithmetic, only what scores topic's adapter on it: alone and in the combination
    assert {(r, v) for r, t, v in jobs if t == "arithmetic"} == {
        ("evaluate", "qlora+topic"), ("evaluate", "combined+both")}, jobs
    assert {("fetch_dataset", "topic", ""), ("tokenize", "topic", ""),
            ("eval_task_spec", "topic", ""), ("train_qlora", "topic", "qlora"),
            ("merge", "topic", ""), ("analyze_adapter", "topic", "qlora"),
            ("compress_adapter", "topic", ""), ("quantization_report", "", ""),
            ("report", "", "")} <= jobs
    assert {v for r, t, v in jobs if r == "evaluate" and t == "topic"} == {
        "base", "quantized", "qlora", "compressed", "merged", "qlora+arithmetic",
        "combined+both", "qlora@r1", "qlora@r2"}  # the sweep's points too: their data changed
    assert not rules(jobs) & {"import_base_model", "quantize"}


def test_quantization_block(copy_run):
    workdir = copy_run()
    edit(workdir / "config/config.yaml", lambda c: c["quantization"].update(method="fp4"))
    jobs = planned(workdir)
    assert {"quantize", "quantization_report", "train_qlora", "recover", "merge",
            "analyze_adapter", "compress_adapter", "combine_adapters", "evaluate",
            "report"} == rules(jobs)
    # every training of the table: the tasks' own and topic's sweep points
    assert {n for r, t, n in jobs if r == "train_qlora"} == {"qlora", "qlora@r1", "qlora@r2"}
    assert not rules(jobs) & {"fetch_dataset", "tokenize", "import_base_model", "eval_task_spec"}
    # the full-precision base's scores do not depend on quantization
    assert not any(r == "evaluate" and v == "base" for r, _, v in jobs)


def test_quantization_sweep_entry_runs_only_its_measure_and_the_tables(copy_run):
    """A method added to quantization_sweep: its job and the report (whose section it is); no
    training, no scoring, no requantizing (sweep points are measured, not trained)."""
    workdir = copy_run()
    edit(workdir / "config/config.yaml",
         lambda c: c.update(quantization_sweep=[{"method": "hqq", "bits": 3}]))
    assert rules(planned(workdir)) == {"quantization_sweep_point", "report"}


def test_a_missing_report_file_reruns_the_report(copy_run):
    """rule all asks for every file of the report, not report.md alone: Snakemake reruns a job
    for a missing output only where it is requested."""
    workdir = copy_run()
    (workdir / "results/report/scores.png").unlink()
    assert rules(planned(workdir)) == {"report"}


def test_a_key_of_another_method_reruns_nothing_it_is_refused(copy_run):
    workdir = copy_run()
    edit(workdir / "config/config.yaml", lambda c: c["quantization"].update(group_size=32))
    out = snakemake(workdir, "-n", check=False)
    assert out.returncode != 0
    assert "config key 'quantization.group_size': found it with method 'nf4'" in \
        out.stdout + out.stderr


def test_base_model_reruns_everything_but_raw_data(copy_run, tmp_path):
    import shutil

    workdir = copy_run()
    config = yaml.safe_load((workdir / "config/config.yaml").read_text())
    moved = tmp_path / "other-model"
    shutil.copytree(config["base_model"]["path"], moved)
    edit(workdir / "config/config.yaml", lambda c: c["base_model"].update(path=str(moved)))
    jobs = planned(workdir)
    assert "fetch_dataset" not in rules(jobs)
    assert {"import_base_model", "tokenize", "quantize", "quantization_report", "train_qlora",
            "recover", "merge", "analyze_adapter", "compress_adapter", "combine_adapters",
            "eval_task_spec", "evaluate", "report"} == rules(jobs)


def test_a_new_combination_runs_only_its_jobs(copy_run):
    workdir = copy_run()
    edit(workdir / "config/config.yaml", lambda c: c["combinations"].append(
        {"name": "cut", "tasks": ["topic", "arithmetic"], "method": "svd", "svd_rank": 1}))
    assert planned(workdir) == {
        ("combine_adapters", "", "cut"), ("evaluate", "arithmetic", "combined+cut"),
        ("evaluate", "topic", "combined+cut"), ("report", "", "")}
    # its method edited: that combination again, not the other one
    edit(workdir / "config/config.yaml", lambda c: c["combinations"][1].update(svd_rank=2))
    assert ("combine_adapters", "", "both") not in planned(workdir)


def test_an_export_runs_only_its_job_and_the_report(copy_run):
    """export.gguf on for one task: its export and the report, nothing upstream (planned,
    not run: the tiny tokenizer is not one llama.cpp's converter knows; the default run runs
    it)."""
    workdir = copy_run()
    edit(workdir / "config/tasks/topic.yaml",
         lambda t: t.update(export={"gguf": True, "type": ["f16", "q4_k_m"]}))
    assert planned(workdir) == {("export_gguf", "topic", ""), ("report", "", "")}


def test_recovery_switched_on_for_one_task(copy_run):
    workdir = copy_run()
    edit(workdir / "config/tasks/topic.yaml",
         lambda t: t.update(recovery={"enabled": True, "steps": 2}))
    jobs = planned(workdir)
    assert jobs == {
        ("recover", "topic", "recovered"), ("merge", "topic", ""),
        ("evaluate", "topic", "recovered"), ("evaluate", "topic", "merged"),
        ("analyze_adapter", "topic", "recovered"), ("report", "", ""),
    }


def test_compression_edits_rerun_only_the_compressed_variant(copy_run):
    workdir = copy_run()
    edit(workdir / "config/tasks/topic.yaml", lambda t: t.update(compress={"energy": 0.5}))
    assert planned(workdir) == {("compress_adapter", "topic", ""),
                                ("evaluate", "topic", "compressed"), ("report", "", "")}
    # Switched on for a task that had none: its compression and score, nothing else.
    edit(workdir / "config/tasks/arithmetic.yaml", lambda t: t.update(compress={"rank": 1}))
    assert planned(workdir) == {
        ("compress_adapter", "topic", ""), ("evaluate", "topic", "compressed"),
        ("compress_adapter", "arithmetic", ""), ("evaluate", "arithmetic", "compressed"),
        ("report", "", "")}
