"""Workstation GPU pinning: each concurrent GPU job gets a GPU of its own (a distributed
training job, as many as it has processes).

Snakemake counts GPUs (`--resources gpu=N` lets at most N jobs that declare `gpu=1` run at
once) but does not say which GPU a job should use: without pinning, every job would run on
GPU 0. A job that declares a GPU claims one here for the duration of its stage: it takes an
exclusive `flock` on one lock file per GPU index (`gpu-<i>.lock` in the lock directory) and
sets `CUDA_VISIBLE_DEVICES` to that index before CUDA is initialised. When every GPU is
claimed, it waits until one is released. The kernel drops an flock when its holder exits, so
a job that crashes or is killed frees its GPU.

Nothing is pinned
- when `CUDA_VISIBLE_DEVICES` is already set (the user's or a launcher's choice stands),
- under Slurm (`SLURM_JOB_ID` set): the scheduler has assigned the job its GPUs,
- when there is no GPU (no `nvidia-smi`, or it lists none).

Environment:
- `QLORA_NUM_GPUS`: the number of GPUs, instead of asking `nvidia-smi -L` (tests, simulation).
- `QLORA_GPU_LOCK_DIR`: where the lock files are (default `/tmp/qlora-gpu-locks-<uid>`).
  Every run that should share the GPUs must use the same directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

NUM_GPUS_ENV = "QLORA_NUM_GPUS"
LOCK_DIR_ENV = "QLORA_GPU_LOCK_DIR"


def lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV) or f"/tmp/qlora-gpu-locks-{os.getuid()}")


def gpu_count() -> int:
    """GPUs on this machine: $QLORA_NUM_GPUS, else the lines of `nvidia-smi -L`, else 0."""
    override = os.environ.get(NUM_GPUS_ENV)
    if override:
        # Decimal digits alone (int() takes them all): a sign, a fraction or a word is refused.
        if not override.strip().isdecimal():
            raise ValueError(f"{NUM_GPUS_ENV}={override!r}: expected a whole number, 0 or more")
        return int(override)
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


# Model jobs side by side on a machine without a GPU, each with its share of the cores: torch's
# training step gains only ~1.55x from a second core, so two one-core jobs do more than one
# two-core job (the default run on 2 cores: 7.2 min against 9.6; docs/performance.md).
CPU_MODEL_SLOTS = 2


def model_slots() -> int:
    """What `--resources gpu=N` should say on this machine: its GPUs, one model job each; on a
    CPU-only machine CPU_MODEL_SLOTS (no GPU is pinned there; N only shares out the cores)."""
    return gpu_count() or CPU_MODEL_SLOTS


def skip_reason(env=os.environ) -> str | None:
    """Why this process must not pin a GPU, or None when it should."""
    if env.get("SLURM_JOB_ID"):
        return (f"Slurm job {env['SLURM_JOB_ID']}: the scheduler's GPU assignment stands "
                f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
    if "CUDA_VISIBLE_DEVICES" in env:
        return f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r} is already set"
    return None


class GpuClaim(contextlib.AbstractContextManager):
    """An exclusive claim on one GPU index; released by `release()` (or leaving its `with`
    block: AbstractContextManager's __enter__ returns the claim) or by process exit."""

    def __init__(self, index: int, handle):
        self.index = index
        self._handle = handle

    def release(self) -> None:
        if not self._handle.closed:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()

    def __exit__(self, *exc) -> None:
        self.release()


def _try_lock(path: Path):
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    except BaseException:
        handle.close()
        raise
    # Who holds it, for a person looking at the lock directory (not read by the code); in
    # append mode the write lands at the end, which truncate(0) has moved to the start.
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    handle.flush()
    return handle


def claim_many(num_gpus: int, count: int, *, poll_s: float = 0.5,
               timeout_s: float | None = None) -> list[GpuClaim]:
    """Claim `count` free GPUs among `num_gpus` at once (a distributed training's), waiting
    until that many are free. A partial claim is released before waiting, so two jobs that
    each hold some GPUs never wait for each other. `count` is 1 or more (Job.run), so this
    refuses a machine without GPUs too."""
    if count > num_gpus:
        raise ValueError(f"a job asks for {count} GPUs; this machine has {num_gpus} "
                         f"(train.distributed.processes must not exceed it)")
    directory = lock_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    for attempt in itertools.count():
        held = []
        for index in range(num_gpus):
            handle = _try_lock(directory / f"gpu-{index}.lock")
            if handle is not None:
                held.append(GpuClaim(index, handle))
                if len(held) == count:
                    return held
        for gpu in held:
            gpu.release()
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"no {count} GPU(s) of {num_gpus} free after {timeout_s}s "
                               f"(locks in {directory})")
        if attempt == 0:
            log.info("fewer than %d of %d GPUs are free (locks in %s); waiting", count,
                     num_gpus, directory)
        time.sleep(poll_s)


@contextlib.contextmanager
def pinned_gpu(count: int = 1, **claim_kwargs) -> Iterator[int | None]:
    """Claim `count` GPUs (one unless a training is distributed) and expose only them to CUDA
    for the duration of the block.

    Yields the first GPU index, or None where nothing is pinned (see the module docstring).
    """
    reason = skip_reason()
    total = 0 if reason else gpu_count()
    if total == 0:
        log.info("GPU pinning skipped: %s", reason or "no GPU found")
        yield None
        return
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        log.warning("CUDA was initialised before the GPU was pinned; "
                    "CUDA_VISIBLE_DEVICES will not take effect in this process")
    claims = claim_many(total, count, **claim_kwargs)
    visible = ",".join(str(gpu.index) for gpu in claims)
    os.environ["CUDA_VISIBLE_DEVICES"] = visible
    log.info("pinned to GPU %s of %d (CUDA_VISIBLE_DEVICES=%s)", visible, total, visible)
    try:
        yield claims[0].index
    finally:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        for gpu in claims:
            gpu.release()
