"""The pipeline on a real Slurm cluster through profiles/slurm, not a mock.

CI starts a single-node Slurm first (.ci/slurm-up.sh: one node, one GPU generic resource, no
accounting database) and sets QLORA_REQUIRE_SLURM=1. Elsewhere the test is skipped unless
`sinfo` answers; on a real cluster (run it from a login node) set QLORA_SLURM_PARTITION and
QLORA_SLURM_ACCOUNT (default: the default partition, no account).

The run is small: import + quantize the tiny model (quantize is a GPU rule) and fetch +
tokenize one task. The profile is used as it is, except for what a test cluster must change:
the partition and account, and each job's memory and CPUs capped to fit the test node.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_workdir
from safetensors.torch import load_file

from qlora_pipeline.jobs.runner import Job

PROFILE = REPO / "profiles" / "slurm"
TARGETS = ["results/models/quantized", "results/data/topic/tokenized"]
EXPECTED_RULES = {"import_base_model", "quantize", "fetch_dataset", "tokenize"}
RUN_TIMEOUT_S = 1200


def _run(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def no_slurm_reason() -> str | None:
    if shutil.which("sinfo") is None:
        return "no Slurm here: `sinfo` not found (CI starts one with .ci/slurm-up.sh)"
    try:
        result = _run("sinfo", "-h", "-o", "%P")
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"no Slurm reachable: `sinfo` failed: {err}"
    if result.returncode != 0:
        return f"no Slurm reachable: `sinfo` failed: {result.stderr.strip()[:300]}"
    if not result.stdout.strip():
        return "Slurm answers but has no partition"
    return None


NO_SLURM = no_slurm_reason()
# .ci/run sets this after starting Slurm: there, a Slurm that does not answer is a failure.
REQUIRED = os.environ.get("QLORA_REQUIRE_SLURM") == "1"
pytestmark = pytest.mark.skipif(NO_SLURM is not None and not REQUIRED, reason=NO_SLURM or "")


def ci_partition() -> str:
    if os.environ.get("QLORA_SLURM_PARTITION"):
        return os.environ["QLORA_SLURM_PARTITION"]
    names = _run("sinfo", "-h", "-o", "%P").stdout.split()
    default = [name for name in names if name.endswith("*")]
    return (default or names)[0].rstrip("*")


def node_limits(partition: str) -> tuple[int, int]:
    """(CPUs, memory MB) of the smallest node of the partition."""
    out = _run("sinfo", "-h", "-N", "-p", partition, "-o", "%c %m").stdout.split("\n")
    cpus, mems = [], []
    for line in out:
        if line.strip():
            cpu, mem = line.split()
            cpus.append(int(cpu.rstrip("+")))
            mems.append(int(mem.rstrip("+")))
    assert cpus, f"partition {partition} has no nodes"
    return min(cpus), min(mems)


def sacct_works() -> bool:
    if shutil.which("sacct") is None:
        return False
    return _run("sacct", "-n", "-X", "-o", "JobID").returncode == 0


def ci_overrides(partition: str, account: str) -> list[str]:
    """The profile's resources with the test cluster's partition, account and sizes.

    On the command line, --default-resources and --set-resources replace the profile's whole
    entries, so every entry is repeated here, changed only where the test node needs it.
    """
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    cpus, mem = node_limits(partition)
    max_cpus, max_mem = max(1, cpus // 2), max(500, mem // 4)

    def fit(name, value):
        if name != "mem_mb":
            return value
        if isinstance(value, str):  # an expression of the attempt: scaled, growth kept
            return Expression(f"({value}) * {max_mem} // {eval(value, {'attempt': 1})}")
        return min(int(value), max_mem)

    defaults = dict(profile["default-resources"])
    assert {"slurm_partition", "slurm_account", "runtime", "mem_mb"} <= set(defaults)
    defaults.update(slurm_partition=partition, slurm_account=account)
    default_args = [f"{k}={fit(k, v)!r}" if isinstance(v, str) else f"{k}={fit(k, v)}"
                    for k, v in defaults.items()]
    set_args = []
    for rule, resources in profile["set-resources"].items():
        for name, value in resources.items():
            if name == "gpu_model":  # the test node's GPU has no model type
                continue
            value = fit(name, value)
            set_args.append(f"{rule}:{name}={value!r}" if type(value) is str
                            else f"{rule}:{name}={value}")
    threads = [f"{rule}={n}" for rule, n in fitted_threads(profile, max_cpus).items()]
    status = [] if sacct_works() else ["--slurm-status-command", "squeue"]
    return ["--default-resources", *default_args, "--set-resources", *set_args,
            "--set-threads", *threads, *status,
            "--slurm-init-seconds-before-status-checks", "5", "--slurm-keep-successful-logs",
            "--verbose"]  # --verbose: the log shows each sbatch command line


class Expression(str):
    """A resource value Snakemake evaluates (given unquoted), not a string."""


def fitted_threads(profile: dict, max_cpus: int) -> dict[str, int]:
    """The profile's threads per rule, capped to what the test node can give."""
    return {rule: min(int(n), max_cpus) for rule, n in profile["set-threads"].items()}


def expected_threads(rule: str) -> int:
    """A rule's threads on the test cluster: the profile's (fitted), else 1 (data rules)."""
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    cpus, _ = node_limits(ci_partition())
    return fitted_threads(profile, max(1, cpus // 2)).get(rule, 1)


def show_job(job_id: str) -> dict[str, str]:
    """`scontrol show job -d` as key=value pairs, or {} once the controller forgot the job."""
    result = _run("scontrol", "show", "job", "-d", "-o", job_id)
    if result.returncode != 0:
        return {}
    fields = {}
    for token in result.stdout.split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


def jobcomp_records() -> dict[str, dict[str, str]]:
    """The job completion log (JobCompType=jobcomp/filetxt), by job id; {} without one."""
    config = _run("scontrol", "show", "config").stdout
    kind = re.search(r"^JobCompType\s*=\s*(\S+)", config, re.MULTILINE)
    where = re.search(r"^JobCompLoc\s*=\s*(\S+)", config, re.MULTILINE)
    if not (kind and where and kind.group(1) == "jobcomp/filetxt"):
        return {}
    path = Path(where.group(1))
    if not path.is_file():
        return {}
    records = {}
    for line in path.read_text(errors="replace").splitlines():
        fields = dict(tok.partition("=")[::2] for tok in line.split() if "=" in tok)
        if "JobId" in fields:
            records[fields["JobId"]] = fields
    return records


def start_run(workdir: Path, output: Path, *targets: str) -> subprocess.Popen:
    """Snakemake through the Slurm profile in `workdir`, its output into the file `output`
    (a file, not a pipe: a test reads it while it runs)."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(workdir), "--configfile", str(workdir / "config/config.yaml"),
           "--workflow-profile", "none", "--profile", str(PROFILE),
           *ci_overrides(ci_partition(), os.environ.get("QLORA_SLURM_ACCOUNT", "")),
           "--", *targets]
    with open(output, "w") as handle:
        return subprocess.Popen(cmd, cwd=workdir, stdout=handle, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, output: Path) -> str:
    """The run's output once it succeeded; a failure, its jobs cancelled, past RUN_TIMEOUT_S."""
    try:
        proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        run_id = re.search(r"SLURM run ID: (\S+)", output.read_text())
        if run_id:  # leave no job of ours behind
            subprocess.run(["scancel", "--name", run_id.group(1)], check=False)
        pytest.fail(f"snakemake through Slurm ran over {RUN_TIMEOUT_S}s:\n"
                    f"{output.read_text()[-6000:]}")
    out = output.read_text()
    assert proc.returncode == 0, f"snakemake through Slurm failed:\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")  # the training test below goes on from its outputs
def slurm_run(tmp_path_factory, request):
    if NO_SLURM:
        pytest.fail(f"QLORA_REQUIRE_SLURM=1, but {NO_SLURM}")
    tmp_path = tmp_path_factory.mktemp("slurm")
    workdir = make_workdir(tmp_path / "run", request.getfixturevalue("tiny_model_dir"))
    output = tmp_path / "snakemake.log"
    return workdir, ci_partition(), finish(start_run(workdir, output, *TARGETS), output)


def test_pipeline_stages_run_as_slurm_jobs_with_gpu_requests(slurm_run):
    workdir, partition, out = slurm_run
    # "Job 3 has been submitted with SLURM jobid 17 (log: .../slurm_logs/rule_quantize/17.log)."
    submitted = re.findall(r"submitted with SLURM jobid (\d+) \(log: (\S+?)\)\.?$", out, re.MULTILINE)
    jobs = {}
    for job_id, log_path in submitted:
        rule = re.search(r"/rule_([A-Za-z0-9_]+)/", log_path).group(1)
        jobs[job_id] = rule
    assert sorted(jobs.values()) == sorted(EXPECTED_RULES), out[-6000:]
    snakemake_jobs = re.findall(r"^(?:local)?rule (\w+):", out, re.MULTILINE)
    assert sorted(snakemake_jobs) == sorted(jobs.values()), "a job ran outside Slurm"

    gpu_rules = {rule for rule, res in
                 yaml.safe_load((PROFILE / "config.yaml").read_text())["set-resources"].items()
                 if res.get("gpu", 0) >= 1}
    # The training rules' GPUs and nodes come from the rule (train.distributed: one process,
    # one GPU, one node by default), not the profile.
    training = {"train_qlora", "recover"}
    assert not gpu_rules & training
    gpu_rules |= training
    assert "quantize" in gpu_rules
    # The sbatch command lines: GPU rules ask for --gpus, the others do not.
    sbatch_calls = re.findall(r"sbatch call: (sbatch .*)$", out, re.MULTILINE)
    assert len(sbatch_calls) == len(jobs)
    for call in sbatch_calls:
        rule = re.search(r"--comment '?rule_(.+?)(?:_wildcards_\S*)?'? ", call).group(1)
        assert ("--gpus=" in call) == (rule in gpu_rules), call
        if rule in training:
            assert "--gpus=1 " in call + " " and "--nodes=1" in call, call
        # One value: Slurm's CPUs per task are the rule's threads.
        assert f"--cpus-per-task={expected_threads(rule)}" in call, call
    jobcomp = jobcomp_records()
    rows = []
    for job_id, rule in sorted(jobs.items(), key=lambda item: int(item[0])):
        info = show_job(job_id)
        assert info, f"slurmctld no longer knows job {job_id} (MinJobAge too short?)"
        assert info["JobState"] == "COMPLETED", (job_id, rule, info["JobState"])
        assert info["Partition"] == partition
        assert info["Comment"].startswith(f"rule_{rule}"), info["Comment"]
        gpu_request = info.get("TresPerJob", "") + " " + info.get("TRES", "")
        asks_gpu = "gres:gpu" in gpu_request or "gres/gpu" in gpu_request
        assert asks_gpu == (rule in gpu_rules), (rule, gpu_request)
        if rule in gpu_rules:
            assert info.get("JOB_GRES", "").startswith("gpu"), info  # and it was allocated
        if jobcomp:
            assert jobcomp[job_id]["JobState"] == "COMPLETED"
            assert jobcomp[job_id]["Name"] == info["JobName"]
        rows.append(f"{job_id:>6}  {rule:<18} {info['RunTime']:>9}  "
                    f"{info.get('TresPerJob') or '-':<12} {info.get('JOB_GRES') or '-':<9} "
                    f"{info['TRES']}")
    print("\nSlurm job  rule               runtime    gpu request  gres      TRES")
    print("\n".join(rows))

    # The stages themselves ran inside their Slurm jobs: the GPU stage's log names its job,
    # and the workstation GPU pinning left the scheduler's assignment alone.
    quantize_id = next(i for i, r in jobs.items() if r == "quantize")
    quantize_log = (workdir / "results/logs/quantize.log").read_text()
    assert f"GPU pinning skipped: Slurm job {quantize_id}" in quantize_log, quantize_log
    # ... and torch used the job's threads there, the count Slurm allocated.
    threads = expected_threads("quantize")
    assert f"(threads: {threads}, " in quantize_log, quantize_log
    provenance = json.loads((workdir / "results/models/quantized/provenance.json").read_text())
    assert provenance["machine"]["torch"]["threads"] == threads
    assert (workdir / "results/data/topic/tokenized/provenance.json").is_file()
    # The plugin's own log of each job (kept with --slurm-keep-successful-logs).
    slurm_logs = workdir / ".snakemake" / "slurm_logs"
    assert {p.stem for p in slurm_logs.rglob("*.log")} >= set(jobs)


ADAPTER = "results/adapters/topic/qlora"
# Long enough to be cancelled while it trains, after its checkpoint at step 4.
LONG_TRAINING = {"max_steps": 48, "eval_steps": 4, "batch_size": 4, "logging_steps": 1}


def wait_for(what: str, found, proc: subprocess.Popen, timeout: float = 300):
    """found()'s first true value, polled while the run goes on."""
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        value = found()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"{what}: not seen (snakemake exited {proc.poll()})")


def test_a_training_spans_jobs_through_its_time_limit_and_a_cancel(slurm_run, tmp_path):
    """Job 1 is told its time is up (SIGURG, as `--signal=URG@300` sends it): the training
    saves, exits 75, and the rule's retry resumes it in job 2; job 2 is cancelled (scancel)
    after a checkpoint of its own; job 3 resumes and ends with the adapter of an
    uninterrupted run here with the same params, bitwise, each job with more memory."""
    workdir = slurm_run[0]
    task = workdir / "config/tasks/topic.yaml"
    task.write_text(yaml.safe_dump({**yaml.safe_load(task.read_text()), "train": LONG_TRAINING}))
    # Each attempt writes the rule's log anew; the Slurm job's log keeps its last words.
    log = workdir / "results/logs/train_qlora/topic/qlora.log"
    text = lambda: log.read_text() if log.exists() else ""  # noqa: E731
    resumed = r"resuming from \S+/checkpoint-(\d+)"
    proc = start_run(workdir, tmp_path / "snakemake.log", ADAPTER)
    try:
        wait_for("training 1", lambda: "time limit: the job ends in" in text(), proc)
        first = re.findall(r"Slurm job (\d+)", text())[-1]
        _run("scancel", "--signal=URG", first)
        stopped = int(wait_for("training 2", lambda: re.search(resumed, text()), proc)[1])
        second = re.findall(r"Slurm job (\d+)", text())[-1]
        checkpoints = workdir / "results/checkpoints/topic/qlora"
        wait_for("a checkpoint of training 2", lambda: [
            p for p in checkpoints.glob("*/checkpoint-*/trainer_state.json")
            if int(p.parent.name.split("-")[1]) > stopped], proc)
        _run("scancel", second)
        out = finish(proc, tmp_path / "snakemake.log")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert first != second
    job_log = (workdir / f".snakemake/slurm_logs/rule_train_qlora/topic_qlora/{first}.log")
    assert f"training stopped at step {stopped} of {LONG_TRAINING['max_steps']} before the " \
           f"job's time limit" in job_log.read_text()
    assert "returned non-zero exit status 75" in job_log.read_text()  # ResumeLater's
    assert int(re.search(resumed, text())[1]) > stopped  # training 3 went on from training 2
    summary = json.loads((workdir / ADAPTER / "summary.json").read_text())
    assert summary["steps"] == LONG_TRAINING["max_steps"] and summary["resumed_from"]
    # The reference: the stage as its job runs it, its params and threads, in one go (on a
    # CPU node, as CI's: bitwise alike).
    params = json.loads((workdir / ADAPTER / "provenance.json").read_text())["params"]
    assert params["train"]["max_steps"] == LONG_TRAINING["max_steps"]
    Job.from_call("train_qlora", {
        "quantized": workdir / "results/models/quantized", "adapter": tmp_path / "reference",
        "tokenized": workdir / "results/data/topic/tokenized",
        "checkpoints": tmp_path / "checkpoints",
        **{k: params[k] for k in ("lora", "train", "seed")}},
        threads=expected_threads("train_qlora"), wants_gpu=True).run()
    want, got = (load_file(folder / "adapter_model.safetensors")
                 for folder in (tmp_path / "reference", workdir / ADAPTER))
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)
    # Three sbatch calls of the rule, memory growing with the attempt.
    mems = [int(m) for m in re.findall(r"sbatch call: sbatch .*rule_train_qlora.* --mem (\d+)",
                                       out)]
    assert len(mems) == 3 and mems[0] < mems[1] < mems[2], mems
    assert "--signal=URG@300" in out
    states = {job: show_job(job).get("JobState") for job in (first, second)}
    assert states == {first: "FAILED", second: "CANCELLED"}, states
