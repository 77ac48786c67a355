import sys
from pathlib import Path

sys.path.insert(0, snakemake.scriptdir + "/..")
from qlora_pipeline import stages
from qlora_pipeline.runtime import run_script

run_script(snakemake, stages.quantization_report,
           base_dir=snakemake.input.base, quant_dir=snakemake.input.quantized,
           tokenized={Path(p).parent.name: p for p in snakemake.input.tokenized},
           max_examples=snakemake.params.report["max_examples"],
           out_dir=Path(snakemake.output.json).parent)
