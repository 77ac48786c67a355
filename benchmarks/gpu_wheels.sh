#!/usr/bin/env bash
# Stage the Python packages that benchmarks/gpu.sh needs and a lent GPU machine lacks, in
# .whl/ (ignored by .gitignore), to travel with the working tree (`carry: [".whl"]`).
# Run here, where PyPI is reachable; the GPU machine reaches nothing.
#
#   bash benchmarks/gpu_wheels.sh              # part 1: bitsandbytes only (~9 MB)
#   bash benchmarks/gpu_wheels.sh --pipeline   # + the tiny pipeline's packages (part 2)
#
# .whl/site: bitsandbytes unpacked (gpu.sh puts it on PYTHONPATH; no pip run on the GPU
# machine). .whl/pipeline: wheels, compressed (unpacked they are ~170 MB, lm-eval's task files
# mostly), that gpu.sh installs there with pip --no-index. Everything is carried at the version
# requirements.txt pins; the GPU machine's own torch, transformers, peft, accelerate, numpy,
# ... are used as they are (carrying torch alone would break the 64 MiB limit).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="${GPU_WHEELS:-$REPO/.whl}"
DEST="$ROOT/site"
LIMIT_MB=56  # the whole working tree travels within 64 MiB; leave room for the repository
# bitsandbytes' wheel holds one library per CUDA/ROCm version (~130 MB unpacked); keep the
# CPU one and those matching CUDA 13 (the GPU image's torch is cu130): the loader picks
# libbitsandbytes_cuda<torch.version.cuda>.so. Override for another image, e.g. 'cuda12*'.
BNB_KEEP="${BNB_KEEP:-cuda13*}"

# Pinned in requirements.txt and absent from the GPU image's package list (KINDS.md of the
# device tool, read 2026-11-17), less the Slurm plugins (no Slurm there) and PuLP (36 MB
# unpacked; Snakemake imports it only for its ILP scheduler, and gpu.sh asks for greedy).
PIPELINE_PACKAGES=(
  annotated-types argparse-dataclass chardet conda-inject ConfigArgParse connection_pool
  DataProperty datasets defusedxml dill docutils dpath evaluate fastjsonschema gguf gitdb
  GitPython greenlet humanfriendly immutables jsonschema jsonschema-specifications
  jupyter_core lm_eval mbstrdecoder more-itertools multiprocess nbformat nltk pathvalidate
  platformdirs pydantic pydantic_core pytablewriter pytz referencing rouge_score rpds-py
  smart_open smmap snakemake snakemake-interface-common snakemake-interface-executor-plugins
  snakemake-interface-logger-plugins snakemake-interface-report-plugins
  snakemake-interface-scheduler-plugins snakemake-interface-storage-plugins SQLAlchemy
  sqlitedict sqlmodel tabledata tcolorpy tenacity throttler traitlets truststore typepy
  typing-inspection word2number yte
)

pin() {  # NAME -> NAME==VERSION as requirements.txt pins it (names compared normalised)
  awk -F'==' -v want="$(echo "$1" | tr 'A-Z_.' 'a-z--')" \
    '{name = tolower($1); gsub(/[_.]/, "-", name)} name == want {print; exit}' \
    "$REPO/requirements.txt"
}

# The GPU machine runs CPython 3.12 on x86-64 (device README).
PLATFORM_ARGS=(--only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

fetch() {  # REQUIREMENT DIR: a wheel for the GPU machine; pure-Python sdists are built here
  python3 -m pip download -q --no-deps "${PLATFORM_ARGS[@]}" -d "$2" "$1" 2>/dev/null \
    || python3 -m pip wheel -q --no-deps -w "$2" "$1"
}

unpack() {  # WHEEL [EXCLUDE...]: a wheel is a zip of its site-packages files
  local wheel="$1"
  shift
  python3 - "$wheel" "$DEST" "$@" <<'EOF'
import fnmatch, sys, zipfile
wheel, dest, *exclude = sys.argv[1:]
with zipfile.ZipFile(wheel) as archive:
    for name in archive.namelist():
        if not any(fnmatch.fnmatch(name, pattern) for pattern in exclude):
            archive.extract(name, dest)
EOF
}

main() {
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  rm -rf "$DEST" "$ROOT/pipeline"
  mkdir -p "$DEST"
  local bnb
  bnb="$(pin bitsandbytes)"
  fetch "$bnb" "$tmp/bnb"
  unpack "$tmp"/bnb/*.whl 'bitsandbytes/libbitsandbytes_cuda*' 'bitsandbytes/libbitsandbytes_rocm*' \
    'bitsandbytes/libbitsandbytes_xpu*'
  python3 - "$tmp"/bnb/*.whl "$DEST" "$BNB_KEEP" <<'EOF'
import fnmatch, sys, zipfile
wheel, dest, keep = sys.argv[1:]
with zipfile.ZipFile(wheel) as archive:
    for name in archive.namelist():
        if fnmatch.fnmatch(name, f"bitsandbytes/libbitsandbytes_{keep}.so"):
            archive.extract(name, dest)
EOF
  if [[ "${1:-}" == "--pipeline" ]]; then
    local name req
    for name in "${PIPELINE_PACKAGES[@]}"; do
      req="$(pin "$name")"
      [[ -n "$req" ]] || { echo "gpu_wheels: $name is not pinned in requirements.txt" >&2; exit 1; }
      fetch "$req" "$ROOT/pipeline"
    done
  fi
  local size
  size="$(du -sm "$ROOT" | cut -f1)"
  echo "gpu_wheels: $ROOT ready: $size MB (the working tree and it travel within 64 MiB)"
  if (( size > LIMIT_MB )); then
    echo "gpu_wheels: over ${LIMIT_MB} MB: it will not travel" >&2
    exit 1
  fi
}

main "$@"
