import sys

sys.path.insert(0, snakemake.scriptdir + "/..")
from qlora_pipeline.evaluation import stages
from qlora_pipeline.runtime import run_script

run_script(snakemake, stages.build_report,
           results_files=list(snakemake.input.results), adapter_dirs=list(snakemake.input.adapters),
           merged_dirs=list(snakemake.input.merged), quantization_md=snakemake.input.quantization,
           outputs=dict(snakemake.output.items()))
