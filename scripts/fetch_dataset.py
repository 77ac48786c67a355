import sys

sys.path.insert(0, snakemake.scriptdir + "/..")
from qlora_pipeline import stages
from qlora_pipeline.runtime import run_script

run_script(snakemake, stages.fetch_dataset,
           dataset=snakemake.params.dataset, fmt=snakemake.params.format,
           out_dir=snakemake.output[0],
           inputs={f"file{i}": path for i, path in enumerate(snakemake.input)})
