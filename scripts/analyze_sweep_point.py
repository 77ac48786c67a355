from qlora_pipeline.runtime import run_script
from qlora_pipeline.stages.sweep import analyze_sweep_point

run_script(snakemake, analyze_sweep_point)
