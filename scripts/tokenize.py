import sys

sys.path.insert(0, snakemake.scriptdir + "/..")
from qlora_pipeline import stages
from qlora_pipeline.runtime import run_script

run_script(snakemake, stages.tokenize_dataset,
           raw_dir=snakemake.input.raw, tokenizer_dir=snakemake.input.base,
           fmt=snakemake.params.format, cfg=snakemake.params.tokenize,
           out_dir=snakemake.output[0])
