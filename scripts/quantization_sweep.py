from qlora_pipeline.runtime import run_script
from qlora_pipeline.stages.report import quantization_sweep

run_script(snakemake, quantization_sweep)
