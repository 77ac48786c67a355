from qlora_pipeline.runtime import run_script
from qlora_pipeline.stages.evaluate import eval_task_spec

run_script(snakemake, eval_task_spec)
