from qlora_pipeline.runtime import run_script
from qlora_pipeline.stages.data import fetch_dataset

run_script(snakemake, fetch_dataset)
