from qlora_pipeline.runtime import run_script
from qlora_pipeline.stages.model import import_base_model

run_script(snakemake, import_base_model)
