from qlora_pipeline.runtime import run_script
from qlora_pipeline.stages.train import train_qlora

run_script(snakemake, train_qlora)
