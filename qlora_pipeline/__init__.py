"""QLoRA fine-tuning pipeline: the library that the Snakemake scripts call."""

__version__ = "0.1.0"
