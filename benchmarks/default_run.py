"""default_run: the default pipeline (`make demo`'s DAG) from nothing, timed, and every job's
time split into start-up and work; goal: under 6 minutes of pipeline time on 2 cores.

The run is `make demo`'s command (`snakemake --cores all --resources gpu=N`, N from
gpus.model_slots: the GPUs, or two model jobs side by side on a CPU-only machine) on the
repository's config, in a fresh working directory, so nothing is cached. Each job's wall time comes from
Snakemake's own benchmark file (results/benchmarks/<rule>[/<wildcards>].tsv: the script's
process, start to exit); its work from two lines its job (jobs/runner.py) logs into the job's log,
just before the stage is called ("rule R: <stage> (threads: ...)") and when it returns
("rule R: done"). Start-up = wall − work: the interpreter, Snakemake's preamble, imports,
the policy. --smoke: the data jobs of one task on a tiny base, to keep the parsing honest.
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

from benchmarks import support
from qlora_pipeline.core import layout
from qlora_pipeline.jobs.gpus import model_slots

GOAL_MINUTES = 6.0
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO qlora_pipeline: "
                      r"rule (\w+): (done|\w+ \(threads)")
SMOKE_TARGETS = [layout.tokenized("arithmetic"), layout.eval_spec("arithmetic")]


def run(smoke: bool) -> dict:
    speed = {"before": support.machine_speed(0.3 if smoke else 2.0)}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = make_workdir(Path(tmp), smoke)
        seconds = pipeline(workdir, SMOKE_TARGETS if smoke else [])
        jobs = split_of_run(workdir / "results")
    speed["after"] = support.machine_speed(0.3 if smoke else 2.0)
    by_rule = per_rule(jobs)
    minutes = seconds / 60
    return {"name": "default_run", "figure": round(minutes, 2), "model_slots": model_slots(),
            "figure_label": "minutes, the default run from nothing" if not smoke
            else "minutes, the data jobs of one tiny task",
            "goal": f"< {GOAL_MINUTES:g} minutes of pipeline time on 2 cores",
            "met": None if smoke else minutes < GOAL_MINUTES,
            "details": {"seconds": seconds, "jobs": jobs, "by_rule": by_rule,
                        "machine_speed": speed,
                        "startup_seconds": sum(j["startup"] for j in jobs.values()),
                        "work_seconds": sum(j["work"] for j in jobs.values())}}


def make_workdir(root: Path, smoke: bool) -> Path:
    shutil.copytree(support.REPO / "config", root / "config")
    if smoke:
        path = root / "config" / "config.yaml"
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        config["base_model"] = {"source": "local", "path": str(support.tiny_base())}
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return root


def pipeline(workdir: Path, targets: list[str]) -> float:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(support.REPO / "Snakefile"),
           "--cores", "all", "--resources", f"gpu={model_slots()}", "--quiet", "rules", "--",
           *targets]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return seconds


def split_of_run(results: Path) -> dict[str, dict]:
    """Wall, start-up and work seconds of every job of a finished run."""
    jobs = {}
    for bench in sorted((results / "benchmarks").rglob("*.tsv")):
        job = bench.relative_to(results / "benchmarks").with_suffix("")
        log = (results / "logs" / job).with_suffix(".log")
        wall = float(bench.read_text().splitlines()[-1].split("\t")[0])
        work = work_seconds(log)
        jobs[str(job)] = {"rule": job.parts[0], "wall": wall, "work": round(work, 2),
                          "startup": round(wall - work, 2)}
    return jobs


def work_seconds(log: Path) -> float:
    """From the stage's call to its return, as the job's log (the last run in it) says."""
    called = done = None
    for line in log.read_text(errors="replace").splitlines():
        match = LOG_LINE.match(line)
        if match:
            when = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            called, done = (called, when) if match.group(3) == "done" else (when, None)
    if called is None or done is None:
        raise RuntimeError(f"{log}: no 'rule ...: <stage>' and 'rule ...: done' lines; "
                           f"expected the log of a finished job (jobs/runner.py)")
    return done - called


def per_rule(jobs: dict[str, dict]) -> dict[str, dict]:
    rules: dict[str, list[dict]] = {}
    for job in jobs.values():
        rules.setdefault(job["rule"], []).append(job)
    return {rule: {"jobs": len(rows), "wall": sum(r["wall"] for r in rows),
                   "median_startup": statistics.median(r["startup"] for r in rows),
                   "median_work": statistics.median(r["work"] for r in rows)}
            for rule, rows in rules.items()}


def speed_line(speed: dict) -> str:
    """How fast the machine was (its speed drifts between runs): compare runs by this too."""
    parts = [f"{when}: {s['alone_gflops']:.0f} GFLOPS on one core alone, "
             f"{100 * s['side_by_side_share']:.0f} % of that each with two side by side"
             for when, s in speed.items()]
    return "Machine speed (float32 matmul) " + "; ".join(parts) + "."


def markdown(result: dict) -> str:
    d = result["details"]
    lines = [f"# default_run: {result['figure']:.2f} {result['figure_label']}", "",
             (f"Goal: {result['goal']}. The pipeline took {d['seconds']:.0f} s; its jobs "
              f"{d['startup_seconds']:.0f} s start-up + {d['work_seconds']:.0f} s work (jobs "
              f"that ran side by side each count)."), "",
             speed_line(d["machine_speed"]), "",
             "| rule | jobs | job time, s | start-up (median), s | work (median), s |",
             "|---|---|---|---|---|"]
    for rule, r in sorted(d["by_rule"].items(), key=lambda item: -item[1]["wall"]):
        lines.append(f"| {rule} | {r['jobs']} | {r['wall']:.1f} | {r['median_startup']:.2f} | "
                     f"{r['median_work']:.2f} |")
    return "\n".join(lines) + "\n"
