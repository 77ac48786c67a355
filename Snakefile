# QLoRA fine-tuning pipeline. Configuration: config/config.yaml (see docs/configuration.md).


configfile: "config/config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/model.smk"
include: "rules/train.smk"
include: "rules/analyze.smk"
include: "rules/combine.smk"
include: "rules/evaluate.smk"
include: "rules/export.smk"
include: "rules/report.smk"


# Jobs run here start as copies of a process that has imported the model libraries once
# (qlora_pipeline/jobs/warm_start.py): seconds a job on a CPU. Not on GPU machines or clusters.
onstart:
    retry_trainings_on_a_cluster()  # rules/common.smk
    if warm_start.wanted(config["warm_start"], local=workflow.local_exec and not workflow.touch):
        warm_start.start(f"{RESULTS}/logs/warm_start.log")


onsuccess:
    warm_start.stop()


onerror:
    warm_start.stop()


# The report reads every output of the run (each section's files), so asking for it asks for
# everything: rules/common.smk's report_sections. Every file of it is asked for, not report.md
# alone: Snakemake reruns a job for its missing outputs only where they are requested (a new
# section's CSV, e.g. a quantization sweep's, must make the report run again).
rule all:
    input:
        list(report_files().values()),
    default_target: True
