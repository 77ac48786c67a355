from qlora_pipeline.runtime import run_script
from qlora_pipeline.stages.report import report

run_script(snakemake, report)
