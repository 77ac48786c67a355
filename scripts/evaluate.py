from qlora_pipeline.runtime import run_script
from qlora_pipeline.stages.evaluate import evaluate

run_script(snakemake, evaluate)
