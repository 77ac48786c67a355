"""Warm start: jobs forked from a process that has imported the libraries already.

On a CPU a small model's job spends 6-11 s importing torch, transformers, PEFT, bitsandbytes
and lm-eval before it does any work, and the default run has some twenty such jobs. When the
workflow runs its jobs on this machine and sees no GPU, the Snakefile's `onstart` starts this
module beside Snakemake (`start`). It imports those libraries once (no project code, so that
an edit to the pipeline still reaches the next job) and waits on a Unix socket under
.snakemake/. Each job's script (runtime.run_script) sends it the job: the stage and its
arguments, the job's environment, working directory and standard streams. The server forks;
the copy becomes the job (same streams, variables, directory, threads) and reports its exit
status to the script, which exits with it. A job that cannot reach the server, or runs under
another interpreter (a conda env of its own), runs itself as before, so the server is only
ever a shortcut: the outputs are the same either way (tests/test_warm_start.py).

Written by hand: multiprocessing's forkserver serves only the program that started it, not
separate processes such as Snakemake's jobs.

Not where a GPU is visible: bitsandbytes queries CUDA when it is imported, and a CUDA context
does not survive a fork. Not under a cluster executor: its jobs run on other machines.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

log = logging.getLogger(__name__)

SOCKET_VARIABLE = "QLORA_WARM_START_SOCKET"  # set by `start` for the jobs Snakemake spawns
SOCKET_NAME = ".snakemake/qlora-warm-start.sock"
# What the model stages import; each one is optional (a data env has none of them).
PRELOAD = (
    "numpy", "torch", "transformers", "transformers.modeling_utils", "transformers.trainer",
    "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto",
    "safetensors.torch", "bitsandbytes", "peft", "datasets", "lm_eval.evaluator",
    "lm_eval.models.huggingface", "lm_eval.tasks", "gguf",
)
# Set before the imports so that what the libraries fix when they load matches a job's own
# start: one BLAS thread (a job sets torch's own count itself), torch's huge-page allocation
# (runtime.ALLOCATOR_VARIABLES, read once, at the first allocation).
SERVER_ENVIRONMENT = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                      "OPENBLAS_NUM_THREADS": "1"}
_HEADER = struct.Struct("!Q")  # payload length
_REPLY = struct.Struct("!cq")  # kind (b"P": child pid, b"X": exit status, b"R": refused), value


# ---- the job's side -------------------------------------------------------------------------

def submit(job, *, address: str | None = None, connect_timeout: float = 2.0) -> int | None:
    """Run `job` (runtime.Job) in a copy of the warm server and return its exit status, or
    None when no server takes it (the caller then runs it itself)."""
    address = address or os.environ.get(SOCKET_VARIABLE)
    if not address:
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(connect_timeout)
        try:
            conn.connect(_short(address))
        except OSError:
            return None
        conn.settimeout(None)
        try:
            # The job itself is unpickled only in the copy, under the job's sys.path: the server
            # imports no project code (an edit must reach the next job).
            payload = pickle.dumps({
                "executable": os.path.realpath(sys.executable), "prefix": sys.prefix,
                "cwd": os.getcwd(), "env": dict(os.environ), "path": list(sys.path),
                "job": pickle.dumps(job)})
            sys.stdout.flush()
            sys.stderr.flush()
            socket.send_fds(conn, [_HEADER.pack(len(payload))], [0, 1, 2])
            conn.sendall(payload)
            kind, value = _read_reply(conn)
        except (OSError, pickle.PicklingError, AttributeError, TypeError) as err:
            print(f"warm start: {err}; the job runs itself", file=sys.stderr)
            return None
        if kind != b"P":  # refused, or the server went away before forking
            return None
        with _forwarding_signals(value):
            try:
                kind, value = _read_reply(conn)  # the copy's exit status (b"X"), or nothing
            except OSError:
                kind = None
        return value if kind == b"X" else 1  # without a word, the copy was killed from outside


def _short(address: str) -> str:
    """sun_path holds ~107 bytes; a relative path reaches a socket in a deep working dir."""
    return address if len(address) < 100 else os.path.relpath(address)


def _read_reply(conn: socket.socket) -> tuple[bytes | None, int]:
    data = conn.recv(_REPLY.size, socket.MSG_WAITALL)  # all of it, or less at the end
    return _REPLY.unpack(data) if len(data) == _REPLY.size else (None, 0)


@contextlib.contextmanager
def _forwarding_signals(pid: int):
    """Snakemake stops a job by signalling its process: pass it on to the copy (and whatever
    the copy started), which then exits and reports."""
    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signum)
    saved = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


# ---- the server -----------------------------------------------------------------------------

def serve(address: str, *, watch_pid: int | None, preload=PRELOAD) -> None:
    """Import `preload`, then fork one copy per job until `watch_pid` (Snakemake) exits."""
    started = time.monotonic()
    imported = threading.Event()
    watcher = threading.Thread(target=_exit_if_gone, args=(watch_pid, imported), daemon=True)
    watcher.start()
    for name in preload:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    imported.set()
    watcher.join()  # it exits, or has ended the process, before there is a socket to leave
    # A stop (SIGTERM) between creating the socket file and the `finally` that removes it
    # would leave the file behind (a copied working directory would then hold a socket).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    listener = _listen(address)
    bound = os.stat(address).st_ino
    children: dict[int, socket.socket] = {}
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        # Native threads (torch's too), from /proc: the server is Linux's alone (see _alive).
        log.info("warm start: serving %s (imports took %.1f s, %d threads)", address,
                 time.monotonic() - started, len(os.listdir("/proc/self/task")))
        listener.settimeout(0.5)  # its connections block (socket.accept)
        while _alive(watch_pid) and _owns(address, bound):
            with contextlib.suppress(TimeoutError):  # no job within 0.5 s
                _accept(listener, children)
            _reap(children)
    finally:
        if _owns(address, bound):
            os.unlink(address)
        listener.close()


def _exit_if_gone(pid: int | None, imported: threading.Event) -> None:
    """While the imports run (20 s on a busy CPU), nothing else sees Snakemake go: a killed
    workflow would leave the server behind that long (benchmarks/faults.py saw it). No socket
    exists yet, so there is nothing to clean up."""
    while not imported.wait(0.2):
        if not _alive(pid):
            os._exit(0)


def _listen(address: str) -> socket.socket:
    Path(address).parent.mkdir(parents=True, exist_ok=True)
    Path(address).unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    saved = os.umask(0o177)  # the socket is its owner's alone
    try:
        listener.bind(_short(address))
    finally:
        os.umask(saved)
    listener.listen(16)
    return listener


def _owns(address: str, bound: int) -> bool:
    """Whether the socket file is still the one this server bound (a later server replaces it)."""
    try:
        return os.stat(address).st_ino == bound
    except FileNotFoundError:
        return False


def _alive(pid: int | None) -> bool:
    """Whether the watched process still runs (None: none is watched). Read from /proc, as
    os.kill(pid, 0) would tell it, another user's process included: the server is Linux's
    alone (SO_PEERCRED), and where /proc is missing it stops at once (jobs run themselves)."""
    return pid is None or os.path.exists(f"/proc/{pid}")


def _accept(listener: socket.socket, children: dict) -> None:
    conn, _ = listener.accept()
    try:
        request, fds = _read_request(conn)
    except Exception as err:  # noqa: BLE001 - not this server's job to run: refuse it
        log.info("warm start: request refused: %s; the job runs itself", err)
        with contextlib.suppress(OSError):
            conn.sendall(_REPLY.pack(b"R", 0))
        conn.close()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the copy keeps only its own connection
        for other in (listener, *children.values()):
            other.close()
        _become_job(conn, fds, request)  # never returns
    for fd in fds:
        os.close(fd)
    children[pid] = conn
    with contextlib.suppress(OSError):  # a job script gone already: its copy stops itself
        conn.sendall(_REPLY.pack(b"P", pid))


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    """The request and the job's standard streams, from this server's user, for a job that
    runs this server's interpreter (not a conda env's); else an error, nothing left open."""
    uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                              struct.calcsize("3i")))[1]
    if uid != os.getuid():
        raise PermissionError(f"peer uid {uid} is not this server's {os.getuid()}")
    header, fds, _flags, _addr = socket.recv_fds(conn, _HEADER.size, 3)
    try:
        if len(header) != _HEADER.size or len(fds) != 3:
            raise ValueError("expected a length and three file descriptors")
        request = pickle.loads(conn.recv(_HEADER.unpack(header)[0], socket.MSG_WAITALL))
        mine = (os.path.realpath(sys.executable), sys.prefix)
        theirs = (request.get("executable"), request.get("prefix"))
        if theirs != mine:
            raise ValueError(f"job runs {theirs[0]}, server {mine[0]}")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return request, fds


def _reap(children: dict) -> None:
    """Collect finished copies (they are this server's only children); one killed by a signal
    could not report, so report for it."""
    for pid in list(children):
        done, status = os.waitpid(pid, os.WNOHANG)
        if not done:
            continue
        conn = children.pop(pid)
        if os.WIFSIGNALED(status):
            with contextlib.suppress(OSError):
                conn.sendall(_REPLY.pack(b"X", 128 + os.WTERMSIG(status)))
        conn.close()


def _told(err: BaseException, job) -> int | None:
    """The exit status of an error already told in one line by the job's log handler
    (environment.logged_to): a training stopped before its time limit (ResumeLater, 75), bad
    input where the job has a log (1); None for any other. The classes are looked up, not
    imported: the server imports none of the project's code."""
    errors = sys.modules.get(f"{__package__.rsplit('.', 1)[0]}.core.errors")
    if errors and isinstance(err, errors.ResumeLater):
        return errors.ResumeLater.EXIT_STATUS
    if errors and isinstance(err, errors.InputError) and job and job.log_path:
        return 1
    return None


def _become_job(conn: socket.socket, fds: list[int], request: dict) -> None:
    """In the forked copy: take the job's streams, variables and directory, run it, report."""
    status, job = 1, None
    try:
        os.setpgid(0, 0)  # its own group, so that a signal reaches what the job starts too
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path[:] = request["path"]
        threading.Thread(target=_stop_when_orphaned, args=(conn,), daemon=True).start()
        job = dataclasses.replace(pickle.loads(request["job"]), warm=True)
        job.run()
        status = 0
    except SystemExit as stop:  # the job's own exit status
        status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException as err:  # noqa: BLE001 - whatever happens, the job's script must hear
        status = _told(err, job)
        if status is None:
            traceback.print_exc()  # as the interpreter would
            status = 1
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
            conn.sendall(_REPLY.pack(b"X", status))
        os._exit(status)


def _stop_when_orphaned(conn: socket.socket) -> None:
    """The job's script never writes after its request: the connection ends only when the
    script has gone (killed without a chance to forward the signal). Then stop the job."""
    with contextlib.suppress(OSError):
        while conn.recv(1):
            pass
    os.killpg(0, signal.SIGTERM)


# ---- started and stopped by the Snakefile ---------------------------------------------------

_server: subprocess.Popen | None = None


def wanted(enabled: bool, *, local: bool) -> bool:
    """`warm_start` of config.yaml, where it is safe: jobs on this machine, and no GPU."""
    from . import gpus
    return bool(enabled) and local and gpus.gpu_count() == 0


def start(log_path: str | Path) -> None:
    """Start the server beside this process (Snakemake) and point its jobs at it (through
    SOCKET_VARIABLE, which they inherit)."""
    global _server
    address = str(Path(SOCKET_NAME).resolve())
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    from .environment import ALLOCATOR_VARIABLES  # a user's own setting wins
    env = {**ALLOCATOR_VARIABLES, **os.environ, **SERVER_ENVIRONMENT}
    with open(log_path, "a", encoding="utf-8") as handle:
        _server = subprocess.Popen(
            [sys.executable, "-m", __name__, "--socket", address, "--watch", str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)  # a Ctrl-C meant for Snakemake's jobs is not for it
    os.environ[SOCKET_VARIABLE] = address


def stop() -> None:
    global _server
    address = os.environ.pop(SOCKET_VARIABLE, None)
    if _server is not None:
        killed = _server.poll() is not None  # gone before its stop: it could not clean up
        _server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            _server.wait(timeout=10)
        if killed and address:  # its socket would stay in .snakemake/ (benchmarks/faults.py)
            Path(address).unlink(missing_ok=True)
        _server = None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--watch", type=int, help="serve until this process exits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(args.socket, watch_pid=args.watch)


if __name__ == "__main__":
    main()
