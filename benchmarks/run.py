"""`make bench`: every benchmark, measured side by side, with the machine written next to it.

    python -m benchmarks.run                       # all, after making their inputs
    python -m benchmarks.run --only packing inference
    python -m benchmarks.run --smoke --results DIR # tiny models, seconds each (CI)
    python -m benchmarks.run --only faults         # 3 fault trials (benchmarks/faults.py)

Run as a module from the repository root: benchmarks are imported as benchmarks.<name> (a
script's own folder first on the import path would let benchmarks/packing.py shadow any module
of its name).

Each benchmark is a module benchmarks/<name>.py with `run(smoke: bool) -> dict` giving
{name, figure (the headline number), goal (text), met (bool, or None without a goal),
details}, optionally `figure_text` (the figure in words) or `figure_label` (what the number
is). The module may also have `INPUTS` (pipeline outputs it reads, made through Snakemake
before a full run), `markdown(result) -> str`, and a `threads` parameter of `run`
(--threads). Results: <results>/<name>.{json,md} as each finishes, then summary.{json,md}:
one row per benchmark (those of this run, and of an earlier one in the same folder for the
benchmarks not run now, each with its date and commit), and the machine's facts.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from qlora_pipeline.core import machine
from qlora_pipeline.core.files import atomic_file, write_json
from qlora_pipeline.jobs.provenance import git_commit

# In run order. A new benchmark is one module and one name here.
BENCHMARKS = ("train_step", "packing", "inference", "serving", "bits_per_param",
              "noop_dryrun", "merge_memory", "adapter_analysis", "memory_model",
              "default_run")
# Run only when named (--only): minutes per trial, and mounts a tmpfs (root) for its disk faults.
ON_REQUEST = ("faults",)
KEYS = ("name", "figure", "goal", "met", "details")


def load(name: str):
    return importlib.import_module(f"benchmarks.{name}")


def prepare_inputs(modules: list) -> None:
    """The pipeline outputs the benchmarks read, made (or found up to date) by the pipeline."""
    targets = sorted({target for module in modules for target in getattr(module, "INPUTS", ())})
    if targets:
        subprocess.run([sys.executable, "-m", "snakemake", "--cores", "all", "--resources",
                        "gpu=1", "--quiet", "rules", "--", *targets], cwd=REPO, check=True)


def run_one(module, smoke: bool, threads: list[int] | None) -> dict:
    wanted = {"threads": threads} if threads else {}
    accepted = inspect.signature(module.run).parameters
    started = time.perf_counter()
    result = module.run(smoke=smoke, **{k: v for k, v in wanted.items() if k in accepted})
    check(result, module.__name__.rsplit(".", 1)[-1])
    return {**result, "seconds": round(time.perf_counter() - started, 1),
            "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": git_commit(REPO)}


def check(result: dict, name: str) -> None:
    """A benchmark's result has the shared shape (the summary and the tests rely on it)."""
    missing = [key for key in KEYS if key not in result]
    figure = result.get("figure")
    if missing or result["name"] != name:
        raise ValueError(f"benchmark {name}: result lacks {missing} or names "
                         f"{result.get('name')!r}; expected keys {KEYS}")
    if isinstance(figure, bool) or not isinstance(figure, (int, float)) or not math.isfinite(figure):
        raise ValueError(f"benchmark {name}: figure {figure!r}; expected a finite number")
    if result["met"] not in (True, False, None):
        raise ValueError(f"benchmark {name}: met {result['met']!r}; expected true, false or null")


def machine_line(facts: dict) -> str:
    cpu, torch = facts["cpu"], facts.get("torch", {})
    gpu = torch.get("cuda", {}).get("device", "none")
    return (f"{cpu['model']}, {cpu['cores']} cores, flags "
            f"{', '.join(cpu['numeric_flags']) or 'none'}; torch's default threads "
            f"{torch.get('threads', '?')} (each benchmark states its own), kernels {torch.get('cpu_capability', '?')}; GPU {gpu}")


def generic_markdown(result: dict) -> str:
    return (f"# {result['name']}\n\nFigure: {figure_cell(result)}. Goal: {result['goal']}. "
            f"Met: {met_cell(result['met'])}.\n\nDetails: {result['out_json']}\n")


def figure_cell(result: dict) -> str:
    """The figure in words where the benchmark gives them; else the number, and its label."""
    label = f" ({result['figure_label']})" if result.get("figure_label") else ""
    return result.get("figure_text") or f"{result['figure']:.4g}{label}"


def met_cell(met) -> str:
    return {True: "yes", False: "**no**", None: "n/a"}[met]


def write_one(result: dict, facts: dict, out: Path, module) -> None:
    result["out_json"] = f"{result['name']}.json"
    write_json(out / result["out_json"], {**result, "machine": facts})
    text = module.markdown(result) if hasattr(module, "markdown") else generic_markdown(result)
    with atomic_file(out / f"{result['name']}.md") as handle:
        handle.write(text + f"\nMachine: {machine_line(facts)}.\n")


def gathered(results: list[dict], out: Path) -> list[dict]:
    """This run's results, then those an earlier run left in `out` for the other benchmarks
    (`--only` measures a few at a time): each row says when and at which commit it was made."""
    ran = {r["name"] for r in results}
    earlier = [json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
               for name in BENCHMARKS + ON_REQUEST
               if name not in ran and (out / f"{name}.json").exists()]
    by_name = {r["name"]: r for r in [*results, *earlier]}
    return [by_name[name] for name in BENCHMARKS + ON_REQUEST if name in by_name]


def write_summary(results: list[dict], facts: dict, out: Path, smoke: bool) -> str:
    write_json(out / "summary.json", {"smoke": smoke, "machine": facts, "benchmarks": results})
    lines = [f"# Benchmarks{' (smoke: tiny models, not measurements)' if smoke else ''}", "",
             f"Machine: {machine_line(facts)}.", "",
             "| benchmark | figure | goal | met | measured (commit) |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {figure_cell(r)} | {r['goal']} | {met_cell(r['met'])} | "
              f"{r.get('measured', '?')} ({(r.get('commit') or '?')[:7]}) |" for r in results]
    text = "\n".join(lines) + "\n"
    with atomic_file(out / "summary.md") as handle:
        handle.write(text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS + ON_REQUEST, metavar="NAME",
                        help=f"run these only ({', '.join(BENCHMARKS + ON_REQUEST)}; "
                             f"{', '.join(ON_REQUEST)} only when named)")
    parser.add_argument("--smoke", action="store_true",
                        help="each benchmark's tiny version: checks that it runs, measures "
                             "nothing; needs no pipeline output")
    parser.add_argument("--results", type=Path,
                        help="output folder (default results/benchmarks, with --smoke "
                             "results/benchmarks/smoke)")
    parser.add_argument("--threads", type=int, nargs="+",
                        help="thread counts (train_step: each; the others: the largest)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs a hub
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    out = args.results or REPO / "results" / "benchmarks" / ("smoke" if args.smoke else "")

    import torch  # noqa: F401  (machine.facts reports torch's threads and GPU once loaded)

    modules = [load(name) for name in BENCHMARKS + ON_REQUEST
               if name in (args.only or BENCHMARKS)]
    if not args.smoke:
        prepare_inputs(modules)
    results = []
    for module in modules:
        result = run_one(module, args.smoke, args.threads)
        write_one(result, machine.facts(), out, module)
        results.append(result)
        print(f"{result['name']}: {figure_cell(result)} ({result['seconds']} s)", flush=True)
    print(write_summary(results if args.smoke else gathered(results, out), machine.facts(),
                        out, args.smoke))
    return 0


if __name__ == "__main__":
    sys.exit(main())
