"""The process a job runs in: its output into the rule's log, and its threads and allocator
settings for torch."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from pathlib import Path

from ..core.errors import InputError, ResumeLater


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
    saved = {fd: os.dup(fd) for fd in (1, 2)}  # stdout, stderr
    with open(log_path, "a", buffering=1, encoding="utf-8") as handle:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in saved:
            os.dup2(handle.fileno(), fd)
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr, force=True,
        )
        try:
            yield
        except BaseException as err:
            sys.stderr.flush()
            one_line = isinstance(err, (InputError, ResumeLater))
            message = str(err) if one_line else traceback.format_exc()
            with contextlib.suppress(OSError):  # a full disk may hold the log too
                print(message, file=sys.stderr, flush=True)
            os.write(saved[2], f"\nerror: {err}\n(full log: {log_path})\n".encode())
            raise
        finally:
            with contextlib.suppress(OSError):  # (the job's own error stands)
                sys.stdout.flush()
                sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)


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
    saved = {name: os.environ[name] for name in wanted if name in os.environ}
    torch = sys.modules.get("torch")
    saved_torch = torch.get_num_threads() if torch else None
    os.environ.update(wanted)
    if torch:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        for name in wanted:
            os.environ.pop(name, None)
        os.environ.update(saved)
        if saved_torch is not None:
            torch.set_num_threads(saved_torch)
