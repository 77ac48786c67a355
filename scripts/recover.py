import sys

sys.path.insert(0, snakemake.scriptdir + "/..")
from qlora_pipeline.runtime import run_script
from qlora_pipeline.training import stages

run_script(snakemake, stages.recover,
           base_dir=snakemake.input.base, adapter_dir=snakemake.input.adapter,
           tokenized_dir=snakemake.input.tokenized, recovery_cfg=snakemake.params.recovery,
           train_cfg=snakemake.params.train, seed=snakemake.params.seed,
           out_dir=snakemake.output[0], checkpoint_root=snakemake.params.checkpoints)
