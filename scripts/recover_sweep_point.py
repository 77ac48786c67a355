from qlora_pipeline.runtime import run_script
from qlora_pipeline.stages.sweep import recover_sweep_point

run_script(snakemake, recover_sweep_point)
