import sys

sys.path.insert(0, snakemake.scriptdir + "/..")
from qlora_pipeline import stages
from qlora_pipeline.runtime import run_script

run_script(snakemake, stages.quantize_base_model,
           base_dir=snakemake.input[0], cfg=snakemake.params.quantization,
           out_dir=snakemake.output[0], seed=snakemake.params.seed)
