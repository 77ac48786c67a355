"""Step timing inside a worker process (imports transformers: workers only)."""

from __future__ import annotations

import itertools
import time

from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """The wall time between the ends of consecutive optimizer steps, so that everything a
    step costs (data, logging, callbacks) counts. The first step has no start mark; the
    `warmup` steps after it are left out too."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def seconds_per_step(self) -> list[float]:
        ends = self.ends[self.warmup:]
        return [b - a for a, b in itertools.pairwise(ends)]

    def measured_steps(self) -> range:
        """0-based indices of the steps whose times seconds_per_step gives."""
        return range(self.warmup + 1, len(self.ends))
