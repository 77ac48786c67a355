from qlora_pipeline.runtime import run_script
from qlora_pipeline.stages.analyze import compress_adapter

run_script(snakemake, compress_adapter)
