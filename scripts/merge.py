import sys

sys.path.insert(0, snakemake.scriptdir + "/..")
from qlora_pipeline.runtime import run_script
from qlora_pipeline.training import stages

run_script(snakemake, stages.merge_adapter,
           base_dir=snakemake.input.base, quant_dir=snakemake.input.base_4bit,
           adapter_dir=snakemake.input.adapter, tokenized_dir=snakemake.input.tokenized,
           merge_cfg=snakemake.params.merge, out_dir=snakemake.output[0],
           recovered=snakemake.params.recovered)
