#!/usr/bin/env bash
# Run by Snakemake once, in the new env (--use-conda): install this repository's library,
# editable, so that jobs run the code in the repository (what the rules' code digests
# describe). QLORA_PIPELINE_ROOT is set by rules/common.smk to the workflow's folder.
set -euo pipefail
python -m pip install --no-deps --editable "${QLORA_PIPELINE_ROOT:?run through Snakemake}"
# llama.cpp (converter, runtime, quantizer) for rule export_gguf: built once per CPU, cached.
PYTHON=python bash "${QLORA_PIPELINE_ROOT}/envs/install-llama-cpp.sh"
