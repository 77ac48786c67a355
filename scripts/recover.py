from qlora_pipeline.runtime import run_script
from qlora_pipeline.stages.train import recover

run_script(snakemake, recover)
