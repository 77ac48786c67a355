# QLoRA fine-tuning pipeline. Configuration: config/config.yaml (see docs/configuration.md).


configfile: "config/config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/model.smk"
include: "rules/train.smk"
include: "rules/analyze.smk"
include: "rules/sweep.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


rule all:
    input:
        all_outputs(),
    default_target: True
