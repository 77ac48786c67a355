"""Sweeps: a task's `sweep:` block expanded into named points (checked when the config loads),
each point a row of the trainings table, trained, scored and analysed by the task's own rules,
only the new points run when the grid grows, and the report's table, plot and chosen point."""

from __future__ import annotations

import copy
import json
import re
import shutil

import pandas as pd
import pytest
import yaml
from conftest import REPO, TINY_TASKS, snakemake, tiny_config, write_yaml
from test_incremental import edit, jobs_of, planned

from qlora_pipeline.config import load_config, sweeps, trainings
from qlora_pipeline.core import layout
from qlora_pipeline.core.errors import InputError
from qlora_pipeline.report import sweeps as sweep_report

BASE_CONFIG = yaml.safe_load((REPO / "config/config.yaml").read_text())


def table(sweep: dict, task: str = "topic", **overrides) -> dict:
    """The task's rows of the trainings table, its own training's (id "") included."""
    config = copy.deepcopy(BASE_CONFIG)
    config["task_overrides"] = {task: {"sweep": sweep, **overrides}}
    return load_config(config, root=REPO)[1][task]["trainings"]


def points(sweep: dict, task: str = "topic", **overrides) -> dict:
    """The sweep's points: the rows but the task's own."""
    return {id: row for id, row in table(sweep, task, **overrides).items() if id}


def test_grid_names_every_combination_and_sets_its_values():
    found = points({"lora.r": [2, 16], "train.learning_rate": [1e-4, 3e-4]})
    assert sorted(found) == ["r16-lr1e-4", "r16-lr3e-4", "r2-lr1e-4", "r2-lr3e-4"]
    point = found["r16-lr3e-4"]
    assert point["lora"]["r"] == 16 and point["train"]["learning_rate"] == 3e-4
    assert point["settings"] == {"lora.r": 16, "train.learning_rate": 3e-4}
    # Everything not swept is the task's own setting (topic: q_proj/v_proj, 20 steps).
    assert point["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert point["train"]["max_steps"] == 20 and point["seed"] == BASE_CONFIG["seed"]


def test_zip_pairs_values_and_seeds_repeat_each_point():
    found = points({"mode": "zip", "lora.r": [4, 8], "lora.alpha": [8, 16], "seeds": [0, 1]})
    assert sorted(found) == ["alpha16-r8-s0", "alpha16-r8-s1", "alpha8-r4-s0", "alpha8-r4-s1"]
    assert found["alpha8-r4-s1"]["seed"] == 1 and found["alpha8-r4-s1"]["lora"]["alpha"] == 8


def test_ids_are_readable_and_stable():
    assert sweeps.point_id({"lora.target_modules": ["q_proj", "v_proj"]}, None) == "q_proj+v_proj"
    assert sweeps.point_id({"lora.target_modules": "all-linear", "lora.r": 4}, 2) == \
        "r4-all-linear-s2"
    assert [sweeps.value_text(v) for v in (3e-4, 0.05, 1e-3, 16, 2.5e-5, True)] == [
        "3e-4", "0.05", "1e-3", "16", "2.5e-5", "true"]


@pytest.mark.parametrize("sweep, message", [
    ({"lora.rr": [2]}, "key 'sweep.lora.rr': not a setting a sweep can vary (did you mean "
                       "'lora.r'?)"),
    ({"recovery.enabled": [True]}, "list recovered in sweep.variants instead"),
    ({"train.report_to": [["mlflow"]]}, "key 'sweep.train.report_to': not a setting a sweep "
                                        "can vary"),  # trains nothing else
    ({"recovery.steps": [2, 4]}, "key 'sweep.recovery.steps': found the points scored as "
                                 "['qlora'] only, so a recovery setting changes no score"),
    ({"lora.r": [2], "variants": ["recovered"]}, "found recovered, but the task's "
                                                 "recovery.enabled is false"),
    ({"lora.r": [2], "variants": ["merged"]},
     "key 'sweep.variants.0': found \"merged\", expected one of qlora, recovered"),
    ({"lora.r": [2], "promote": "yes"}, "key 'sweep.promote': found \"yes\""),
    ({"mode": "zip", "lora.r": [2, 4], "lora.alpha": [8]}, "expected equal lengths"),
    ({"lora.r": [0, 2]}, "(sweep point r0): invalid configuration:\n  key 'lora.r': found 0"),
    ({"mode": "grid"}, "found no swept key"),
    ({"lora.r": [2, 2]}, "two points are both named 'r2'"),
    ({"lora.r": []}, "key 'sweep.lora.r': found [], expected at least 1 item(s)"),
    ({"lr": [1e-3]}, "found unknown key(s) 'lr'"),
])
def test_bad_sweeps_are_refused_naming_the_key(sweep, message):
    with pytest.raises(InputError) as err:
        points(sweep)
    assert message in str(err.value) and "config/tasks/topic.yaml" in str(err.value)


def test_points_differing_only_in_recovery_share_one_training():
    found = points({"lora.r": [4, 8], "recovery.steps": [5, 10], "variants": ["recovered"]},
                   task="arithmetic")
    assert sorted(found) == ["r4-rsteps10", "r4-rsteps5", "r8-rsteps10", "r8-rsteps5"]
    assert found["r4-rsteps5"]["qlora"] == found["r4-rsteps10"]["qlora"] == "r4"
    assert found["r8-rsteps5"]["recovery"]["steps"] == 5
    assert trainings.adapters(found, ["qlora"]) == ["qlora@r4", "qlora@r8"]
    assert trainings.adapter_name(found["r8-rsteps5"], "recovered") == "recovered@r8-rsteps5"
    assert trainings.by_adapter(found, "qlora@r8")["lora"]["r"] == 8
    # Only recovery swept: every point recovers the one training with the task's settings.
    found = points({"recovery.learning_rate": [1e-5, 1e-4], "variants": ["qlora", "recovered"]},
                   task="arithmetic")
    assert {p["qlora"] for p in found.values()} == {sweeps.SHARED}
    assert sweeps.selection_variant({"variants": ["qlora", "recovered"]}) == "recovered"


def test_promoting_a_recovered_task_needs_recovered_points():
    with pytest.raises(InputError, match="key 'sweep.promote': the task ships a recovered "
                                         "adapter, found the points scored as \\['qlora'\\]"):
        points({"lora.r": [2], "promote": "best"}, task="arithmetic")
    assert points({"lora.r": [2], "promote": "best"})  # topic: no recovery, qlora suffices


def test_no_sweep_one_row_the_tasks_own():
    rows = table(None)
    assert list(rows) == [""] and rows[""]["settings"] == {} and rows[""]["qlora"] == ""
    assert trainings.adapters(rows) == ["qlora"]  # topic: no recovery
    assert trainings.adapters(table(None, task="arithmetic")) == ["qlora", "recovered"]


def test_the_rule_picks_the_smallest_adapter_within_one_stderr():
    frame = pd.DataFrame({
        "point": ["r2", "r4", "r8", "r16"], "lora.r": [2, 4, 8, 16],
        "score": [0.50, 0.78, 0.80, 0.81], "stderr": [0.05, 0.05, 0.04, 0.04],
        "trainable_params": [100, 200, 400, 800]})
    assert sweep_report.choose(frame)["point"] == "r4"  # 0.78 >= 0.81 - 0.04
    frame.loc[1, "score"] = 0.70
    assert sweep_report.choose(frame)["point"] == "r8"


# ---- the session's tiny run: topic sweeps lora.r over [1, 2] ---------------------------------

POINTS = {"r1": 1, "r2": 2}


def test_each_point_is_trained_scored_and_analysed(tiny_run):
    """By the task's own rules: train_qlora, evaluate and analyze_adapter, with the point's
    settings as params (what the report reads is the trainings table, not provenance)."""
    params = {}
    for point, rank in POINTS.items():
        adapter = tiny_run / layout.adapter("topic", f"qlora@{point}")
        assert json.loads((adapter / "adapter_config.json").read_text())["r"] == rank
        provenance = json.loads((adapter / "provenance.json").read_text())
        assert provenance["stage"] == "train_qlora"
        assert provenance["params"]["lora"]["r"] == rank
        assert provenance["wildcards"] == {"task": "topic", "name": f"qlora@{point}"}
        params[point] = json.loads((adapter / "summary.json").read_text())["trainable_params"]
        results = json.loads((tiny_run / layout.evaluation(f"qlora@{point}", "topic")[
            "results"]).read_text())
        assert results["variant"] == f"qlora@{point}" and results["task"] == "topic"
        summary = json.loads((tiny_run / layout.analysis("topic", f"qlora@{point}") /
                              "summary.json").read_text())
        assert summary["r"] == rank and summary["kind"] == f"qlora@{point}"
    assert params["r2"] == 2 * params["r1"]  # trainable parameters scale with the rank


def test_the_report_tables_and_plots_the_points(tiny_run):
    table = pd.read_csv(tiny_run / f"{layout.report()}/sweeps.csv")
    assert sorted(table["point"]) == sorted(POINTS) and set(table["task"]) == {"topic"}
    assert list(table.sort_values("point")["lora.r"]) == [1, 2]
    assert table["score"].between(0, 1).all() and (table["trainable_params"] > 0).all()
    report = (tiny_run / f"{layout.report()}/report.md").read_text()
    section = report.split("## Sweeps", 1)[1].split("## Adapters", 1)[0]
    assert "### topic" in section and "Chosen: **r" in section
    assert (tiny_run / f"{layout.report()}/sweeps.png").stat().st_size > 0


def sweep_jobs(task: str, *points_: str) -> set:
    return {(rule, task, f"qlora@{point}") for point in points_
            for rule in ("train_qlora", "evaluate", "analyze_adapter")}


def test_adding_a_point_runs_only_it(copy_run):
    workdir = copy_run()
    edit(workdir / "config/tasks/topic.yaml", lambda t: t["sweep"].update({"lora.r": [1, 2, 4]}))
    assert planned(workdir) == sweep_jobs("topic", "r4") | {("report", "", "")}


def test_adding_loftq_and_pissa_points_runs_only_them_on_their_bases(copy_run):
    """A LoftQ point trains on the shared base (and reads the full-precision one); a PiSSA
    point adds its own base's job, and its training, scoring and analysis read that base."""
    workdir = copy_run()
    edit(workdir / "config/tasks/arithmetic.yaml",
         lambda t: t.update(sweep={"lora.init": ["loftq", "pissa"]}))
    out = snakemake(workdir, "-n").stdout
    assert jobs_of(out) == sweep_jobs("arithmetic", "initloftq", "initpissa") | {
        ("quantize_for_training", "", ""), ("report", "", "")}
    inputs = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        found = re.match(r"(?:local)?rule (\w+):.*?input: ([^\n]*).*?wildcards: ([^\n]*)",
                         block.strip(), re.S)
        if found:
            inputs[found[1], found[3]] = found[2].split(", ")
    own = [wildcards for rule, wildcards in inputs if rule == "quantize_for_training"]
    base = layout.training_base(own[0].removeprefix("base="))
    assert base.startswith(layout.quantized() + "@pissa-")
    for job in (("train_qlora", "task=arithmetic, name=qlora@initpissa"),
                ("evaluate", "variant=qlora@initpissa, task=arithmetic"),
                ("analyze_adapter", "task=arithmetic, name=qlora@initpissa")):
        assert base in inputs[job] and layout.quantized() not in inputs[job], job
    assert inputs["train_qlora", "task=arithmetic, name=qlora@initloftq"] == [
        layout.quantized(), layout.tokenized("arithmetic"), layout.base()]
    assert layout.quantized() in inputs["evaluate", "variant=qlora@initloftq, task=arithmetic"]


def test_removing_a_point_reruns_only_the_report_and_keeps_its_files(copy_run):
    workdir = copy_run()
    edit(workdir / "config/tasks/topic.yaml", lambda t: t["sweep"].update({"lora.r": [1]}))
    assert planned(workdir) == {("report", "", "")}
    assert (workdir / layout.adapter("topic", "qlora@r2")).is_dir()


def test_a_key_not_swept_reruns_every_point_and_nothing_of_other_tasks(copy_run):
    workdir = copy_run()
    edit(workdir / "config/tasks/topic.yaml",
         lambda t: t.setdefault("train", {}).update(learning_rate=0.002))
    jobs = planned(workdir)
    assert sweep_jobs("topic", *POINTS) <= jobs
    # of arithmetic, only the scores of topic's adapter on it, alone and in the combination
    assert {(r, v) for r, t, v in jobs if t == "arithmetic"} == {
        ("evaluate", "qlora+topic"), ("evaluate", "combined+both")}
    assert {r for r, _, _ in jobs} == {
        "train_qlora", "merge", "compress_adapter", "combine_adapters", "evaluate",
        "analyze_adapter", "report"}


# ---- promotion and recovered points: arithmetic (recovery on) sweeps lora.r × recovery.steps ---

PROMOTED_SWEEP = {"lora.r": [1, 2], "recovery.steps": [1, 2], "variants": ["qlora", "recovered"],
                  "promote": "best"}
RECOVERED_POINTS = ["r1-rsteps1", "r1-rsteps2", "r2-rsteps1", "r2-rsteps2"]


@pytest.fixture(scope="module")
def promoted_run(tmp_path_factory, tiny_model_dir):
    """The tiny pipeline on arithmetic alone, its sweep promoting the chosen point."""
    workdir = tmp_path_factory.mktemp("promoted-run")
    config = tiny_config(tiny_model_dir, tasks=("arithmetic",))
    config["evaluation"]["variants"] = ["qlora", "recovered", "merged"]
    write_yaml(workdir / "config/config.yaml", config)
    write_yaml(workdir / "config/tasks/arithmetic.yaml",
               {**TINY_TASKS["arithmetic"], "sweep": PROMOTED_SWEEP})
    snakemake(workdir)
    return workdir


def test_recovered_points_share_their_training_and_are_scored_both_ways(promoted_run):
    adapters = promoted_run / "results/adapters/arithmetic"
    assert sorted(p.name for p in adapters.glob("qlora@*")) == ["qlora@r1", "qlora@r2"]
    for point in RECOVERED_POINTS:
        recovered = promoted_run / layout.adapter("arithmetic", f"recovered@{point}")
        provenance = json.loads((recovered / "provenance.json").read_text())
        assert provenance["stage"] == "recover"
        assert provenance["params"]["train"]["max_steps"] == int(point[-1])  # rsteps1/2
        training = f"qlora@{point.split('-')[0]}"
        assert provenance["inputs"]["qlora"]["path"] == layout.adapter("arithmetic", training)
        for variant in (training, f"recovered@{point}"):  # a training's score is shared
            results = json.loads((promoted_run / layout.evaluation(
                variant, "arithmetic")["results"]).read_text())
            assert results["variant"] == variant
    table = pd.read_csv(promoted_run / f"{layout.report()}/sweeps.csv")
    assert sorted(table["point"]) == RECOVERED_POINTS
    assert {"score", "score_qlora", "recovery.steps", "lora.r"} <= set(table.columns)


def test_promotion_ships_the_chosen_points_adapters(promoted_run):
    table = pd.read_csv(promoted_run / f"{layout.report()}/sweeps.csv")
    chosen = sweep_report.choose(table)["point"]
    for kind, source in (("qlora", chosen.split("-")[0]), ("recovered", chosen)):
        shipped = promoted_run / layout.adapter("arithmetic", kind)
        provenance = json.loads((shipped / "provenance.json").read_text())
        assert provenance["stage"] == "promote_sweep_point"
        promotion = json.loads((shipped / "promotion.json").read_text())
        assert promotion["point"] == chosen and promotion["variant"] == "recovered"
        assert sorted(c["point"] for c in promotion["candidates"]) == RECOVERED_POINTS
        trained = promoted_run / layout.adapter("arithmetic", f"{kind}@{source}")
        assert (shipped / "adapter_model.safetensors").read_bytes() == \
            (trained / "adapter_model.safetensors").read_bytes()
        assert json.loads((shipped / "trained_provenance.json").read_text()) == \
            json.loads((trained / "provenance.json").read_text())
    # The merge and the task's evaluations follow the promoted adapter; nothing trained it twice.
    merged = json.loads((promoted_run / layout.merged("arithmetic") / "provenance.json")
                        .read_text())
    assert merged["inputs"]["adapter"]["path"] == layout.adapter("arithmetic", "recovered")
    logs = promoted_run / "results/logs"
    assert not (logs / "train_qlora/arithmetic/qlora.log").exists()
    assert not (logs / "recover/arithmetic/recovered.log").exists()
    assert (logs / "train_qlora/arithmetic/qlora@r1.log").exists()
    report = (promoted_run / f"{layout.report()}/report.md").read_text()
    assert f"Chosen: **{chosen}**" in report and "Promoted (sweep.promote: best)" in report


def test_promotion_off_trains_the_task_itself_again(promoted_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(promoted_run, workdir, symlinks=True)
    edit(workdir / "config/tasks/arithmetic.yaml", lambda t: t["sweep"].pop("promote"))
    jobs = planned(workdir)
    assert {("train_qlora", "arithmetic", "qlora"), ("recover", "arithmetic", "recovered"),
            ("merge", "arithmetic", "")} <= jobs
    assert not any("@" in name for _, _, name in jobs)  # the points' own jobs stay done


@pytest.mark.parametrize("example", sorted(p for p in (REPO / "config/examples").glob("*.yaml")
                                            if re.search(r"^\s+sweep:", p.read_text(), re.M)),
                         ids=lambda p: p.name)
def test_the_example_configs_load_and_sweep(example):
    """Each example, laid over config/config.yaml as `--configfile` lays it, is a valid config
    with a sweep."""
    from qlora_pipeline.config import deep_merge

    config = deep_merge(BASE_CONFIG, yaml.safe_load(example.read_text()))
    tasks = load_config(config, root=REPO)[1]
    assert any(len(task["trainings"]) > 1 for task in tasks.values())
