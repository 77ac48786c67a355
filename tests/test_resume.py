"""A training job killed with SIGKILL resumes from its last checkpoint that verifies when
snakemake is run again (a damaged newest one is discarded), and ends with the same adapter as
an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file

from conftest import REPO, snakemake

TARGET = "results/adapters/topic/qlora"
TRAIN = {"max_steps": 32, "eval_steps": 4, "batch_size": 4, "logging_steps": 1}


def longer_training(workdir) -> None:
    path = workdir / "config/tasks/topic.yaml"
    task = yaml.safe_load(path.read_text())
    task["train"] = TRAIN
    path.write_text(yaml.safe_dump(task))


def start(workdir) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(workdir), "--configfile", str(workdir / "config/config.yaml"),
           "--cores", "1", "--resources", "gpu=1", "--workflow-profile", "none", TARGET]
    # Its own process group, so that the kill takes the job's Python process too, as a
    # crashed node would.
    return subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def kill_at_checkpoint(workdir, step: int, timeout: float = 300) -> None:
    process = start(workdir)
    deadline = time.time() + timeout
    root = workdir / "results/checkpoints/topic/qlora"
    while time.time() < deadline and process.poll() is None:
        if any((d / f"checkpoint-{step}" / "manifest.json").exists()  # written last
               for d in root.glob("*")):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    pytest.fail(f"training ended or timed out before checkpoint-{step}")


def losses(workdir) -> list:
    return [(m["step"], m["loss"]) for m in map(json.loads, (workdir / TARGET / "metrics.jsonl")
                                                 .read_text().splitlines()) if "loss" in m]


def adapter(workdir) -> dict:
    return load_file(workdir / TARGET / "adapter_model.safetensors")


def test_killed_training_resumes_and_matches_an_uninterrupted_run(copy_run):
    reference, interrupted = copy_run("reference"), copy_run("interrupted")
    for workdir in (reference, interrupted):
        longer_training(workdir)
    snakemake(reference, TARGET)

    # Killed once a random checkpoint and a later one are saved; a bit of the later one's
    # adapter weights or optimizer state flips: the resume discards it and takes the newest
    # that verifies.
    chance = random.Random()
    step = chance.choice(range(8, 24, 4))
    kill_at_checkpoint(interrupted, step + 4)
    assert not (interrupted / TARGET).exists()  # a killed job leaves no adapter behind
    root = interrupted / "results/checkpoints/topic/qlora"
    newest = next(root.glob(f"*/checkpoint-{step + 4}"))
    damaged = chance.choice(["adapter_model.safetensors", "optimizer.pt"])
    data = bytearray((newest / damaged).read_bytes())
    data[len(data) // 2] ^= 0x01
    (newest / damaged).write_bytes(bytes(data))
    previous = max(int(p.name.rsplit("-", 1)[1]) for p in newest.parent.glob("checkpoint-*")
                   if p != newest and (p / "manifest.json").exists())  # or an older best
    # Checkpoints under another key (made under another configuration: other settings or
    # inputs), whole and verifying: discarded, never resumed from.
    other = root / ("0" * 16)
    shutil.copytree(newest.parent, other)
    snakemake(interrupted, "--unlock")
    snakemake(interrupted, TARGET, "--rerun-incomplete")

    log = (interrupted / "results/logs/train_qlora/topic/qlora.log").read_text()
    assert f"discarding checkpoints {other.relative_to(interrupted)}: made under another " \
           "configuration" in log
    assert f"discarding checkpoint {newest.relative_to(interrupted)}: {damaged}: sha256" in log
    resumed = log.split("resuming from ")[1].split("\n")[0]
    assert resumed.endswith(f"{newest.parent.name}/checkpoint-{previous}"), resumed
    summary = yaml.safe_load((interrupted / TARGET / "summary.json").read_text())
    assert summary["resumed_from"] and summary["steps"] == TRAIN["max_steps"]
    want, got = adapter(reference), adapter(interrupted)
    assert want.keys() == got.keys()
    for name in want:  # bitwise: CPU training is deterministic and Trainer restores RNG state
        assert (want[name] == got[name]).all(), name
    metrics = [json.loads(line) for line in
               (interrupted / TARGET / "metrics.jsonl").read_text().splitlines()]
    train_steps = [m["step"] for m in metrics if "loss" in m]
    assert len(train_steps) == len(set(train_steps))  # redone steps are not logged twice
    # The losses too (Trainer's running loss came back with the checkpoint: loop.CarriedLoss)
    reference_summary = json.loads((reference / TARGET / "summary.json").read_text())
    assert summary["train_loss"] == reference_summary["train_loss"]
    assert losses(interrupted) == losses(reference)
    assert not root.exists() or not any(root.iterdir())
