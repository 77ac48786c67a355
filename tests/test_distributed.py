"""One training job on several processes (train.distributed, jobs/launch.py): DDP over gloo on
the CPU with 2 processes trains what 1 process trains with the same global batch, through the
same job entry a rule uses (jobs/runner.Job -> torchrun -> the stage CLI on each rank)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_inputs, task_blocks, write_yaml
from safetensors.torch import load_file

from qlora_pipeline.jobs import launch
from qlora_pipeline.core.errors import InputError, ResumeLater
from qlora_pipeline.core.files import read_jsonl
from qlora_pipeline.jobs.runner import Job
from qlora_pipeline.training import checkpoints, deadline
from benchmarks.tiny_models import save_model

GLOBAL_BATCH = 8
STEPS = 8
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt_neox": "all-linear"}


@pytest.fixture(scope="module", params=["llama", "gpt_neox"])
def inputs(request, tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp(f"ddp-{request.param}")
    base = save_model(root / "base", tiny_tokenizer, request.param)
    quantized, tokenized = build_inputs(root, base)
    return root, quantized, tokenized, TARGETS[request.param]


def train(inputs, name: str, processes: int, strategy: str | None = None) -> Path:
    """train_qlora as its rule runs it, at batch GLOBAL_BATCH / processes per process."""
    root, quantized, tokenized, targets = inputs
    blocks = task_blocks()
    blocks["lora"]["target_modules"] = targets
    assert blocks["lora"]["dropout"] == 0  # DDP ranks would draw different dropout masks
    strategy = strategy or ("ddp" if processes > 1 else "none")
    settings = {**blocks["train"], "max_steps": STEPS, "eval_steps": 4, "logging_steps": 1,
                "batch_size": GLOBAL_BATCH // processes, "learning_rate": 0.005,
                "distributed": {"strategy": strategy, "processes": processes, "nodes": 1}}
    adapter = root / "out" / name
    Job.from_call("train_qlora", {
        "quantized": str(quantized), "tokenized": str(tokenized), "adapter": str(adapter),
        "lora": blocks["lora"], "train": settings, "seed": 0,
        "checkpoints": str(root / "checkpoints" / name), "trackers": None},
        log_path=str(root / f"{name}.log"), threads=2).run()
    return adapter


def trained(inputs, name: str, processes: int) -> Path:
    """An uninterrupted run, made once per module and base (two tests compare with it)."""
    adapter = inputs[0] / "out" / name
    return adapter if (adapter / "summary.json").exists() else train(inputs, name, processes)


def curve(adapter: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_jsonl(adapter / "metrics.jsonl") if key in r}


def test_two_processes_train_what_one_process_trains(inputs):
    one, two = trained(inputs, "one", 1), trained(inputs, "two", 2)
    for key in ("loss", "eval_loss", "grad_norm"):
        a, b = curve(one, key), curve(two, key)
        assert sorted(a) == sorted(b) and len(a) >= 3, key  # each step logged once, by rank 0
        gap = max(abs(a[s] - b[s]) for s in a)
        assert gap < 1e-3, f"{key}: 1 vs 2 processes differ by {gap}"
    a = load_file(one / "adapter_model.safetensors")
    b = load_file(two / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    assert any(v.abs().max() > 0 for k, v in b.items() if "lora_B" in k)  # it trained
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch"] == GLOBAL_BATCH
    assert json.loads((one / "summary.json").read_text())["processes"] == 1
    log = (inputs[0] / "two.log").read_text()
    assert "INFO rank 1 " in log and "INFO rank 0 " in log  # both ranks ran, into the log
    # Only rank 0's output lands; the other rank's throwaway folder is gone.
    assert {"one", "two"} <= {p.name for p in two.parent.iterdir()} <= {"one", "two", "stopped"}
    assert not list(two.parent.parent.glob("**/.rank*"))


@pytest.mark.parametrize("inputs", ["llama"], indirect=True)
def test_both_processes_stop_before_the_time_limit_and_the_rerun_resumes(inputs, monkeypatch):
    """The job's end time near (QLORA_TRAIN_DEADLINE, as squeue's under Slurm): both ranks stop
    at step 1's end, one checkpoint saved for both (each rank's RNG state in it), and the job
    ends in ResumeLater (its status 75), not torchrun's failure; the rerun resumes from the
    checkpoint to the uninterrupted 2-process run's adapter and curve."""
    monkeypatch.setenv(deadline.ENV_VARIABLE, str(time.time() + 5))
    with pytest.raises(ResumeLater, match="stopped together before the job's time limit"):
        train(inputs, "stopped", 2)
    log = (inputs[0] / "stopped.log").read_text()
    for rank in (0, 1):
        assert re.search(rf"rank {rank} \S+ time limit: stopping at step 1 ", log), log[-3000:]
    assert "Traceback" not in log
    saved, = (inputs[0] / "checkpoints" / "stopped").glob("*/checkpoint-*")
    assert saved.name == "checkpoint-1" and checkpoints.verify(saved) is None
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in saved.iterdir()}
    assert not (inputs[0] / "out" / "stopped").exists()

    monkeypatch.delenv(deadline.ENV_VARIABLE)
    resumed, two = train(inputs, "stopped", 2), trained(inputs, "two", 2)
    assert json.loads((resumed / "summary.json").read_text())["resumed_from"] == str(saved)
    a = load_file(resumed / "adapter_model.safetensors")
    b = load_file(two / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert curve(resumed, "loss") == curve(two, "loss")


@pytest.mark.parametrize("inputs", ["llama"], indirect=True)  # the refusal is the machine's
def test_fsdp_is_refused_on_the_cpu(inputs, monkeypatch):
    """On the CPU accelerate would run FSDP as plain DDP: the job refuses rather than claim a
    sharding it does not do, and leaves no output. (The ranks see no GPU here on any machine:
    CUDA_VISIBLE_DEVICES is empty.)"""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(RuntimeError, match="torchrun exited"):
        train(inputs, "fsdp", 2, strategy="fsdp")
    assert "found fsdp on a machine without CUDA" in (inputs[0] / "fsdp.log").read_text()
    assert not (inputs[0] / "out" / "fsdp").exists()


def test_the_torchrun_command():
    kwargs = {"adapter": "results/adapters/7", "seed": 0,
              "train": {"distributed": {"strategy": "ddp", "processes": 2, "nodes": 1}}}
    command = launch.command("train_qlora", kwargs, threads=4, env={})
    assert command[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=2" in command and "--threads=2" in command  # 4 cores shared out
    # Every value is JSON: a path that reads as a number stays a string.
    assert 'adapter="results/adapters/7"' in command and "seed=0" in command
    assert launch.needs_launch(kwargs, env={}) and not launch.needs_launch(kwargs, env={
        "LOCAL_RANK": "0"})  # a rank does not launch again
    assert not launch.needs_launch({"train": {"distributed": launch.SINGLE}}, env={})
    assert not launch.needs_launch({"seed": 0}, env={})  # a stage without training

    kwargs["train"]["distributed"]["nodes"] = 2
    with pytest.raises(InputError, match="outside a Slurm job"):
        launch.command("train_qlora", kwargs, threads=4, env={})
    env = {"SLURM_JOB_ID": "77", "MASTER_ADDR": "node-a"}
    command = launch.command("train_qlora", kwargs, threads=8, env=env)
    assert command[:5] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--overlap",
                           "--kill-on-bad-exit=1"]
    assert "--nnodes=2" in command and "--rdzv-endpoint=node-a:29500" in command
    assert "--rdzv-id=77" in command and "--threads=4" in command


def test_the_rule_asks_for_a_gpu_and_its_cores_per_process(workdir, run_snakemake):
    """train.distributed.processes = 2: the training jobs (and recovery) ask Snakemake for
    two GPUs and twice the model threads; the other model jobs keep one GPU."""
    path = workdir / "config" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["defaults"]["train"]["distributed"] = {"strategy": "ddp", "processes": 2}
    write_yaml(path, config)
    out = run_snakemake(workdir, "-n", "--cores", "4", "--resources", "gpu=2").stdout
    jobs = {}
    for block in out.split("\nrule ")[1:]:
        name = block.split(":", 1)[0]
        resources = re.search(r"resources: (.*)", block).group(1)
        threads = re.search(r"threads: (\d+)", block)
        jobs.setdefault(name, set()).add((resources, int(threads.group(1)) if threads else 1))
    for name in ("train_qlora", "recover"):
        assert all("gpu=2" in r and "nodes=1" in r and t == 4 for r, t in jobs[name]), jobs[name]
    assert all("gpu=1" in r and t == 2 for r, t in jobs["merge"]), jobs["merge"]
