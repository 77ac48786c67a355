"""Warm start (qlora_pipeline/jobs/warm_start.py): a job forked from the server writes what it
writes when it starts from scratch, with its own threads, variables, directory and streams;
a failure, a refusal, a missing server and a stopped job behave as they do without it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import stage, task_blocks
from test_determinism import same_tensors

from qlora_pipeline.jobs import warm_start
from qlora_pipeline.core.errors import InputError, ResumeLater
from qlora_pipeline.jobs.runner import Job



def probe(*, out, seconds: float = 0.0, fail: bool = False, later: bool = False,
          policy) -> None:
    """A stage that reports where and how it ran."""
    matrix = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    Path(out).write_text(json.dumps({
        "pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(),
        "threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS"),
        "marker": os.environ.get("WARM_TEST_MARKER"), "product": (matrix @ matrix).tolist(),
        "policy_threads": policy.threads}))
    print("probe says hello", flush=True)
    if fail:
        raise InputError("probe: asked to fail")
    if later:
        raise ResumeLater("probe: stopped before the job's time limit")
    time.sleep(seconds)


def probe_job(tmp_path, **params) -> Job:
    return Job(rule="probe", stage=probe, inputs={}, outputs={}, wildcards={},
               params={"out": str(tmp_path / "probe.json"), **params},
               log_path=str(tmp_path / "probe.log"), threads=2, wants_gpu=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server as the Snakefile starts it (warm_start.start), watching this process."""
    root = tmp_path_factory.mktemp("warm")
    address = str(root / "warm.sock")
    with open(root / "server.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "qlora_pipeline.jobs.warm_start", "--socket", address,
             "--watch", str(os.getpid())], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **warm_start.SERVER_ENVIRONMENT})
    deadline = time.monotonic() + 180
    while not os.path.exists(address):
        assert process.poll() is None, (root / "server.log").read_text()
        assert time.monotonic() < deadline, "the server did not start within 180 s"
        time.sleep(0.2)
    yield address, process.pid
    process.terminate()
    process.wait(timeout=30)
    assert not os.path.exists(address), "the server left its socket behind"


def test_a_job_runs_in_a_copy_with_its_own_threads_variables_and_directory(
        server, tmp_path, monkeypatch):
    address, server_pid = server
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WARM_TEST_MARKER", "from the job")
    assert warm_start.submit(probe_job(tmp_path), address=address) == 0
    record = json.loads((tmp_path / "probe.json").read_text())
    assert record["ppid"] == server_pid and record["pid"] != os.getpid()
    assert record["cwd"] == str(tmp_path)
    assert record["marker"] == "from the job"
    assert (record["threads"], record["omp"], record["policy_threads"]) == (2, "2", 2)
    matrix = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.tensor(record["product"]), matrix @ matrix)
    log = (tmp_path / "probe.log").read_text()
    assert "probe says hello" in log and "warm start)" in log


def test_a_failing_job_reports_its_status_and_its_error(server, tmp_path, capfd):
    assert warm_start.submit(probe_job(tmp_path, fail=True), address=server[0]) == 1
    assert "probe: asked to fail" in (tmp_path / "probe.log").read_text()
    told = capfd.readouterr().err  # bad input: its one line, no traceback after it
    assert "error: probe: asked to fail" in told and "Traceback" not in told


def test_a_training_stopped_for_its_time_limit_exits_75_in_one_line(server, tmp_path):
    assert warm_start.submit(probe_job(tmp_path, later=True), address=server[0]) == 75
    log = (tmp_path / "probe.log").read_text()
    assert "probe: stopped before the job's time limit\n" in log and "Traceback" not in log


def test_a_stage_run_warm_writes_what_it_writes_cold(server, tmp_path, tiny_model_dir):
    """Quantize and train on the tiny model in a copy of the server and here: the same bytes."""
    task = task_blocks()
    stage("fetch_dataset")(raw=tmp_path / "raw", format=task["format"],
                           dataset={**task["dataset"], "num_examples": 40, "seed": 1})
    stage("tokenize")(raw=tmp_path / "raw", base=tiny_model_dir, tokenized=tmp_path / "tokenized",
                      format=task["format"], tokenize=task["tokenize"])
    quantization = {"method": "nf4", "double_quant": True, "compute_dtype": "auto",
                    "skip_modules": ["lm_head"]}
    train = {**task["train"], "max_steps": 3, "eval_steps": 3, "batch_size": 4}
    for mode in ("cold", "warm"):
        root = tmp_path / mode
        jobs = [Job.from_call("quantize", {
                    "base": str(tiny_model_dir), "quantized": str(root / "quantized"),
                    "quantization": quantization, "seed": 0}, threads=1, wants_gpu=True,
                    log_path=str(root / "quantize.log")),
                Job.from_call("train_qlora", {
                    "quantized": str(root / "quantized"), "tokenized": str(tmp_path / "tokenized"),
                    "adapter": str(root / "adapter"), "lora": task["lora"], "train": train,
                    "seed": 0, "checkpoints": str(root / "ckpt")}, threads=1, wants_gpu=True,
                    log_path=str(root / "train.log"))]
        for job in jobs:
            if mode == "cold":
                job.run()
            else:
                assert warm_start.submit(job, address=server[0]) == 0, \
                    Path(job.log_path).read_text()[-3000:]
    assert "warm start)" in (tmp_path / "warm" / "train.log").read_text()
    same_tensors(tmp_path / "cold/quantized/model.safetensors",
                 tmp_path / "warm/quantized/model.safetensors")
    same_tensors(tmp_path / "cold/adapter/adapter_model.safetensors",
                 tmp_path / "warm/adapter/adapter_model.safetensors")


def test_a_job_under_another_interpreter_runs_itself(server, tmp_path, monkeypatch):
    """A conda env's job reaches the server (same socket) but is not its to run."""
    monkeypatch.setattr(sys, "executable", "/usr/bin/env")
    assert warm_start.submit(probe_job(tmp_path), address=server[0]) is None
    assert not (tmp_path / "probe.json").exists()


def test_a_job_that_cannot_be_sent_runs_itself(server, tmp_path, capsys):
    """A stage the copy could not import (here a lambda) is not the server's to run."""
    job = Job(rule="probe", stage=lambda **_: None, inputs={}, outputs={}, params={},
              wildcards={}, log_path=None, threads=1, wants_gpu=False)
    assert warm_start.submit(job, address=server[0]) is None
    assert "the job runs itself" in capsys.readouterr().err


def test_without_a_server_the_job_runs_itself(tmp_path, monkeypatch):
    assert warm_start.submit(probe_job(tmp_path), address=str(tmp_path / "none.sock")) is None
    monkeypatch.delenv(warm_start.SOCKET_VARIABLE, raising=False)
    assert warm_start.submit(probe_job(tmp_path)) is None



def test_bad_input_run_cold_ends_in_its_one_line(tmp_path, monkeypatch, capfd):
    """runner.run_script without a server: exit status 1 after the line, no traceback."""
    from qlora_pipeline.jobs import runner

    monkeypatch.setattr(Job, "from_snakemake", lambda smk: probe_job(tmp_path, fail=True))
    monkeypatch.setattr(warm_start, "submit", lambda job: None)
    with pytest.raises(SystemExit) as stop:
        runner.run_script(None)
    assert stop.value.code == 1 and "error: probe: asked to fail" in capfd.readouterr().err


CLIENT = """
import sys
sys.path[:0] = {path!r}
from qlora_pipeline.jobs import warm_start
from test_warm_start import probe_job
from pathlib import Path
sys.exit(warm_start.submit(probe_job(Path({root!r}), seconds=120), address={address!r}))
"""


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_a_job_stops_its_copy(server, tmp_path, how):
    """Snakemake stops a job with SIGTERM (passed on to the copy); a job killed outright
    closes its connection, which the copy watches."""
    code = CLIENT.format(path=sys.path, root=str(tmp_path), address=server[0])
    client = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 120
    while not (tmp_path / "probe.json").exists():
        assert client.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    copy = json.loads((tmp_path / "probe.json").read_text())["pid"]
    client.send_signal(how)
    assert client.wait(timeout=30) != 0
    deadline = time.monotonic() + 30
    while _running(copy):
        assert time.monotonic() < deadline, f"copy {copy} still runs after its job stopped"
        time.sleep(0.2)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # reaped by the server, or a zombie about to be
        return stat.read().split()[2] != "Z"


def test_where_the_server_is_started(monkeypatch):
    monkeypatch.setenv("QLORA_NUM_GPUS", "0")
    assert warm_start.wanted(True, local=True)
    assert not warm_start.wanted(False, local=True)
    assert not warm_start.wanted(True, local=False)  # a cluster's jobs run elsewhere
    monkeypatch.setenv("QLORA_NUM_GPUS", "1")
    assert not warm_start.wanted(True, local=True)  # CUDA does not survive a fork


def test_a_server_killed_before_its_stop_leaves_no_socket(tmp_path, monkeypatch):
    """A server killed outright (SIGKILL) cannot remove its socket: stop() does, once it has
    seen the server gone; a live server's socket is its own to remove."""
    address = tmp_path / "warm.sock"
    address.touch()
    monkeypatch.setenv(warm_start.SOCKET_VARIABLE, str(address))
    monkeypatch.setattr(warm_start, "_server", subprocess.Popen(["sleep", "60"]))
    warm_start._server.kill()
    warm_start._server.wait()
    warm_start.stop()
    assert not address.exists()
    address.touch()  # a server that was still running when stopped
    monkeypatch.setenv(warm_start.SOCKET_VARIABLE, str(address))
    monkeypatch.setattr(warm_start, "_server", subprocess.Popen(["sleep", "60"]))
    warm_start.stop()
    assert address.exists()


def test_a_server_still_importing_exits_when_its_workflow_is_gone(tmp_path):
    """Snakemake killed while the server imports: the server goes within a second, not when
    its (here 60 s) imports end, and makes no socket."""
    (tmp_path / "slow_import.py").write_text("import time\ntime.sleep(60)\n")
    gone = subprocess.Popen(["sleep", "1"])
    server = subprocess.Popen([sys.executable, "-c", (
        "import sys; sys.path.insert(0, sys.argv[1]); from qlora_pipeline.jobs import warm_start;"
        " warm_start.serve(sys.argv[2], watch_pid=int(sys.argv[3]), preload=('slow_import',))"),
        str(tmp_path), str(tmp_path / "warm.sock"), str(gone.pid)])
    gone.wait()
    try:
        assert server.wait(timeout=15) == 0
    finally:
        server.kill()
    assert not (tmp_path / "warm.sock").exists()


def test_the_tiny_run_used_the_server_and_stopped_it(tiny_run):
    logs = tiny_run / "results" / "logs"
    assert "warm start: serving" in (logs / "warm_start.log").read_text()
    assert not (tiny_run / warm_start.SOCKET_NAME).exists()
    warm = [p for p in logs.rglob("*.log") if "warm start)" in p.read_text()]
    assert any("evaluate" in str(p) for p in warm), "no evaluation ran in a warm-start copy"
