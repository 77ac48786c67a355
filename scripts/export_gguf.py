from qlora_pipeline.runtime import run_script
from qlora_pipeline.stages.export import export_gguf

run_script(snakemake, export_gguf)
