"""Part 2 of benchmarks/gpu.sh: the tiny pipeline end to end on CUDA, pass/fail per stage.

    python benchmarks/gpu_pipeline.py [--out FILE.json]

The tests' tiny model and two-task workdir (tests/conftest.py), run by Snakemake as a user
would (`--cores all --resources gpu=1`), so that the CUDA-only paths run once: bf16 loads
and training, the paged AdamW 8-bit optimizer, lm-eval's `batch_size: auto` search, and GPU
pinning (gpus.py: each model job claims a GPU lock and sets CUDA_VISIBLE_DEVICES). After the
run, the records show whether each path was the one taken: every model stage's provenance
names the CUDA device, training records the paged optimizer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.gpu_train import output_path

REPO = Path(__file__).resolve().parent.parent

STARTED = re.compile(r"^(?:local)?rule (\w+):", re.MULTILINE)
FINISHED = re.compile(r"Finished jobid: \d+ \(Rule: (\w+)\)")
FAILED = re.compile(r"Error in rule (\w+)")
# Stages that load a model (the others are data and report jobs, on the CPU by design).
MODEL_STAGES = ("quantize", "train_qlora", "recover", "merge", "evaluate", "quantization_report")


def workdir(root: Path) -> Path:
    """The tests' tiny Llama and two tasks; lm-eval's batch size left to its search."""
    import conftest

    model_dir = conftest.save_model(root / "tiny-model", conftest.build_tokenizer())
    work = conftest.make_workdir(root / "run", model_dir)
    config = conftest.tiny_config(model_dir)
    config["evaluation"]["batch_size"] = "auto"
    conftest.write_yaml(work / "config" / "config.yaml", config)
    return work


def snakemake(work: Path) -> tuple[int, str, float]:
    """(exit status, log, seconds). Greedy scheduling: the ILP one needs PuLP, not carried.
    --keep-going, so one failing stage does not hide how the others fare."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(work), "--configfile", str(work / "config" / "config.yaml"),
           "--cores", "all", "--resources", "gpu=1", "--workflow-profile", "none",
           "--scheduler", "greedy", "--keep-going"]
    env = {**os.environ, "QLORA_GPU_LOCK_DIR": str(work / "gpu-locks")}
    env.pop("CUDA_VISIBLE_DEVICES", None)  # set, it would switch pinning off (gpus.py)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True,
                            check=False)  # a failure is reported per stage
    return result.returncode, result.stdout + result.stderr, time.perf_counter() - start


def stages(log: str) -> dict[str, str]:
    """Each rule's outcome: pass (all its jobs finished), FAIL, or not finished."""
    started, finished = STARTED.findall(log), FINISHED.findall(log)
    failed = set(FAILED.findall(log))
    out = {}
    for rule in dict.fromkeys(started):
        if rule in failed:
            out[rule] = "FAIL"
        elif finished.count(rule) == started.count(rule):
            out[rule] = "pass"
        else:
            out[rule] = "not finished"
    return out


def cuda_checks(work: Path) -> dict[str, str]:
    """What the records say about the CUDA paths: model stages on the GPU, the paged
    optimizer in training, and a GPU lock taken (pinning)."""
    checks = {}
    for path in sorted((work / "results").rglob("provenance.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("stage") in MODEL_STAGES:
            name = f"{record['stage']} on CUDA ({path.parent.relative_to(work / 'results')})"
            checks[name] = "pass" if str(record.get("device", "")).startswith("cuda") else (
                f"FAIL: device {record.get('device')}")
    for path in sorted((work / "results").rglob("summary.json")):
        optimizer = json.loads(path.read_text(encoding="utf-8")).get("optimizer")
        if optimizer:
            name = f"paged optimizer ({path.parent.relative_to(work / 'results')})"
            checks[name] = "pass" if "paged" in str(optimizer) else f"FAIL: {optimizer}"
    locks = list((work / "gpu-locks").glob("gpu-*.lock"))
    checks["GPU pinning (a gpu-<i>.lock taken)"] = "pass" if locks else "FAIL: no lock file"
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON path (default: $OUT/gpu_pipeline.json or "
                                      "results/benchmarks/gpu_pipeline.json)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = workdir(Path(tmp))
        status, log, seconds = snakemake(work)
        result = {"snakemake_exit": status, "seconds": seconds, "stages": stages(log),
                  "checks": cuda_checks(work), "log_tail": log[-6000:]}
    path = output_path(args.out, "gpu_pipeline.json", "gpu_pipeline.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for name, outcome in [*result["stages"].items(), *result["checks"].items()]:
        print(f"{'pass' if outcome == 'pass' else 'FAIL'}  {name}"
              + ("" if outcome == "pass" else f": {outcome}"))
    ok = status == 0 and all(v == "pass" for v in [*result["stages"].values(),
                                                   *result["checks"].values()])
    if not ok:
        print(log[-3000:])
    print(f"gpu_pipeline: {'pass' if ok else 'FAIL'} in {seconds:.0f} s; written: {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
