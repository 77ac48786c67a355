from qlora_pipeline.runtime import run_script
from qlora_pipeline.stages.combine import combine_adapters

run_script(snakemake, combine_adapters)
