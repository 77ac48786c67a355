"""What every stage job shares: its log file, its threads and GPU, its runtime policy (built
once here and passed down), and the seed."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import random
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from . import gpus, launch, memory, warm_start
from .errors import InputError
from .policy import Policy

log = logging.getLogger("qlora_pipeline")


def seed_everything(seed: int) -> None:
    import numpy as np  # only the stages that seed need it; the import costs a data job ~0.1 s

    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass


@contextlib.contextmanager
def logged_to(log_path: str | Path | None):
    """Send this process's stdout/stderr (progress bars, library warnings too) to the rule's log.

    Redirecting the file descriptors rather than sys.stdout catches what C extensions and
    subprocesses print as well. A failure is also echoed to the terminal, so the user sees the
    error without opening the log.
    """
    if not log_path:
        yield
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    saved_err = os.dup(2)
    saved_out = os.dup(1)
    with open(log_path, "a", buffering=1, encoding="utf-8") as handle:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr, force=True,
        )
        try:
            yield
        except BaseException as err:
            sys.stderr.flush()
            message = str(err) if isinstance(err, InputError) else traceback.format_exc()
            print(message, file=sys.stderr, flush=True)
            os.write(saved_err, f"\nerror: {err}\n(full log: {log_path})\n".encode())
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# torch puts CPU allocations of 2 MB and more on transparent huge pages. A training step
# allocates several 60-100 MB buffers (logits and their gradients) that glibc maps afresh
# each time; with 4 KB pages faulting them in cost ~0.5 s of kernel time per step on a 2-core
# CPU and made step times vary by ±20% (docs/benchmarks.md). A user's own setting wins.
ALLOCATOR_VARIABLES = {"THP_MEM_ALLOC_ENABLE": "1"}


@contextlib.contextmanager
def job_environment(threads: int):
    """Torch uses the job's `threads:` whatever the environment said (through the variables
    torch reads when it is imported, and directly if it already is), and huge pages for large
    CPU buffers (read lazily by torch). Restored afterwards."""
    threads = max(1, int(threads))
    wanted = {**{k: os.environ.get(k, v) for k, v in ALLOCATOR_VARIABLES.items()},
              **{name: str(threads) for name in THREAD_VARIABLES}}
    saved = {name: os.environ.get(name) for name in wanted}
    torch = sys.modules.get("torch")
    saved_torch = torch.get_num_threads() if torch else None
    os.environ.update(wanted)
    if torch:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if saved_torch is not None:
            torch.set_num_threads(saved_torch)


def stage_arguments(smk, stage: Callable[..., object]) -> dict:
    """The rule's named inputs, outputs and params, by the names the rule gives them, and the
    wildcards the stage takes. `params.code` (the code digest) only triggers reruns."""
    groups = {"input": smk.input.items(), "output": smk.output.items(),
              "params": [(k, v) for k, v in smk.params.items() if k != "code"]}
    kwargs: dict = {}
    for group, items in groups.items():
        for name, value in items:
            if name in kwargs:
                raise ValueError(f"rule {smk.rule}: {group} '{name}' repeats a name; expected "
                                 f"the rule's inputs, outputs and params to have distinct names")
            kwargs[name] = value
    accepted = inspect.signature(stage).parameters
    kwargs.update({k: v for k, v in smk.wildcards.items() if k in accepted and k not in kwargs})
    return kwargs


@dataclasses.dataclass(frozen=True)
class Job:
    """One stage run as its rule asked: what runs it (here, or a warm-start copy) needs only
    this, so it holds plain values (it is pickled to the warm-start server)."""
    rule: str
    stage: Callable[..., object]
    kwargs: dict
    log_path: str | None
    threads: int
    wants_gpu: bool  # see gpus.py
    warm: bool = False  # run by a warm-start copy (logged)

    @classmethod
    def from_snakemake(cls, smk, stage: Callable[..., object]) -> Job:
        return cls(rule=smk.rule, stage=stage, kwargs=stage_arguments(smk, stage),
                   log_path=str(smk.log[0]) if len(smk.log) else None, threads=smk.threads,
                   wants_gpu=int(smk.resources.get("gpu", 0) or 0) >= 1)

    def run(self) -> None:
        """Log to the rule's log, take the job's threads (and its own GPUs where the rule
        declares them), settle the policy, run the stage: here, or on several processes
        through torchrun where its training is distributed (launch.py)."""
        gpu_count = max(1, launch.settings(self.kwargs)["processes"])
        with logged_to(self.log_path), \
                (gpus.pinned_gpu(gpu_count) if self.wants_gpu else contextlib.nullcontext()), \
                job_environment(self.threads):
            if launch.needs_launch(self.kwargs):
                self.run_distributed()
                return
            # A job that declares no GPU runs on the CPU: its policy needs no torch (policy.py).
            policy = Policy.detect(self.threads) if self.wants_gpu else Policy.cpu(self.threads)
            log.info("rule %s: %s (threads: %s, device: %s, bf16: %s%s)", self.rule,
                     self.stage.__name__, policy.threads, policy.device_name, policy.bf16,
                     ", warm start" if self.warm else "")
            self.stage(**self.kwargs, policy=policy)
            log.info("rule %s: done (peak memory %.1f MB)", self.rule,
                     memory.peak_mb(policy.device))

    def run_distributed(self) -> None:
        """The stage on the job's processes (torchrun), which write to this job's log."""
        import subprocess

        command = launch.command(self.rule, self.kwargs, self.threads)
        log.info("rule %s: %s on %s processes: %s", self.rule, self.stage.__name__,
                 launch.world_size(launch.settings(self.kwargs)), " ".join(command[:6]))
        sys.stdout.flush()
        sys.stderr.flush()
        status = subprocess.run(command, check=False).returncode
        if status:
            raise RuntimeError(f"rule {self.rule}: torchrun exited with status {status}; the "
                               f"failing rank's error is above in this log")
        log.info("rule %s: done", self.rule)


def run_script(smk, stage: Callable[..., object]) -> None:
    """Entry point of every scripts/*.py: the job runs in a copy of the warm-start server
    where one serves this workflow (warm_start.py), else here."""
    job = Job.from_snakemake(smk, stage)
    status = warm_start.submit(job)
    if status is None:
        job.run()
    elif status:
        sys.exit(status)  # the job's error is in its log and on this job's stderr already
