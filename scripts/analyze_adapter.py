from qlora_pipeline.runtime import run_script
from qlora_pipeline.stages.analyze import analyze_adapter

run_script(snakemake, analyze_adapter)
