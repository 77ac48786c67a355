"""`make bench`: benchmarks measured side by side, written to results/benchmarks/.

train_step: the pipeline's training step against a bare Trainer + PEFT script (same 4-bit
model, data, batch, LoRA and thread count); goal: pipeline ≤ 1.03 × bare seconds per step.
Each measurement runs in its own process (clean thread settings and memory); the two
implementations alternate, so a drift of the machine's speed touches both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from qlora_pipeline import machine, runtime  # installed by make setup
from qlora_pipeline.outputs import atomic_file, write_json

REPO = Path(__file__).resolve().parent.parent

GOAL = 1.03
IMPLS = ("pipeline", "bare")


def prepare_inputs(task: str) -> None:
    """The saved 4-bit base and the task's tokenized data, made (or found up to date) by the
    pipeline itself."""
    targets = ["results/models/quantized", f"results/data/{task}/tokenized"]
    subprocess.run([sys.executable, "-m", "snakemake", "--cores", "all", "--resources", "gpu=1",
                    "--quiet", "rules", "--", *targets], cwd=REPO, check=True)


def measure(impl: str, threads: int, steps: int, task: str) -> list[float]:
    # The environment a pipeline job runs in (runtime.job_environment), for both alike.
    env = {**runtime.ALLOCATOR_VARIABLES, **os.environ,
           **{name: str(threads) for name in runtime.THREAD_VARIABLES}}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_step.py"), impl,
                        "--threads", str(threads), "--steps", str(steps), "--task", task,
                        "--out", str(out)], cwd=REPO, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result = json.loads(out.read_text())
    assert result["threads"] == threads, result
    return result["seconds_per_step"]


def train_step(thread_counts: list[int], repeats: int, steps: int, task: str) -> list[dict]:
    rows = []
    for threads in thread_counts:
        samples = {impl: [] for impl in IMPLS}
        for rep in range(repeats):
            for impl in (IMPLS if rep % 2 == 0 else IMPLS[::-1]):
                samples[impl] += measure(impl, threads, steps, task)
                print(f"train_step: {impl}, {threads} thread(s), run {rep + 1}/{repeats}: "
                      f"median {statistics.median(samples[impl]):.3f} s/step", flush=True)
        median = {impl: statistics.median(samples[impl]) for impl in IMPLS}
        rows.append({"threads": threads, "steps_measured": {i: len(samples[i]) for i in IMPLS},
                     "median_seconds_per_step": median,
                     "ratio_pipeline_to_bare": median["pipeline"] / median["bare"],
                     "samples": samples})
    return rows


def markdown(rows: list[dict], facts: dict, task: str) -> str:
    cpu = facts["cpu"]
    lines = [f"# train_step: pipeline vs bare Trainer + PEFT ({task}, SmolLM2-135M 4-bit)", "",
             f"Machine: {cpu['model']}, {cpu['cores']} cores, flags "
             f"{', '.join(cpu['numeric_flags']) or 'none'}. Goal: ratio ≤ {GOAL}.", "",
             "| threads | pipeline s/step | bare s/step | ratio | goal |",
             "|---|---|---|---|---|"]
    for row in rows:
        med, ratio = row["median_seconds_per_step"], row["ratio_pipeline_to_bare"]
        lines.append(f"| {row['threads']} | {med['pipeline']:.3f} | {med['bare']:.3f} | "
                     f"{ratio:.3f} | {'met' if ratio <= GOAL else 'MISSED'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+",
                        default=sorted({1, min(2, os.cpu_count() or 1)}))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--task", default="arithmetic")
    args = parser.parse_args(argv)

    prepare_inputs(args.task)
    rows = train_step(args.threads, args.repeats, args.steps, args.task)
    facts = machine.facts()
    out = REPO / "results" / "benchmarks"
    write_json(out / "train_step.json", {"goal": GOAL, "task": args.task, "machine": facts,
                                         "rows": rows})
    text = markdown(rows, facts, args.task)
    with atomic_file(out / "train_step.md") as handle:
        handle.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
