import sys

sys.path.insert(0, snakemake.scriptdir + "/..")
from qlora_pipeline import stages
from qlora_pipeline.runtime import run_script

run_script(snakemake, stages.import_base_model,
           cfg=snakemake.params.base_model, out_dir=snakemake.output[0])
