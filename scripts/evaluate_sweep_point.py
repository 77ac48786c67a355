from qlora_pipeline.runtime import run_script
from qlora_pipeline.stages.sweep import evaluate_sweep_point

run_script(snakemake, evaluate_sweep_point)
