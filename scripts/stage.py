# The script of every rule: the job runs the stage named like its rule (qlora_pipeline/jobs).
from qlora_pipeline.jobs.runner import run_script

run_script(snakemake)  # noqa: F821 (Snakemake's own object)
