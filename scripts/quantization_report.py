from qlora_pipeline.runtime import run_script
from qlora_pipeline.stages.model import quantization_report

run_script(snakemake, quantization_report)
