# Configuration loading and validation, path helpers and input functions.
# Everything here runs when the workflow is parsed, so a bad config fails before any job.
# The library (qlora_pipeline) is installed into .venv by `make setup`, and into each conda
# env by its post-deploy script (envs/*.post-deploy.sh), which reads QLORA_PIPELINE_ROOT.

import os
import re

from qlora_pipeline.config import load_config, read_configfiles, recovery_train, sweeps, trainings
from qlora_pipeline.config import variants as task_variants
from qlora_pipeline.config import quantization as quant_settings
from qlora_pipeline.core import layout
from qlora_pipeline.core.errors import InputError
from qlora_pipeline.jobs import code_digest, warm_start
from qlora_pipeline.report import init_rank, rank_selection
from qlora_pipeline.report.sections import FILES as REPORT_FILES
from qlora_pipeline.report.sections import outputs as report_outputs

os.environ.setdefault("QLORA_PIPELINE_ROOT", workflow.basedir)


def _config_layers():
    """The config files in the order they merge, and the --config values: the Snakefile's
    configfile: (unless --replace-workflow-config), then each --configfile in order."""
    settings = workflow.config_settings
    own = workflow.configfiles[len(settings.configfiles):]  # listed after the command line's
    if settings.replace_workflow_config:
        own = []
    return [*own, *settings.configfiles], dict(settings.config)


try:
    # Where the command line adds layers, they are merged again by our rules (a switched
    # quantization method or model source taken whole, --config values typed); config.yaml
    # alone is Snakemake's config as it read it.
    if workflow.config_settings.configfiles or workflow.config_settings.config:
        config = read_configfiles(*_config_layers())
    config, TASKS = load_config(config, root=".")
    layout.use_run(config["run"])  # results/<run>/ for every path below
except InputError as err:
    raise WorkflowError(str(err)) from None
RESULTS = layout.results()
BASE, QUANTIZED = layout.base(), layout.quantized()
COMBINATIONS = {c["name"]: c for c in config["combinations"]}
QUANT_SWEEP = {quant_settings.label(p): p for p in config["quantization_sweep"]}
# The trainings table (qlora_pipeline/config/trainings.py): per task, its own training (id "")
# and each sweep point; one set of rules trains, recovers, scores and analyses every row.
TRAININGS = {task: TASKS[task]["trainings"] for task in TASKS}
# A training's own quantized base (PiSSA, LoftQ's alternating steps) by its id: the first row
# that trains on it (rows that would build identical bases share one id).
TRAINING_BASES = {id: row for rows in TRAININGS.values()
                  for id, row in trainings.bases(rows).items()}
STAGE = "../scripts/stage.py"  # every rule's script: it runs the stage named like the rule


def one_of(names):
    """A wildcard constraint matching exactly these names (none: matches nothing)."""
    return "|".join(map(re.escape, names)) or "(?!)"


def adapter_names(kinds=layout.TRAINED):
    return list(dict.fromkeys(n for rows in TRAININGS.values()
                              for n in trainings.adapters(rows, kinds)))


wildcard_constraints:
    task=one_of(TASKS),
    variant=layout.VARIANT_PATTERN,
    name=one_of(adapter_names()),
    qpoint=one_of(QUANT_SWEEP),
    base=one_of(TRAINING_BASES),


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
# The training chain (tokenize, quantize, training, recovery, merge, then the GGUF export) is
# a run's longest path:
# when jobs wait for a core or a slot (--resources gpu=N), its jobs go first and evaluations
# and analyses fill the gaps (docs/performance.md).
TRAINING_PRIORITY = 10


def task_cfg(wildcards):
    return TASKS[wildcards.task]


def training(wildcards):
    """The row of the trainings table that makes adapter `name` of `task`."""
    return trainings.by_adapter(TRAININGS[wildcards.task], wildcards.name)


# A training job (QLoRA or recovery, of any row) may run on several processes through
# torchrun (train.distributed, qlora_pipeline/jobs/launch.py): it asks for one GPU and
# MODEL_THREADS cores per process of its node, and for its nodes (the Slurm executor's
# --nodes; the GPU count is the job's total, as --gpus reads it).
def _distributed(wildcards):
    return training(wildcards)["train"]["distributed"]


def training_threads(wildcards):
    return MODEL_THREADS * _distributed(wildcards)["processes"]


def training_gpus(wildcards):
    return _distributed(wildcards)["processes"] * _distributed(wildcards)["nodes"]


def training_nodes(wildcards):
    return _distributed(wildcards)["nodes"]


def quantized_base(wildcards):
    """The quantized base a training trains on: the shared one, or the row's own."""
    own = training(wildcards)["base"]
    return layout.training_base(own) if own else QUANTIZED


def loftq_source(wildcards):
    """The full-precision base, for LoftQ on the shared base (its factors, in the job)."""
    lora = training(wildcards)["lora"]
    return [BASE] if lora["init"] == "loftq" and not training(wildcards)["base"] else []


def trackers(wildcards, output):
    """Where a training's curves go (train.report_to; layout.trackers). A param function that
    takes the output is one Snakemake calls derived and keeps out of its params trigger, so
    changing the tracker retrains nothing (tests/test_incremental.py)."""
    del output
    return layout.trackers(wildcards.task, wildcards.name, training(wildcards)["report_to"])


def trained_from(wildcards):
    """The QLoRA adapter a recovery continues: its row's QLoRA training's."""
    return layout.adapter(wildcards.task, trainings.adapter_name(training(wildcards), "qlora"))


def base_model_source(wildcards):
    """The GGUF file or local folder the import reads (none for a hub model): an input, so
    that its provenance records it; ancient, so that a reinstall reruns nothing."""
    base_model = config["base_model"]
    if base_model["source"] == "gguf":
        from qlora_pipeline.models.importer import gguf_location

        return [ancient(str(gguf_location(base_model)))]
    return [ancient(base_model["path"])] if base_model["source"] == "local" else []


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
    return layout.adapter(wildcards.task, "recovered" if recovery_enabled(wildcards.task)
                          else "qlora")


def variants(task):
    """The configured variants that exist for a task (config/variants.py: `recovered` and
    `compressed` only where the task enables them)."""
    return [v for v in config["evaluation"]["variants"] if v in task_variants.kinds(TASKS[task])]


def variant_inputs(wildcards):
    """What one variant × task evaluation loads (layout.variant_inputs)."""
    return layout.variant_inputs(wildcards.variant, wildcards.task,
                                 trainings.own_base(TRAININGS, wildcards.variant, wildcards.task))


def own_quantized(task, name="qlora"):
    """The quantized base adapter `name` of `task` was trained on (the shared one, or its
    training's own)."""
    return trainings.own_base(TRAININGS, name, task) or QUANTIZED


def eval_settings(wildcards=None):
    """The evaluation settings a score depends on (not the variant list)."""
    return {k: v for k, v in config["evaluation"].items() if k != "variants"}


def own_adapters(task):
    """The task's own training's adapters (what it ships, merges and analyses)."""
    return ["qlora", "recovered"] if recovery_enabled(task) else ["qlora"]


def sweep_cfg(task):
    return TASKS[task]["sweep"]


def points(task):
    """The task's sweep points: its rows of the trainings table but its own."""
    return {id: row for id, row in TRAININGS[task].items() if id}


def sweep_table(task):
    """What the report and the promotion read of a task's sweep, by path (report/sweeps.py):
    per point its settings and seed (from the trainings table), its scores, adapters and
    QLoRA training's analysis."""
    if not points(task):
        return None
    sweep = sweep_cfg(task)
    name = trainings.adapter_name
    return {"variants": sweep["variants"], "promote": sweep["promote"],
            "compare": sweeps.selection_variant(sweep), "points": {
        point: {"settings": row["settings"], "seed": row["seed"],
                "results": {v: layout.evaluation(name(row, v), task)["results"]
                            for v in sweep["variants"]},
                "adapters": {kind: layout.adapter(task, name(row, kind))
                             for kind in dict.fromkeys(["qlora", *sweep["variants"]])},
                "analysis": layout.analysis(task, name(row, "qlora"))}
        for point, row in points(task).items()}}


def init_rank_table(task):
    """What the report's Initialisation and rank section reads (report/init_rank.py): each
    training of the task whose QLoRA adapter is scored (its own, unless promotion made it a
    copy of a point; each point), its lora block from the trainings table and the paths of
    its QLoRA adapter, analysis and scores. None where every training keeps the default init
    and type."""
    name = trainings.adapter_name
    scored = {(id or "own"): (row, kinds) for id, row in TRAININGS[task].items()
              for kinds in [row["scored"] if id else variants(task)]
              if "qlora" in kinds and (id or not promoted(task))}
    if not any(init_rank.changed(row["lora"]) for row, _ in scored.values()):
        return None
    return {"rows": {id: {
        "lora": row["lora"], "adapter": layout.adapter(task, name(row, "qlora")),
        "analysis": layout.analysis(task, name(row, "qlora")),
        "results": {v: layout.evaluation(name(row, v), task)["results"]
                    for v in ("qlora", "recovered") if v in kinds}}
        for id, (row, kinds) in scored.items()}}


def init_rank_files():
    """The Initialisation and rank section's files, and the Rank selection section's (the
    AdaLoRA adapters and the plain LoRA analyses it pairs); none without such trainings."""
    tables = filter(None, map(init_rank_table, TASKS))
    rows = [table["rows"] for table in tables]
    trained = [f for t in rows for row in t.values()
               for f in (*row["results"].values(), row["adapter"])]
    pairs = [f for t in rows for adalora, lora in rank_selection.pairs(t)
             for f in (t[adalora]["adapter"], t[lora]["analysis"])]
    return list(dict.fromkeys(trained)), list(dict.fromkeys(pairs))


def promoted(task):
    return bool(points(task)) and sweep_cfg(task)["promote"] == "best"


def combination_cfg(wildcards):
    return COMBINATIONS[wildcards.combination]


def combination_scores():
    """(variant, task) of the combination matrix: on every task of a combination, the
    quantized base, each such task's adapter (its own and the others': the interference
    baseline) and each combination of it."""
    tasks = sorted({t for c in COMBINATIONS.values() for t in c["tasks"]})
    kind = layout.COMBINED_FROM
    pairs = [(v, t) for t in tasks
             for v in ("quantized", kind, *(f"{kind}+{s}" for s in tasks if s != t))]
    return pairs + [(f"{layout.COMBINED}+{name}", t) for name, c in COMBINATIONS.items()
                    for t in c["tasks"]]


def combination_table():
    """What the report reads of the combinations, by path (report/combinations.py): each
    one's settings and folder, and every score of the matrix by task and variant."""
    if not COMBINATIONS:
        return None
    results = {}
    for variant, task in combination_scores():
        results.setdefault(task, {})[variant] = layout.evaluation(variant, task)["results"]
    return {"combinations": {name: {**c, "adapter": layout.combination(name)}
                             for name, c in COMBINATIONS.items()},
            "results": results}


def quantization_files():
    """The quantization report, and with a `quantization_sweep` its methods' measures."""
    files = layout.quantization_report()
    points = [layout.quantization_sweep_point(label) for label in QUANT_SWEEP]
    return [files["report"], files["markdown"]], [files["report"], *points] if points else []


def report_sections():
    """Each report section's files (qlora_pipeline/report/sections.py), by section."""
    sweep_files = [[*t["results"].values(), *t["adapters"].values(), t["analysis"]]
                   for table in filter(None, map(sweep_table, TASKS))
                   for t in table["points"].values()]
    matrix = [layout.evaluation(v, t)["results"] for v, t in combination_scores()]
    return {
        "scores": list(dict.fromkeys(
            [layout.evaluation(v, t)["results"] for t in TASKS for v in variants(t)] + matrix)),
        "training": [layout.adapter(t, name) for t in TASKS for name in own_adapters(t)],
        "merges": [layout.merged(t) for t in TASKS],
        "compression": [layout.adapter(t, "compressed") for t in TASKS if compress_enabled(t)],
        "exports": [layout.gguf(t) for t in TASKS if TASKS[t]["export"]["gguf"]],
        "sweeps": list(dict.fromkeys(f for files in sweep_files for f in files)),
        # only with a training of another init or type: other runs' params stay as they were
        **{key: files for key, files in zip(("init_rank", "rank_selection"), init_rank_files())
           if files},
        "combinations": [layout.combination(n) for n in COMBINATIONS] + matrix,
        # the analyses of every task's own adapters (a sweep's: its sweep_table)
        "adapters": [layout.analysis(t, name) for t in TASKS for name in own_adapters(t)],
        "quantization": quantization_files()[0],
        "quantization_sweep": quantization_files()[1],
    }


def report_tables():
    init_rank_tables = {t: init_rank_table(t) for t in TASKS if init_rank_table(t)}
    return {"sweeps": {t: sweep_table(t) for t in TASKS if sweep_table(t)},
            "combinations": combination_table(),
            **({"init_rank": init_rank_tables, "rank_selection": init_rank_tables}
               if init_rank_tables else {})}


def report_files():
    """The report's outputs by name: report.md, and each present section's CSV and plot."""
    return {name: f"{layout.report()}/{REPORT_FILES[name][0]}"
            for name in report_outputs(report_sections())}


# A training that stops itself before its job's time limit exits 75 with a checkpoint saved
# (training/deadline.py); its retry resumes from it, so a long training spans several jobs
# (docs/cluster.md). On a cluster only (here a failure would just be repeated), set when the
# run starts (Snakefile's onstart): the executor is not known yet while the rules are read.
TRAINING_RETRIES = 3


def retry_trainings_on_a_cluster():
    if not workflow.local_exec:
        for proxy in (rules.train_qlora, rules.recover):  # --retries may give more
            proxy.rule.restart_times = max(TRAINING_RETRIES, proxy.rule.restart_times or 0)
