"""The time-limit callback (training/deadline.py) on a fake clock and end time: when it stops
a training, and that it never does without an end time. No Trainer, no Slurm."""

from __future__ import annotations

import os
import signal

import pytest
from transformers import TrainerControl, TrainerState

from qlora_pipeline.training import deadline
from qlora_pipeline.training.deadline import FLOOR_S, Deadline


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def run(callback: Deadline, clock: Clock, steps: int, step_s: float, save_every: int = 0,
        save_s: float = 0.0, max_steps: int = 100) -> tuple[int | None, TrainerControl]:
    """Steps of `step_s` seconds (a save of `save_s` after every `save_every`-th) until the
    callback stops them; the step it stopped at (None: it never did)."""
    state, control = TrainerState(max_steps=max_steps), TrainerControl()
    callback.on_train_begin(None, state, control)
    for step in range(1, steps + 1):
        callback.on_step_begin(None, state, control)
        clock.now += step_s
        state.global_step = step
        callback.on_step_end(None, state, control)
        if control.should_training_stop:
            break
        if save_every and step % save_every == 0:
            clock.now += save_s
            callback.on_save(None, state, control)
    callback.on_train_end(None, state, control)
    return callback.stopped, control


def test_no_end_time_never_stops():
    clock = Clock()
    stopped, control = run(Deadline(end_time=lambda: None, clock=clock), clock, 50, 600.0)
    assert stopped is None and not control.should_save and not control.should_training_stop


def test_stops_once_the_time_left_is_under_a_step_plus_the_floor():
    clock = Clock()
    end = clock.now + 100.0  # steps of 10 s: after step k, 100 - 10k s are left
    stopped, control = run(Deadline(end_time=lambda: end, clock=clock), clock, 50, 10.0)
    # margin = 10 + FLOOR_S (20): the first step end with at most 30 s left is step 7
    assert FLOOR_S == 20.0 and stopped == 7
    assert control.should_save and control.should_training_stop  # Trainer's own save


def test_the_longest_save_widens_the_margin():
    clock = Clock()
    end = clock.now + 200.0  # steps of 10 s, a 40 s save after every second step
    stopped, _ = run(Deadline(end_time=lambda: end, clock=clock), clock, 50, 10.0,
                     save_every=2, save_s=40.0)
    # step k ends at 10k + 40 * ((k - 1) // 2); margin 10 + 40 + 20 = 70: 200 - 130 at k = 5
    assert stopped == 5


def test_a_later_time_limit_is_read_again(monkeypatch):
    monkeypatch.setattr(deadline, "RECHECK_S", 30.0)
    clock = Clock()
    start = clock.now
    # squeue fails at the second read (the end time stays), then scontrol update
    ends = iter([start + 10_000.0, None, start + 100.0])
    stopped, _ = run(Deadline(end_time=lambda: next(ends), clock=clock), clock, 50, 10.0)
    # read at the start, at step 3 (30 s), and at step 6 (60 s, now 100 s away): 40 s left
    # is over the 30 s margin; step 7 leaves 30 s
    assert stopped == 7


def test_not_at_the_last_step():
    clock = Clock()
    end = clock.now + 15.0
    stopped, control = run(Deadline(end_time=lambda: end, clock=clock), clock, 1, 10.0,
                           max_steps=1)
    assert stopped is None and not control.should_training_stop


def test_the_signal_stops_at_the_next_step_end():
    clock = Clock()
    callback = Deadline(end_time=lambda: None, clock=clock)
    state, control = TrainerState(max_steps=100), TrainerControl()
    before = signal.getsignal(deadline.SIGNAL)
    callback.on_train_begin(None, state, control)
    state.global_step = 3
    os.kill(os.getpid(), deadline.SIGNAL)  # handled: the flag only
    assert not control.should_training_stop
    callback.on_step_end(None, state, control)
    assert callback.stopped == 3 and control.should_save and control.should_training_stop
    callback.on_train_end(None, state, control)
    assert signal.getsignal(deadline.SIGNAL) == before


@pytest.mark.parametrize("printed, expected", [
    ("2026-12-07T03:10:00\n", "2026-12-07T03:10:00"), ("N/A\n", None), ("Unknown\n", None)])
def test_slurm_end_time_from_squeue(tmp_path, monkeypatch, printed, expected):
    from datetime import datetime

    squeue = tmp_path / "squeue"
    squeue.write_text(f"#!/bin/sh\n[ \"$3\" = 42 ] && printf '{printed}'\n")
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv(deadline.ENV_VARIABLE, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    want = expected and datetime.fromisoformat(expected).timestamp()
    assert deadline.job_end_time() == want
    monkeypatch.delenv("SLURM_JOB_ID")
    assert deadline.job_end_time() is None  # not under Slurm
    monkeypatch.setenv(deadline.ENV_VARIABLE, "1234.5")
    assert deadline.job_end_time() == 1234.5
