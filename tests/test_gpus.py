"""Workstation GPU pinning (qlora_pipeline/jobs/gpus.py) with simulated GPUs: QLORA_NUM_GPUS
stands in for `nvidia-smi -L`, and the claims are real flock()s taken by real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO

from qlora_pipeline.jobs import gpus
from qlora_pipeline.jobs.runner import Job

# A process that pins a GPU like a stage does, reports it, and holds it until told to stop
# (a line on stdin) or killed.
HOLDER = """
import json, os, sys, time
from qlora_pipeline.jobs import gpus
with gpus.pinned_gpu(poll_s=0.05) as index:
    print(json.dumps({"index": index, "cvd": os.environ.get("CUDA_VISIBLE_DEVICES")}),
          flush=True)
    sys.stdin.readline()
"""

# A process that pins a GPU, records when it held it, and works for `hold` seconds.
WORKER = """
import json, os, sys, time
from qlora_pipeline.jobs import gpus
out, hold = sys.argv[1], float(sys.argv[2])
with gpus.pinned_gpu(poll_s=0.02) as index:
    start = time.time()
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    time.sleep(hold)
    end = time.time()
with open(out, "w") as f:
    json.dump({"index": index, "cvd": cvd, "start": start, "end": end, "pid": os.getpid()}, f)
"""


def claim_one(num_gpus: int, **waiting) -> gpus.GpuClaim:
    """A free GPU among `num_gpus`, as a job that is not distributed claims it."""
    return gpus.claim_many(num_gpus, 1, **waiting)[0]


@pytest.fixture
def sim(tmp_path, monkeypatch):
    """N simulated GPUs with a private lock directory; no Slurm, no preset device list."""
    lock_dir = tmp_path / "locks"
    monkeypatch.setenv(gpus.LOCK_DIR_ENV, str(lock_dir))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def env(num_gpus: int) -> dict:
        monkeypatch.setenv(gpus.NUM_GPUS_ENV, str(num_gpus))
        child = dict(os.environ)
        child["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO),
                                                            child.get("PYTHONPATH")]))
        return child

    return SimpleNamespace(env=env, lock_dir=lock_dir)


def start_holder(env: dict) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line, f"holder exited with {proc.wait()}"
    return proc, json.loads(line)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.stdin.write("\n")
        proc.stdin.flush()
    proc.wait(timeout=30)


# ---- how many GPUs, and when to leave the environment alone -----------------------------------

def test_gpu_count_from_override_and_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv(gpus.NUM_GPUS_ENV, "3")
    assert gpus.gpu_count() == 3
    monkeypatch.setenv(gpus.NUM_GPUS_ENV, "three")
    with pytest.raises(ValueError, match="QLORA_NUM_GPUS"):
        gpus.gpu_count()

    monkeypatch.delenv(gpus.NUM_GPUS_ENV)
    fake = tmp_path / "bin"
    fake.mkdir()
    monkeypatch.setenv("PATH", str(fake))
    assert gpus.gpu_count() == 0  # no nvidia-smi: no GPU
    smi = fake / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA A100 (UUID: GPU-a)'\n"
                   "echo 'GPU 1: NVIDIA A100 (UUID: GPU-b)'\n")
    smi.chmod(0o755)
    assert gpus.gpu_count() == 2
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert gpus.gpu_count() == 0  # a driver that does not answer: no GPU


def test_default_lock_dir_is_per_user(monkeypatch):
    monkeypatch.delenv(gpus.LOCK_DIR_ENV, raising=False)
    assert gpus.lock_dir() == Path(f"/tmp/qlora-gpu-locks-{os.getuid()}")


@pytest.mark.parametrize("preset", [
    {"SLURM_JOB_ID": "4242", "CUDA_VISIBLE_DEVICES": "3"},  # Slurm assigned GPU 3
    {"SLURM_JOB_ID": "4242"},                                # a Slurm job without a GPU
    {"CUDA_VISIBLE_DEVICES": "1"},                           # the user's choice
    {"CUDA_VISIBLE_DEVICES": ""},                            # the user hid every GPU
])
def test_slurm_or_preset_devices_leave_the_environment_alone(sim, monkeypatch, preset):
    sim.env(4)
    for key, value in preset.items():
        monkeypatch.setenv(key, value)
    before = dict(os.environ)
    with gpus.pinned_gpu() as index:
        assert index is None
        assert dict(os.environ) == before
    assert dict(os.environ) == before
    assert not sim.lock_dir.exists()  # nothing was claimed


def test_no_gpu_pins_nothing(sim):
    sim.env(0)
    with gpus.pinned_gpu() as index:
        assert index is None
        assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_pinning_sets_and_restores_cuda_visible_devices(sim):
    sim.env(2)
    with gpus.pinned_gpu() as first:
        assert first == 0 and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
        # A second claim in the same process is another holder: it gets the other GPU.
        with claim_one(2) as second:
            assert second.index == 1
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    with gpus.pinned_gpu() as again:  # released: GPU 0 is free again
        assert again == 0


def test_a_distributed_job_claims_one_gpu_per_process(sim):
    """train.distributed.processes = 2: the job sees two GPUs, takes them only when both are
    free (a partial claim is given back while it waits), and asks for no more than there are."""
    sim.env(3)
    with claim_one(3) as held:  # another job holds GPU 0
        assert held.index == 0
        with gpus.pinned_gpu(2) as first:
            assert first == 1 and os.environ["CUDA_VISIBLE_DEVICES"] == "1,2"
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
        with pytest.raises(TimeoutError):  # two GPUs are free, three are asked for
            gpus.claim_many(3, 3, poll_s=0.02, timeout_s=0.2)
        claims = gpus.claim_many(3, 2, poll_s=0.02, timeout_s=0.2)  # the wait kept nothing
        assert [c.index for c in claims] == [1, 2]
        for claim in claims:
            claim.release()
    with pytest.raises(ValueError, match="asks for 4 GPUs; this machine has 3"):
        gpus.claim_many(3, 4)


# ---- concurrent processes ------------------------------------------------------------------------

def test_concurrent_jobs_never_share_a_gpu(sim, tmp_path):
    num_gpus, num_jobs, hold = 3, 8, 0.6
    env = sim.env(num_gpus)
    outs = [tmp_path / f"job{i}.json" for i in range(num_jobs)]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(out), str(hold)], env=env)
             for out in outs]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    claims = [json.loads(out.read_text()) for out in outs]

    for claim in claims:
        assert claim["index"] in range(num_gpus)
        assert claim["cvd"] == str(claim["index"])
    for a in claims:
        for b in claims:
            if a is not b and a["index"] == b["index"]:
                assert a["end"] <= b["start"] or b["end"] <= a["start"], (a, b)
    # Never more holders than GPUs at any moment (the timestamps' sweep).
    events = sorted([(c["start"], 1) for c in claims] + [(c["end"], -1) for c in claims],
                    key=lambda e: (e[0], e[1]))
    held = peak = 0
    for _, step in events:
        held += step
        peak = max(peak, held)
    assert peak <= num_gpus
    assert len({c["index"] for c in claims}) > 1  # the jobs did spread over the GPUs


def test_a_claim_waits_until_a_gpu_is_released(sim):
    env = sim.env(2)
    holders = [start_holder(env) for _ in range(2)]
    try:
        assert sorted(info["index"] for _, info in holders) == [0, 1]
        assert [info["cvd"] for _, info in holders] == [str(i["index"]) for _, i in holders]
        with pytest.raises(TimeoutError):
            claim_one(2, poll_s=0.05, timeout_s=0.5)

        got = {}

        def wait_for_gpu():
            started = time.monotonic()
            with claim_one(2, poll_s=0.05) as claim:
                got.update(index=claim.index, waited=time.monotonic() - started)

        waiter = threading.Thread(target=wait_for_gpu)
        waiter.start()
        time.sleep(0.8)
        assert waiter.is_alive(), "the claim did not wait for a free GPU"
        proc, info = holders[1]
        stop(proc)  # this job finishes: its GPU becomes free
        waiter.join(timeout=30)
        assert not waiter.is_alive()
        assert got["index"] == info["index"]
        assert got["waited"] >= 0.7
    finally:
        for proc, _ in holders:
            stop(proc)


def test_a_killed_holder_releases_its_gpu(sim):
    env = sim.env(1)
    proc, info = start_holder(env)
    try:
        assert info["index"] == 0
        with pytest.raises(TimeoutError):
            claim_one(1, poll_s=0.05, timeout_s=0.3)
        os.kill(proc.pid, signal.SIGKILL)  # a crash: no cleanup code runs
        assert proc.wait(timeout=30) == -signal.SIGKILL
        with claim_one(1, poll_s=0.05, timeout_s=10) as claim:
            assert claim.index == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- the hook in the job runner ---------------------------------------------------------------

def run_fake(resources: dict, stage) -> None:
    """A job as Snakemake hands it over (its resources), running `stage`."""
    import dataclasses

    smk = SimpleNamespace(log=[], resources=resources, rule="fake", threads=1, input={},
                          output={}, params={}, wildcards={})
    dataclasses.replace(Job.from_snakemake(smk), stage=stage).run()


@pytest.mark.parametrize("resources, expected", [
    ({"gpu": 1}, "0"),   # a GPU rule is pinned
    ({}, None),          # a rule without a GPU is not
    ({"gpu": 0}, None),
])
def test_a_job_pins_only_rules_that_declare_a_gpu(sim, resources, expected):
    sim.env(2)
    seen = {}
    run_fake(resources, lambda policy: seen.update(cvd=os.environ.get("CUDA_VISIBLE_DEVICES")))
    assert seen["cvd"] == expected
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_a_job_leaves_a_slurm_assignment_alone(sim, monkeypatch):
    sim.env(2)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    seen = {}
    run_fake({"gpu": 1}, lambda policy: seen.update(cvd=os.environ.get("CUDA_VISIBLE_DEVICES")))
    assert seen["cvd"] == "5"


@pytest.mark.parametrize("count, slots", [("0", gpus.CPU_MODEL_SLOTS), ("1", 1), ("3", 3)])
def test_model_slots_are_the_gpus_or_two_cpu_jobs(monkeypatch, count, slots):
    monkeypatch.setenv(gpus.NUM_GPUS_ENV, count)
    assert gpus.model_slots() == slots
