import sys

sys.path.insert(0, snakemake.scriptdir + "/..")
from qlora_pipeline.runtime import run_script
from qlora_pipeline.training import stages

run_script(snakemake, stages.train_qlora,
           quant_dir=snakemake.input.base_4bit, tokenized_dir=snakemake.input.tokenized,
           lora_cfg=snakemake.params.lora, train_cfg=snakemake.params.train,
           seed=snakemake.params.seed, out_dir=snakemake.output[0],
           checkpoint_root=snakemake.params.checkpoints)
