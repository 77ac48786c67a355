from qlora_pipeline.runtime import run_script
from qlora_pipeline.stages.sweep import promote_sweep_point

run_script(snakemake, promote_sweep_point)
