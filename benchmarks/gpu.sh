#!/usr/bin/env bash
# The GPU benchmark (issue 12, item 5), for a machine with one CUDA GPU and no network.
#
#   bash benchmarks/gpu.sh [--dry-run] [--pipeline] [--out FILE.json]
#
# Part 1 (always): QLoRA training throughput and peak memory of a Llama-3-8B-shaped model
#   (NF4 + double quantization, LoRA r 16 all-linear, sequence 2048, batch 2, gradient
#   checkpointing, paged AdamW 8-bit): full rows, padded and packed batches, next to
#   torchtune's published figure. benchmarks/gpu_train.py does the work; JSON + markdown out.
# Part 2 (--pipeline): the tiny pipeline end to end on CUDA (bf16, paged optimizer, lm-eval
#   batch_size auto, GPU pinning), pass/fail per stage: benchmarks/gpu_pipeline.py.
# --dry-run (or GPU_BENCH_DRY=1): part 1's code at a tiny scale on the CPU, in seconds (CI).
#
# Output: --out, else $OUT/gpu_bench.json when $OUT is set, else
# results/benchmarks/gpu.json; part 2 writes gpu_pipeline.json beside it.
#
# Packages the GPU machine lacks travel in .whl/ (bash benchmarks/gpu_wheels.sh [--pipeline],
# run where PyPI is reachable); this script uses them when they are there. Each part stops at
# its time limit ($GPU_BENCH_PART1_S, default 240 s; $GPU_BENCH_PART2_S, 300 s), so both fit in
# one 10-minute device call; the aim is under 5 minutes in all (not yet timed on a GPU).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PART1_LIMIT_S="${GPU_BENCH_PART1_S:-240}"
PART2_LIMIT_S="${GPU_BENCH_PART2_S:-300}"

dry=0
pipeline=0
out=""
[[ "${GPU_BENCH_DRY:-0}" == 1 ]] && dry=1
while (($#)); do
  case "$1" in
    --dry-run) dry=1 ;;
    --pipeline) pipeline=1 ;;
    --out) out="${2:?gpu.sh: --out needs a path}"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# The project's virtual environment where there is one; the GPU machine's python3 holds torch.
PYTHON="${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"
# Carried packages first (bitsandbytes), then the library and the tests' helpers (a tiny
# model and workdir, for --pipeline) from this tree: the GPU machine has no install of them.
if [[ -d .whl/site ]]; then
  export PYTHONPATH="$REPO/.whl/site:$REPO:$REPO/tests${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$REPO:$REPO/tests${PYTHONPATH:+:$PYTHONPATH}"
fi

preflight() {  # WHAT CUDA(0|1) MODULE...: fail before any work, naming what is missing
  "$PYTHON" - "$@" <<'EOF' || exit 3
import importlib
import sys

what, cuda, names = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
missing = []
for name in names:
    try:
        importlib.import_module(name)
    except Exception as err:  # a broken install fails as surely as a missing one
        first = str(err).splitlines()[0] if str(err) else ""
        missing.append(f"  - {name} ({type(err).__name__}: {first})")
if missing:
    sys.exit(f"gpu.sh: {what} needs Python modules that do not import here:\n"
             + "\n".join(missing) + "\n  Stage them where PyPI is reachable: bash "
             "benchmarks/gpu_wheels.sh (--pipeline for part 2), then carry .whl with the "
             "working tree (device tool: carry [\".whl\"]).")
if cuda:
    import torch
    if not torch.cuda.is_available():
        sys.exit("gpu.sh: torch sees no CUDA device (use --dry-run on a CPU)")
    import bitsandbytes
    from bitsandbytes import cextension
    lib = str(getattr(getattr(cextension.lib, "_lib", None), "_name", ""))
    if "cuda" not in lib:
        tag = (torch.version.cuda or "").replace(".", "")
        sys.exit(f"gpu.sh: bitsandbytes loaded no CUDA library ({lib or 'none'}) for torch's "
                 f"CUDA {torch.version.cuda}; stage it: BNB_KEEP='cuda{tag}*' bash "
                 f"benchmarks/gpu_wheels.sh")
    print(f"gpu.sh: {torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA "
          f"{torch.version.cuda}), bitsandbytes {bitsandbytes.__version__} "
          f"({lib.rsplit('/', 1)[-1]})", flush=True)
EOF
}

install_pipeline_wheels() {  # part 2's carried wheels, installed once per machine
  [[ -d .whl/pipeline ]] || return 0
  local site=/tmp/gpu-bench-site
  if [[ ! -f "$site/.installed" ]]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target "$site" .whl/pipeline/*.whl
    touch "$site/.installed"
  fi
  # Only what the machine lacks is there (gpu_wheels.sh), so none of its own is replaced.
  export PYTHONPATH="$PYTHONPATH:$site"
  export PATH="$site/bin:$PATH"
}

part1_args=()
[[ -n "$out" ]] && part1_args+=(--out "$out")
((dry)) && part1_args+=(--dry-run)
preflight "part 1" "$((1 - dry))" torch transformers peft accelerate bitsandbytes tokenizers \
  numpy yaml
timeout "$PART1_LIMIT_S" "$PYTHON" benchmarks/gpu_train.py "${part1_args[@]}"

if ((pipeline)); then
  if ((dry)); then
    echo "gpu.sh: --pipeline runs on CUDA only; skipped in the dry run" >&2
    exit 0
  fi
  install_pipeline_wheels
  preflight "part 2 (--pipeline)" 1 snakemake lm_eval datasets evaluate jsonschema pytest yaml
  part2_args=()
  [[ -n "$out" ]] && part2_args+=(--out "$(dirname "$out")/gpu_pipeline.json")
  timeout "$PART2_LIMIT_S" "$PYTHON" benchmarks/gpu_pipeline.py "${part2_args[@]}"
fi
