"""What the benchmarks share: worker processes with a set thread count, the task settings of
the pipeline's config, and (for --smoke) tiny models and data built with the pipeline's stages.

Light to import: torch, transformers and the stages load only inside the functions that use
them, so that the driver starts fast and each worker pays only for what it measures.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from qlora_pipeline.jobs import environment

REPO = Path(__file__).resolve().parent.parent


def default_threads() -> int:
    """The thread count a model job gets on this machine's first two cores (the demo's)."""
    return min(2, os.cpu_count() or 1)


def worker_env(threads: int) -> dict:
    """The environment a pipeline job runs in (jobs/environment.job_environment), for every worker."""
    return {**environment.ALLOCATOR_VARIABLES, **os.environ,
            **{name: str(threads) for name in environment.THREAD_VARIABLES}}


def run_worker(module: str, args: list[str], threads: int) -> dict:
    """Run `python -m benchmarks.<module> ARGS --threads N --out FILE` in its own process (clean
    thread settings and memory) and return the JSON it wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", f"benchmarks.{module}", *args,
               "--threads", str(threads), "--out", str(out)]
        proc = subprocess.run(cmd, check=False, cwd=REPO, env=worker_env(threads),
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                               f"{proc.stderr[-4000:]}")
        result = json.loads(out.read_text(encoding="utf-8"))
    if result.get("threads") != threads:
        raise RuntimeError(f"{module}: worker ran with {result.get('threads')} threads, "
                           f"expected {threads}")
    return result


SPEED_PROBE = """
import time, torch
torch.set_num_threads(1)
a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
a @ b
start, n = time.perf_counter(), 0
while time.perf_counter() - start < {seconds}:
    a @ b
    n += 1
print(2 * 1024 ** 3 * n / (time.perf_counter() - start) / 1e9)
"""


def machine_speed(seconds: float = 2.0) -> dict:
    """GFLOPS of a float32 1024² matmul on one core, alone and as two processes at once: how
    fast this machine was when a time was taken. A shared host's speed drifts by tens of
    percent between runs, and two one-core jobs side by side may each get less than one core
    alone (cores that are hyperthreads of one physical core)."""
    def probes(count: int) -> list[float]:
        cmd = [sys.executable, "-c", SPEED_PROBE.format(seconds=seconds)]
        running = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=worker_env(1))
                   for _ in range(count)]
        return [float(p.communicate()[0]) for p in running]

    alone = probes(1)[0]
    together = probes(min(2, os.cpu_count() or 1))
    return {"alone_gflops": round(alone, 1),
            "side_by_side_gflops": [round(g, 1) for g in together],
            "side_by_side_share": round(statistics.mean(together) / alone, 2)}


def alternating(items: tuple, repeat: int) -> tuple:
    """Run order of one repeat: forward, then backward, so a drift of the machine's speed
    touches every item alike."""
    return items if repeat % 2 == 0 else items[::-1]


def worker_groups(items: tuple, repeat: int, together: bool) -> list[tuple]:
    """The worker processes of one repeat, each with the items it measures: one process per
    item (a full run), or all in one process (--smoke: a worker's start-up is most of it)."""
    ordered = alternating(items, repeat)
    return [ordered] if together else [(item,) for item in ordered]


# Generation benchmarks (inference, serving): a full run and the smoke version.
GENERATION_FULL = {"repeats": 2, "new_tokens": 32, "passes": 2, "one_process": False}
GENERATION_SMOKE = {"repeats": 1, "new_tokens": 4, "passes": 1, "one_process": True}


def generation_setup(smoke: bool, threads: list[int] | None, tiny_models,
                     pipeline_models) -> tuple[dict, dict, int]:
    """(plan, model paths, threads) of a generation benchmark: the tiny models on one thread
    for --smoke, else the pipeline's at the largest thread count asked (or the default)."""
    if smoke:
        return GENERATION_SMOKE, tiny_models(), 1
    return GENERATION_FULL, pipeline_models(), max(threads or [default_threads()])


def generation_runs(module: str, items: tuple, plan: dict, args: list[str], threads: int):
    """(repeat, group, result) of every worker run of a generation benchmark: `plan`'s
    repeats, the items alternating (worker_groups), each worker given `args` and the plan's
    new tokens and passes."""
    for repeat in range(plan["repeats"]):
        for group in worker_groups(items, repeat, plan["one_process"]):
            yield repeat, group, run_worker(module, [
                *group, *args, "--new-tokens", str(plan["new_tokens"]),
                "--passes", str(plan["passes"])], threads)


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_settings(path: Path, settings: dict) -> Path:
    path.write_text(json.dumps(settings, indent=2), encoding="utf-8")
    return path


@functools.cache
def task_settings(task: str) -> dict:
    """A task's effective settings (defaults filled in) from the repository's config."""
    from qlora_pipeline.config import load_config
    from qlora_pipeline.config.schema import load_yaml

    _, tasks = load_config(load_yaml(REPO / "config" / "config.yaml"), root=REPO)
    return tasks[task]


def bench_train_cfg(train: dict, steps: int) -> dict:
    """A training block run for `steps`, with evaluation and saving only after the last step
    (outside every measured step)."""
    return {**train, "max_steps": steps, "epochs": None, "eval_steps": steps,
            "checkpoint_steps": None, "early_stopping_patience": None}


# ---- tiny inputs for --smoke -----------------------------------------------------------------

def run_stage(rule: str, *, policy=None, **kwargs):
    """A stage called by its rule's names outside Snakemake (tests, benchmarks), as its job
    runs it: outputs complete or absent, with provenance. Returns what the stage returns."""
    from qlora_pipeline.jobs.runner import Job

    job = Job.from_call(rule, kwargs, threads=policy.threads if policy else 1,
                        wants_gpu=policy is None or policy.cuda)
    return job.run() if policy is None else job.execute(policy)


@functools.cache
def scratch() -> Path:
    """One temporary folder per driver process for the tiny inputs, removed at exit."""
    path = Path(tempfile.mkdtemp(prefix="qlora-bench-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def tiny_base() -> Path:
    """The tests' 2-layer random Llama with its tokenizer (qlora_pipeline.tiny_models)."""
    from benchmarks.tiny_models import build_tokenizer, save_model

    return save_model(scratch() / "base", build_tokenizer())


@functools.cache
def tiny_quantized() -> Path:
    """The tiny base quantized by the pipeline's own quantize stage (NF4, double quant)."""
    from qlora_pipeline.core.policy import Policy

    path = scratch() / "quantized"
    run_stage("quantize", base=tiny_base(), quantized=path, seed=0, policy=Policy.detect(),
              quantization={"method": "nf4", "double_quant": True, "compute_dtype": "auto",
                            "skip_modules": ["lm_head"]})
    return path


def dataset_cfg(name: str, num_examples: int, seed: int, **extra) -> dict:
    return {"source": "builtin", "name": name, "num_examples": num_examples, "seed": seed,
            "validation_fraction": 0.1, "test_fraction": 0.1, "columns": {}, **extra}


def tokenized(root: Path, base: Path, dataset: dict, tokenize: dict) -> Path:
    """A builtin dataset fetched and tokenized (chat format) by the pipeline's data stages:
    root/raw once, root/tokenized-<packing|padded> per tokenize block."""
    import datasets

    from qlora_pipeline.core.policy import Policy

    datasets.disable_progress_bars()  # the driver's output is the benchmarks' progress
    policy = Policy.detect()
    raw = root / "raw"
    if not raw.exists():
        run_stage("fetch_dataset", raw=raw, dataset=dataset, format="chat", policy=policy)
    out = root / f"tokenized-{'packed' if tokenize['packing'] else 'padded'}"
    run_stage("tokenize", raw=raw, base=base, tokenized=out, format="chat", tokenize=tokenize,
              policy=policy)
    return out


@functools.cache
def tiny_arithmetic() -> Path:
    """The arithmetic task, tokenized with the tiny base's tokenizer."""
    return tokenized(scratch() / "arithmetic", tiny_base(),
                     dataset_cfg("arithmetic", 80, 1, options={"max_operand": 20}),
                     {"max_length": 128, "train_on_prompt": False, "packing": False})
