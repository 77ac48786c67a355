from qlora_pipeline.runtime import run_script
from qlora_pipeline.stages.train import merge

run_script(snakemake, merge)
