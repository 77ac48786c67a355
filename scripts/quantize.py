from qlora_pipeline.runtime import run_script
from qlora_pipeline.stages.model import quantize

run_script(snakemake, quantize)
