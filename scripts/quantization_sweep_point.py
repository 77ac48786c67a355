from qlora_pipeline.runtime import run_script
from qlora_pipeline.stages.model import quantization_sweep_point

run_script(snakemake, quantization_sweep_point)
