"""A training that stops itself before its job's time limit, with a checkpoint saved.

Under Slurm the job's end time is read from `squeue` (and read again every RECHECK_S, so that
`scontrol update TimeLimit=` is noticed). Once the time left is under the margin (the longest
step seen, plus the longest save seen after a step, plus a floor), the callback asks Trainer
for its own save and stop (control.should_save, should_training_stop), so the checkpoint is
an ordinary one; the job then exits with ResumeLater's status and its retry resumes.

SIGNAL is the backup (`sbatch --signal=URG@<secs>`, `scancel --signal=URG`): its handler only
sets a flag, acted on at the next step's end. SIGURG because its default action is to be
ignored: Slurm signals every process of the job step, and Snakemake and the shell that run
the stage would die of SIGUSR1, taking the training with them (docs/cluster.md).
Without Slurm there is no end time and nothing changes, unless ENV_VARIABLE gives one.
A training on several processes stops on all of them at the same step: the ranks agree at
each step's end (distributed.any_rank), and the job learns the stop from launch.STOPPED_ENV.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from datetime import datetime

from transformers import TrainerCallback

from . import distributed

log = logging.getLogger(__name__)

ENV_VARIABLE = "QLORA_TRAIN_DEADLINE"  # the end time in epoch seconds, without Slurm
SIGNAL = signal.SIGURG
RECHECK_S = 60.0  # how often the end time is read again
FLOOR_S = 20.0  # what the margin keeps beyond a step and a save: the exit, the log


def job_end_time() -> float | None:
    """The job's end time in epoch seconds: ENV_VARIABLE, else Slurm's for SLURM_JOB_ID;
    None where there is none (no Slurm, no time limit, squeue unreachable)."""
    if os.environ.get(ENV_VARIABLE):
        return float(os.environ[ENV_VARIABLE])
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%e"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
        return datetime.fromisoformat(out).timestamp()  # local time, as squeue prints it
    except (OSError, subprocess.TimeoutExpired, ValueError):  # "N/A", "Unknown", no squeue
        log.info("time limit: no end time for Slurm job %s; training runs to its end", job)
        return None


class Deadline(TrainerCallback):
    """Stops training at a step's end when the end time is nearer than the margin, or when
    SIGNAL came; `stopped` is then the step its checkpoint was saved at."""

    def __init__(self, end_time=job_end_time, clock=time.time):
        self.end_time, self.clock = end_time, clock
        self.end = None
        self.read_at = self.step_began = self.step_ended = 0.0
        self.longest_step = self.longest_save = 0.0
        self.signalled, self.saved_handler = False, None
        self.stopped: int | None = None

    def margin(self) -> float:
        return self.longest_step + self.longest_save + FLOOR_S

    def on_train_begin(self, args, state, control, **kwargs):
        self.saved_handler = signal.signal(SIGNAL, self._signalled)
        self.end, self.read_at = self.end_time(), self.clock()
        if self.end is not None:
            log.info("time limit: the job ends in %.0f s; training stops before it with a "
                     "checkpoint (or at signal %s)", self.end - self.read_at, SIGNAL.name)

    def on_train_end(self, args, state, control, **kwargs):
        signal.signal(SIGNAL, self.saved_handler)

    def _signalled(self, signum, _frame):
        self.signalled = True

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_began = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        now = self.step_ended = self.clock()
        self.longest_step = max(self.longest_step, now - self.step_began)
        if self.end is not None and now - self.read_at >= RECHECK_S:  # squeue down: kept
            self.end, self.read_at = self.end_time() or self.end, now
        near = self.end is not None and self.end - now <= self.margin()
        stop = (near or self.signalled) and state.global_step < state.max_steps
        if distributed.active():  # every rank stops at the same step
            stop = distributed.any_rank(stop, args.device)
        if stop:
            why = f"signal {SIGNAL.name}" if self.signalled else \
                f"{self.end - now:.0f} s left, margin {self.margin():.0f} s" if near else \
                "another process's time limit"
            log.info("time limit: stopping at step %d (%s); saving a checkpoint",
                     state.global_step, why)
            control.should_save = control.should_training_stop = True
            self.stopped = state.global_step

    def on_save(self, args, state, control, **kwargs):
        self.longest_save = max(self.longest_save, self.clock() - self.step_ended)
