"""noop_dryrun: wall time of `snakemake -n` when nothing is left to do, at 2 and 50 tasks;
goal: under 2 s at 2 tasks, under 10 s at 50 (best of three).

Each size gets its own working directory: the repository's config/config.yaml with N tasks,
copies of the builtin tasks (config/tasks/) under new names, whose every output exists and
was marked up to date by `snakemake --touch` (empty files and folders: a dry run reads no
output, only names, times and Snakemake's metadata). The dry run is the user's command: the
repository's Snakefile and its default profile, started as a new process. One untimed dry
run first checks that it is a no-op (and fills the caches a user's second dry run finds: the
code digests, jobs/code_digest.py); the figure per size is the best of the timed ones, the
median beside it.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks import support

LIMITS = {2: 2.0, 50: 10.0}  # seconds, by task count
SOURCES = ("arithmetic", "topic")  # the builtin tasks, copied in turn
FULL = {"sizes": (2, 50), "runs": 3}
SMOKE = {"sizes": (2,), "runs": 1}


def run(smoke: bool) -> dict:
    plan = SMOKE if smoke else FULL
    rows = []
    for size in plan["sizes"]:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = make_workdir(Path(tmp), size, smoke)
            touch_outputs(workdir)
            rows.append(measure(workdir, size, plan["runs"]))
    largest = rows[-1]
    return {"name": "noop_dryrun", "figure": round(largest["best_seconds"], 3),
            "figure_text": " / ".join(f"{r['best_seconds']:.2f}" for r in rows)
                           + f" s at {' / '.join(str(r['tasks']) for r in rows)} tasks",
            "goal": "< 2 s at 2 tasks, < 10 s at 50 (best of three)",
            "met": all(r["best_seconds"] < r["limit_seconds"] for r in rows),
            "details": {"runs": plan["runs"], "rows": rows}}


def markdown(result: dict) -> str:
    lines = ["# noop_dryrun: `snakemake -n` with nothing to do", "",
             f"Goal: {result['goal']}. Best of {result['details']['runs']} timed runs.", "",
             "| tasks | best s | median s | runs (s) | limit s | met |",
             "|---|---|---|---|---|---|"]
    for r in result["details"]["rows"]:
        met = r["best_seconds"] < r["limit_seconds"]
        lines.append(f"| {r['tasks']} | {r['best_seconds']:.2f} | {r['median_seconds']:.2f} | "
                     f"{', '.join(f'{s:.2f}' for s in r['seconds'])} | {r['limit_seconds']:g} | "
                     f"{'met' if met else 'MISSED'} |")
    return "\n".join(lines) + "\n"


def make_workdir(root: Path, size: int, smoke: bool) -> Path:
    """The repository's config with `size` tasks; --smoke: on the tiny base (no SmolLM2)."""
    config = yaml.safe_load((support.REPO / "config" / "config.yaml").read_text(encoding="utf-8"))
    names = [f"{SOURCES[i % len(SOURCES)]}_{i}" for i in range(size)]
    config["tasks"] = names
    # The default's combination, of the first two tasks under their new names.
    config["combinations"] = [{**c, "tasks": names[:2]} for c in config.get("combinations", [])
                              if size >= 2]
    if smoke:
        config["base_model"] = {"source": "local", "path": str(support.tiny_base())}
    (root / "config" / "tasks").mkdir(parents=True)
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False),
                                                 encoding="utf-8")
    for name in names:
        source = support.REPO / "config" / "tasks" / f"{name.rsplit('_', 1)[0]}.yaml"
        (root / "config" / "tasks" / f"{name}.yaml").write_text(
            source.read_text(encoding="utf-8"), encoding="utf-8")
    return root


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(support.REPO / "Snakefile"),
           *args]
    proc = subprocess.run(cmd, check=False, cwd=workdir, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} in {workdir} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


def touch_outputs(workdir: Path) -> None:
    """Every output of the workflow present, then marked up to date in the DAG's order.
    `--summary` names them; a name with a suffix is a file, the rest are folders (the
    pipeline's directory outputs: models, datasets, adapters, task specs)."""
    for line in snakemake(workdir, "--summary").stdout.splitlines()[1:]:
        path = workdir / line.split("\t", 1)[0]
        if path.suffix:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        else:
            path.mkdir(parents=True, exist_ok=True)
    snakemake(workdir, "--touch")


def measure(workdir: Path, size: int, runs: int) -> dict:
    check = snakemake(workdir, "-n")
    if "Nothing to be done" not in check.stdout + check.stderr:
        raise RuntimeError(f"noop_dryrun: the dry run at {size} tasks has jobs to run:\n"
                           f"{check.stdout[-2000:]}\n{check.stderr[-2000:]}")
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        snakemake(workdir, "-n")
        seconds.append(time.perf_counter() - start)
    return {"tasks": size, "seconds": seconds, "best_seconds": min(seconds),
            "median_seconds": support.median(seconds),
            "limit_seconds": LIMITS[size]}
