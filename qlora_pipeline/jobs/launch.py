"""One training job on several processes: the config's `train.distributed` checked, and the
torchrun command that starts the stage on each process (torch-free: read at parse time and by
the job before anything heavy is imported).

torchrun does the launching (ranks, rendezvous, a failed rank stops the others); this module
only writes its command line. Each process runs the stage through the stage CLI
(`python -m qlora_pipeline.cli <rule> name=value ...`); rank 0 writes the outputs
(training/distributed.py).
"""

from __future__ import annotations

import json
import os
import sys

from ..core.errors import InputError

SINGLE = {"strategy": "none", "processes": 1, "nodes": 1}
PORT = 29500  # torchrun's default rendezvous port on the first node (multi-node)
# The file a rank creates when its training stopped before the job's time limit (ResumeLater),
# then exiting 0 (cli.stopped_status): the job learns the stop from the file, not torchrun's
# status.
STOPPED_ENV = "QLORA_STOPPED_FILE"


def settings(kwargs: dict) -> dict:
    """The job's distributed settings: its `train` param's, else one process."""
    train = kwargs.get("train")
    return {**SINGLE, **(train.get("distributed") or {})} if isinstance(train, dict) else SINGLE


def world_size(distributed: dict) -> int:
    return distributed["processes"] * distributed["nodes"]


def is_worker(env=os.environ) -> bool:
    """Whether this process is one that torchrun started (it must not launch again)."""
    return "LOCAL_RANK" in env


def needs_launch(kwargs: dict, env=os.environ) -> bool:
    distributed = settings(kwargs)
    return distributed["strategy"] != "none" and world_size(distributed) > 1 \
        and not is_worker(env)


def rendezvous(distributed: dict, env=os.environ) -> list[str]:
    """One node: torchrun's standalone mode (a free local port). Several: every node's torchrun
    meets at the first node of the Slurm allocation, the job id naming the rendezvous."""
    if distributed["nodes"] == 1:
        return ["--standalone"]
    if "SLURM_JOB_ID" not in env:
        raise InputError(f"train.distributed.nodes: found {distributed['nodes']} outside a "
                         f"Slurm job; expected nodes 1 on a workstation (several nodes are "
                         f"started by Slurm: docs/cluster.md)")
    return [f"--nnodes={distributed['nodes']}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={first_node(env)}:{PORT}", f"--rdzv-id={env['SLURM_JOB_ID']}"]


def first_node(env) -> str:
    """The first host of the Slurm allocation (`scontrol show hostnames` expands its list)."""
    import subprocess

    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    return subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]],
                          capture_output=True, text=True, check=True).stdout.split()[0]


def command(rule: str, kwargs: dict, threads: int, env=os.environ) -> list[str]:
    """torchrun (as `python -m torch.distributed.run`, the same interpreter) running the
    stage CLI on each process with the job's threads shared out; on several nodes, one
    torchrun per node through `srun` inside the job's allocation. Every value is passed as
    JSON, so a string that looks like a number stays a string."""
    distributed = settings(kwargs)
    per_process = max(1, threads // distributed["processes"])
    arguments = [f"{name}={json.dumps(value, default=str)}" for name, value in kwargs.items()]
    torchrun = [sys.executable, "-m", "torch.distributed.run", *rendezvous(distributed, env),
                f"--nproc-per-node={distributed['processes']}",
                "-m", "qlora_pipeline.cli", f"--threads={per_process}", rule, *arguments]
    if distributed["nodes"] == 1:
        return torchrun
    # The executor runs the job as one task (`srun -n1`); a step of one task per node
    # starts the other nodes' torchrun (--overlap: beside the job's own step).
    return ["srun", f"--nodes={distributed['nodes']}", "--ntasks-per-node=1", "--overlap",
            "--kill-on-bad-exit=1", *torchrun]
