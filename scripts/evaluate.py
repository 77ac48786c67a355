import sys

sys.path.insert(0, snakemake.scriptdir + "/..")
from qlora_pipeline.evaluation import stages
from qlora_pipeline.runtime import run_script

paths = {key: snakemake.input.get(key) for key in ("base", "base_4bit", "adapter", "merged")}
run_script(snakemake, stages.evaluate_variant,
           variant=snakemake.wildcards.variant, task=snakemake.wildcards.task, paths=paths,
           spec_dir=snakemake.input.spec, cfg=snakemake.params.evaluation,
           seed=snakemake.params.seed, out_file=snakemake.output.results)
