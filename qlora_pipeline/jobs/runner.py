"""A stage run as a job: the one entry point of every rule (scripts/stage.py), of the stage
command (cli.py) and of the tests. The job holds its rule's declared inputs, outputs, params
and wildcards; it logs to the rule's log, takes the job's threads and GPU, settles the policy
(built once here and passed down), and owns the outputs: the stage writes into temporary
paths, which become the declared ones with a provenance.json only when it succeeds (outputs.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..core.errors import InputError, ResumeLater
from ..core.policy import Policy
from ..training import checkpoints
from . import gpus, launch, warm_start
from .code_digest import stage_source
from .environment import job_environment, logged_to
from .outputs import stage_outputs

log = logging.getLogger("qlora_pipeline")


@dataclasses.dataclass(frozen=True)
class Job:
    """One stage as its rule asked for it, in plain values (it is pickled to the warm-start
    server): what the stage reads, writes and is told, by the names the rule gives them."""
    rule: str
    inputs: dict
    outputs: dict
    params: dict
    wildcards: dict
    log_path: str | None = None
    threads: int = 1
    wants_gpu: bool = False  # see gpus.py
    warm: bool = False  # run by a warm-start copy (logged)
    stage: Callable | None = None  # the rule's stage function unless given (tests' probes)

    @property
    def function(self) -> Callable:
        return self.stage or stage_function(self.rule)

    @classmethod
    def from_snakemake(cls, smk) -> Job:
        """`params.code` (the code digest) only triggers reruns; it is recorded, not passed."""
        def plain(value):
            return str(value) if isinstance(value, (str, Path)) else [str(v) for v in value]

        job = cls(rule=smk.rule, inputs={k: plain(v) for k, v in smk.input.items()},
                  outputs={k: str(v) for k, v in smk.output.items()},
                  params={k: v for k, v in smk.params.items() if k != "code"},
                  wildcards=dict(smk.wildcards.items()),
                  log_path=str(smk.log[0]) if len(smk.log) else None, threads=smk.threads,
                  wants_gpu=int(smk.resources.get("gpu", 0) or 0) >= 1)
        names = [*job.inputs, *job.outputs, *job.params]
        repeated = [n for n in names if names.count(n) > 1]
        if repeated:
            raise ValueError(f"rule {job.rule}: {repeated[0]!r} names two of its inputs, "
                             f"outputs and params; expected distinct names")
        return job

    @classmethod
    def from_call(cls, rule: str, kwargs: dict, **settings) -> Job:
        """A job from keyword arguments (tests, the stage command): the stage's signature says
        which are inputs and outputs (stages/__init__.py), the rest are params. A stage that
        writes several files has a provenance.json beside them (`provenance`, or by default
        in the first one's folder)."""
        kwargs = dict(kwargs)
        provenance = kwargs.pop("provenance", None)
        kinds = argument_kinds(stage_function(rule))
        groups: dict[str, dict] = {"Input": {}, "Output": {}, "": {}}
        for name, value in kwargs.items():
            groups[kind_of(kinds, name)][name] = value
        outputs = {k: str(v) for k, v in groups["Output"].items()}
        if provenance or len(outputs) > 1:
            outputs["provenance"] = str(provenance or
                                        Path(next(iter(outputs.values()))).parent / "provenance.json")
        return cls(rule=rule, inputs=groups["Input"], outputs=outputs, params=groups[""],
                   wildcards={}, **settings)

    def run(self):
        """The job in its rule's log, threads and GPUs; returns what the stage returns."""
        gpu_count = max(1, launch.settings(self.params)["processes"])
        with logged_to(self.log_path), \
                (gpus.pinned_gpu(gpu_count) if self.wants_gpu else contextlib.nullcontext()), \
                job_environment(self.threads):
            # A job that declares no GPU runs on the CPU: its policy needs no torch (policy.py).
            policy = Policy.detect(self.threads) if self.wants_gpu else Policy.cpu(self.threads)
            log.info("rule %s: %s (threads: %s, device: %s, bf16: %s%s)", self.rule,
                     self.function.__name__, policy.threads, policy.device_name, policy.bf16,
                     ", warm start" if self.warm else "")
            result = self.execute(policy)
            log.info("rule %s: done (peak memory %.1f MB)", self.rule, policy.peak_memory_mb())
        return result

    def execute(self, policy: Policy):
        """The stage, here or on several processes through torchrun where its training is
        distributed (launch.py), writing into the outputs' temporary paths."""
        kept = self.params.get("checkpoints")  # a training's, held by one job at a time
        with checkpoints.locked(kept) if kept else contextlib.nullcontext():
            with stage_outputs(self, policy) as paths:
                if launch.needs_launch(self.params):
                    result = self.run_distributed(paths)
                else:
                    result = call(self.function, self.arguments(paths), policy)
            # The folder a job keeps outside its outputs until they land (an interrupted
            # training's checkpoints, which Snakemake must not delete before a rerun): nothing
            # left to resume.
            if kept:
                shutil.rmtree(kept, ignore_errors=True)
        return result

    def arguments(self, paths: dict) -> dict:
        """The stage's keyword arguments: inputs, the outputs' temporary paths, params, and
        the wildcards it names (where no input, output or param has the name)."""
        accepted = inspect.signature(self.function).parameters
        return {**{k: v for k, v in self.wildcards.items() if k in accepted}, **self.inputs,
                **{k: v for k, v in paths.items() if k != "provenance"}, **self.params}

    def run_distributed(self, paths: dict) -> None:
        """The stage on the job's processes (torchrun), which write to this job's log."""
        command = launch.command(self.rule, self.arguments(paths), self.threads)
        log.info("rule %s on %s processes: %s", self.rule,
                 launch.world_size(launch.settings(self.params)), " ".join(command[:6]))
        sys.stdout.flush()
        sys.stderr.flush()
        with tempfile.TemporaryDirectory(prefix="qlora-ranks-") as folder:
            stopped = Path(folder, "stopped")  # node-local: the ranks beside this torchrun
            status = subprocess.run(command, check=False, env={
                **os.environ, launch.STOPPED_ENV: str(stopped)}).returncode
            if stopped.exists():  # the ranks exited 0 (cli.stopped_status): no output
                raise ResumeLater(f"rule {self.rule}: its processes stopped together before "
                                  f"the job's time limit, a checkpoint saved; the job's retry "
                                  f"or a rerun resumes from it")
        if status:
            raise RuntimeError(f"rule {self.rule}: torchrun exited with status {status}; the "
                               f"failing rank's error is above in this log")


def call(stage: Callable, kwargs: dict, policy: Policy):
    """The stage function itself, given everything (also a torchrun rank's side: cli.py); its
    outputs as paths."""
    kinds = argument_kinds(stage)
    return stage(**{k: Path(v) if kind_of(kinds, k) == "Output" else v
                    for k, v in kwargs.items()}, policy=policy)


def run_script(smk) -> None:
    """Entry point of every rule (scripts/stage.py): the job runs in a copy of the warm-start
    server where one serves this workflow (warm_start.py), else here."""
    job = Job.from_snakemake(smk)
    status = warm_start.submit(job)
    if status is None:
        try:
            job.run()
        except ResumeLater:  # said in the log and on stderr already (logged_to)
            sys.exit(ResumeLater.EXIT_STATUS)
        except InputError:
            if not job.log_path:
                raise
            sys.exit(1)  # told in one line (environment.logged_to): no traceback after it
    elif status:
        sys.exit(status)  # the job's error is in its log and on this job's stderr already


def argument_kinds(stage) -> dict[str, str]:
    """{parameter: "Input", "Output" or "" (a param)} from a stage's annotations
    (stages/__init__.py); "**": the kind of any other name, where the stage takes them
    (`**written: Output`)."""
    kinds = {}
    for name, parameter in inspect.signature(stage).parameters.items():
        kind = str(parameter.annotation).split("[")[0]
        kind = kind.rstrip("s") if kind in ("Input", "Inputs", "Output") else ""
        kinds["**" if parameter.kind == parameter.VAR_KEYWORD else name] = kind
    return kinds


def kind_of(kinds: dict[str, str], name: str) -> str:
    return kinds.get(name, kinds.get("**", ""))


def stage_function(rule: str):
    """The stage function of a rule; imports only the stage module that defines it."""
    return getattr(importlib.import_module(stage_source(rule)[0]), rule)
