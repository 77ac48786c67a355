from qlora_pipeline.runtime import run_script
from qlora_pipeline.stages.sweep import train_sweep_point

run_script(snakemake, train_sweep_point)
