# Configuration loading and validation, path helpers and input functions.
# Everything here runs when the workflow is parsed, so a bad config fails before any job.
# The library (qlora_pipeline) is installed into .venv by `make setup`, and into each conda
# env by its post-deploy script (envs/*.post-deploy.sh), which reads QLORA_PIPELINE_ROOT.

import os
import re

from qlora_pipeline import code_digest, combinations, layout, quant_settings, sweeps, warm_start
from qlora_pipeline.config import load_config, recovery_train
from qlora_pipeline.errors import InputError

os.environ.setdefault("QLORA_PIPELINE_ROOT", workflow.basedir)

try:
    config, TASKS = load_config(config, root=".")
    layout.use_run(config["run"])  # results/<run>/ for every path below
except InputError as err:
    raise WorkflowError(str(err)) from None
RESULTS = layout.RESULTS
COMBINATIONS = {c["name"]: c for c in config["combinations"]}
QUANT_SWEEP = {quant_settings.label(p): p for p in config["quantization_sweep"]}


wildcard_constraints:
    task="|".join(TASKS),
    variant=layout.VARIANT_PATTERN,
    point=sweeps.POINT,
    qpoint="|".join(QUANT_SWEEP) or "(?!)",


def code(rule):
    """A digest of the library code the rule's stage runs: a rerun trigger (params.code)."""
    return code_digest.for_rule(rule)


def _gpus():
    resource = workflow.global_resources.get("gpu")
    return 1 if resource is None or resource.value is None else max(1, resource.value)


def _cores():
    """--cores; a cluster executor may run without a total (then set-threads decides)."""
    try:
        return workflow.cores
    except WorkflowError:
        return 1


# Threads of a model job (torch reads them; Snakemake sets OMP_NUM_THREADS to them): every
# core given (--cores) on a CPU, an equal share per GPU when --resources gpu=N lets N model
# jobs run side by side. A cluster profile sets them per rule (set-threads), and Slurm's
# --cpus-per-task follows. Data jobs are single-threaded: DATA_THREADS.
MODEL_THREADS = max(1, _cores() // _gpus())
DATA_THREADS = 1
# The training chain (tokenize, quantize, training, recovery, merge) is a run's longest path:
# when jobs wait for a core or a slot (--resources gpu=N), its jobs go first and evaluations
# and analyses fill the gaps (docs/performance.md).
TRAINING_PRIORITY = 10


# A training job (QLoRA, recovery, a sweep point's) may run on several processes through
# torchrun (train.distributed, qlora_pipeline/launch.py): it asks for one GPU and
# MODEL_THREADS cores per process of its node, and for its nodes (the Slurm executor's
# --nodes; the GPU count is the job's total, as --gpus reads it).
def training_threads(cfg_of):
    return lambda wc: MODEL_THREADS * _distributed(cfg_of(wc))["processes"]


def training_gpus(cfg_of):
    return lambda wc: _distributed(cfg_of(wc))["processes"] * _distributed(cfg_of(wc))["nodes"]


def training_nodes(cfg_of):
    return lambda wc: _distributed(cfg_of(wc))["nodes"]


def _distributed(cfg):
    return cfg["train"]["distributed"]


def task_cfg(wildcards):
    return TASKS[wildcards.task]


def local_dataset_files(wildcards):
    """Local dataset files are declared inputs, so editing one reruns the task."""
    dataset = task_cfg(wildcards)["dataset"]
    if dataset["source"] != "local":
        return []
    return list((dataset.get("files") or {"train": dataset["path"]}).values())


def recovery_enabled(task):
    return TASKS[task]["recovery"]["enabled"]


def compress_enabled(task):
    return TASKS[task]["compress"] is not None


def final_adapter(wildcards):
    """The adapter a task ships: the recovered one when recovery is on, else the QLoRA one."""
    kind = "recovered" if recovery_enabled(wildcards.task) else "qlora"
    return layout.adapter(wildcards.task, kind)


def variants(task):
    """The configured variants that exist for a task (`recovered` and `compressed` only where
    the task enables them)."""
    optional = {"recovered": recovery_enabled(task), "compressed": compress_enabled(task)}
    return [v for v in config["evaluation"]["variants"] if optional.get(v, True)]


def variant_inputs(wildcards):
    """What one variant × task evaluation loads (layout.variant_inputs)."""
    return layout.variant_inputs(wildcards.variant, wildcards.task)


def eval_settings(wildcards=None):
    """The evaluation settings a score depends on (not the variant list)."""
    return {k: v for k, v in config["evaluation"].items() if k != "variants"}


def eval_results():
    return [layout.evaluation(v, t)["results"] for t in TASKS for v in variants(t)]


def adapter_kinds(task):
    return ["qlora", "recovered"] if recovery_enabled(task) else ["qlora"]


def all_adapters():
    return [layout.adapter(t, kind) for t in TASKS for kind in adapter_kinds(t)]


def all_analyses():
    return [layout.analysis(t, kind) for t in TASKS for kind in adapter_kinds(t)]


def all_compressions():
    return [layout.adapter(t, "compressed") for t in TASKS if compress_enabled(t)]


def point_cfg(wildcards):
    """One sweep point's blocks, seed, swept values and training id (sweeps.py)."""
    return TASKS[wildcards.task]["sweep_points"][wildcards.point]


def training_cfg(wildcards):
    """One QLoRA training of a sweep: `point` names the training (sweeps.trainings)."""
    return sweeps.trainings(TASKS[wildcards.task]["sweep_points"])[wildcards.point]


def sweep_cfg(task):
    return TASKS[task]["sweep"]


def sweep_points():
    return [(t, point) for t in TASKS for point in TASKS[t]["sweep_points"]]


def sweep_trainings(task):
    return sweeps.trainings(TASKS[task]["sweep_points"])


def point_adapter(task, point, kind):
    """The adapter a point is scored with as `kind`: its training's (qlora) or its own."""
    cfg = TASKS[task]["sweep_points"][point]
    return layout.sweep_adapter(task, cfg["training"] if kind == "qlora" else point, kind)


def point_inputs(wildcards):
    """What scoring a point as a variant loads: the task's variant's inputs, with the point's
    adapter in place of the task's."""
    return {**layout.variant_inputs(wildcards.variant, wildcards.task),
            "adapter": point_adapter(wildcards.task, wildcards.point, wildcards.variant)}


def all_sweep_results():
    return [layout.sweep_evaluation(t, p, v)["results"] for t, p in sweep_points()
            for v in sweep_cfg(t)["variants"]]


def all_sweep_adapters():
    """Every trained and recovered adapter of every sweep (the report reads each point's
    training summary, whatever it is scored as)."""
    return [point_adapter(t, p, kind) for t, p in sweep_points()
            for kind in dict.fromkeys(["qlora", *sweep_cfg(t)["variants"]])]


def all_sweep_analyses():
    return [layout.sweep_analysis(t, training) for t in TASKS for training in sweep_trainings(t)]


def sweep_table(task):
    """What the report and the promotion read of a task's sweep, by path
    (evaluation/sweep_report.py): per point its training, scores, adapters and analysis."""
    points = TASKS[task]["sweep_points"]
    if not points:
        return None
    variants = sweep_cfg(task)["variants"]
    return {"variants": variants, "promote": sweep_cfg(task)["promote"], "points": {
        point: {"training": cfg["training"],
                "results": {v: layout.sweep_evaluation(task, point, v)["results"]
                            for v in variants},
                "adapters": {kind: point_adapter(task, point, kind)  # qlora: its training's
                             for kind in dict.fromkeys(["qlora", *variants])},
                "analysis": layout.sweep_analysis(task, cfg["training"])}
        for point, cfg in points.items()}}


def promoted(task):
    return bool(TASKS[task]["sweep_points"]) and sweep_cfg(task)["promote"] == "best"


def one_of(names):
    """A wildcard constraint matching exactly these names (none: matches nothing)."""
    return "|".join(map(re.escape, names)) or "(?!)"


# A task with `sweep.promote: best` gets its adapters from its chosen sweep point (rule
# promote_sweep_point), not from train_qlora and recover: the rules' `task` wildcards are
# constrained to the tasks they serve.
PROMOTED = one_of([t for t in TASKS if promoted(t)])
NOT_PROMOTED = one_of([t for t in TASKS if not promoted(t)])


def combination_cfg(wildcards):
    return COMBINATIONS[wildcards.combination]


def combination_scores():
    """(variant, task) of the combination matrix: on every task of a combination, the
    quantized base, each such task's adapter (its own and the others': the interference
    baseline) and each combination of it."""
    tasks = combinations.scored_tasks(COMBINATIONS)
    kind = combinations.KIND
    pairs = [(v, t) for t in tasks
             for v in ("quantized", kind, *(f"{kind}+{s}" for s in tasks if s != t))]
    return pairs + [(f"{layout.COMBINED}+{name}", t) for name, c in COMBINATIONS.items()
                    for t in c["tasks"]]


def combination_table():
    """What the report reads of the combinations, by path (evaluation/combination_report.py):
    each one's settings and folder, and every score of the matrix by task and variant."""
    if not COMBINATIONS:
        return None
    results = {}
    for variant, task in combination_scores():
        results.setdefault(task, {})[variant] = layout.evaluation(variant, task)["results"]
    return {"combinations": {name: {**c, "adapter": layout.combination(name)}
                             for name, c in COMBINATIONS.items()},
            "results": results}


def all_results():
    """Every score the report tables: the configured variants and the combination matrix."""
    matrix = [layout.evaluation(v, t)["results"] for v, t in combination_scores()]
    return list(dict.fromkeys([*eval_results(), *matrix]))


def all_exports():
    """The GGUF export of every task with `export.gguf` (rules/export.smk)."""
    return [layout.gguf(t) for t in TASKS if TASKS[t]["export"]["gguf"]]


def quantization_markdown():
    """The quantization report the report includes: with the sweep's section when there is one."""
    if QUANT_SWEEP:
        return layout.quantization_sweep()["markdown"]
    return layout.quantization_report()["markdown"]


def all_outputs():
    return [
        quantization_markdown(),
        *all_adapters(),
        *[layout.combination(name) for name in COMBINATIONS],
        *all_analyses(),
        *all_compressions(),
        *all_sweep_results(),
        *all_sweep_analyses(),
        *[layout.merged(t) for t in TASKS],
        *all_exports(),
        *all_results(),
        layout.report()["markdown"],
    ]
