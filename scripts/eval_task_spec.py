import sys

sys.path.insert(0, snakemake.scriptdir + "/..")
from qlora_pipeline.evaluation import stages
from qlora_pipeline.runtime import run_script

run_script(snakemake, stages.eval_task_spec,
           task=snakemake.wildcards.task, raw_dir=snakemake.input.raw,
           tokenizer_dir=snakemake.input.base, fmt=snakemake.params.format,
           max_gen_tokens=snakemake.params.max_gen_tokens, out_dir=snakemake.output[0])
