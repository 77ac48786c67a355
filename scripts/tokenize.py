from qlora_pipeline.runtime import run_script
from qlora_pipeline.stages.data import tokenize

run_script(snakemake, tokenize)
