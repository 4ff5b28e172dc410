"""Where chunks train: `local` (this process, or worker processes) or `ray` (a Ray cluster).

A backend gets the chunks to train, a `job(chunk, progress) -> ChunkResult` that trains one, and
`on_done(result)` which the driver calls as each chunk finishes (it commits the chunk to the run
folder). Jobs only compute and return bytes; the driver alone writes, so the same code works when
the workers are other machines that do not share a filesystem. Jobs derive everything from seeds,
so the backend does not change the results (up to float rounding from different thread counts).
"""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing as mp
import os
import pickle
import queue
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Protocol

from eigenprune.core.errors import EigenpruneError
from eigenprune.core.io import first_line
from eigenprune.experiments.progress import Progress, QueueProgress
from eigenprune.experiments.store import ChunkResult


class Unit(Protocol):
    """One piece of work (an `experiments.grid.Chunk`): anything picklable with a string `id`."""

    @property
    def id(self) -> str: ...


Job = Callable[[Any, Any], ChunkResult]


class BackendError(EigenpruneError, RuntimeError):
    """A backend that cannot run as asked (Ray missing, cluster unreachable), stated in one line."""


def run_local(job: Job, chunks: Sequence[Unit], on_done: Callable[[ChunkResult], None], progress: Progress, workers: int = 1) -> None:
    """Train `chunks` one after another in this process, or in `workers` worker processes.

    On Linux the workers are forked: they start at once with the driver's imports (torch, pandas: about
    2.7 s per spawned interpreter on 2 cores, most of the quick run's start-up). Elsewhere (macOS, where
    fork is unsafe, and Windows) they are spawned, and `job` must be picklable (a module-level function
    or a `functools.partial` of one); it is on Linux too, as a Ray task needs it to be.
    Worker processes ignore SIGINT (Ctrl-C reaches the driver, which ends them; `child_signals`), are ended
    whenever the driver stops early (an error, Ctrl-C, or a signal turned into an exception as the CLI
    does), and exit by themselves within a second when the driver is gone (even after a SIGKILL).
    """
    if workers <= 1:
        for chunk in chunks:
            on_done(job(chunk, progress))
        return
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    tasks, results = ctx.SimpleQueue(), ctx.Queue()
    n = min(workers, len(chunks))
    for chunk in chunks:
        tasks.put(chunk)
    for _ in range(n):
        tasks.put(None)
    procs = []
    try:
        with signals_held():  # until each worker has its own handlers
            for _ in range(n):
                proc = ctx.Process(target=_worker, args=(job, tasks, results, os.getpid()), daemon=True)
                proc.start()
                procs.append(proc)
        remaining = len(chunks)
        while remaining:
            try:
                kind, key, *payload = results.get(timeout=0.2)
            except queue.Empty:
                dead = [proc for proc in procs if proc.exitcode not in (None, 0)]
                if dead:
                    raise BackendError(f"a worker process died (pid {dead[0].pid}, exit code {dead[0].exitcode}); "
                                       "finished chunks are kept, rerun the same command to resume") from None
                continue
            if kind == "done":
                on_done(payload[0])
                remaining -= 1
            elif kind == "error":
                raise payload[0]  # a worker's exception, re-raised here
            else:
                progress.relay((kind, key, *payload))
    finally:
        _end(procs)
        results.close()
        results.cancel_join_thread()


def _end(procs: list) -> None:
    """Terminate worker processes still running (SIGTERM, then SIGKILL after 5 s) and reap them.

    SIGCONT follows SIGTERM, so that a worker someone stopped (SIGSTOP, Ctrl-Z) receives it now.
    """
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            with contextlib.suppress(ProcessLookupError):  # it ended in between: nothing to wake
                os.kill(proc.pid, signal.SIGCONT)
    for proc in procs:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()


_ENDING = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back while children are started: a child starts with them blocked and takes them
    once it has its own handlers (`child_signals`), so none can raise the CLI's KeyboardInterrupt in it (multiprocessing
    would print that traceback); the driver receives any that came meanwhile when the block ends (none is lost)."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _ENDING)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def child_signals() -> None:
    """In a child process, first: Ctrl-C ignored (the driver's to handle; it ends its children), SIGTERM and SIGHUP end it
    (not the CLI's handlers, which a fork inherits); then the signals `signals_held` blocked are taken."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _ENDING)


def exit_with_parent(parent: int) -> None:
    """In a forked child: exit as soon as the parent `parent` is gone (checked twice a second, by a daemon thread).

    Every process eigenprune forks calls this first, so none outlives its driver, even one killed with SIGKILL
    while the child is blocked (e.g. writing to a pipe no one reads any more).
    """
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _fresh_streams() -> None:
    """New sys.stdout and sys.stderr on the same descriptors. A forked worker's copies may hold the lock of a
    write the driver's progress-bar thread was making at the fork, which would block the worker's first
    warning forever (tests/test_backends.py makes that happen)."""
    for name, fd in (("stdout", 1), ("stderr", 2)):
        try:
            dup = os.dup(fd)
        except OSError:  # the descriptor is closed: there is no stream to replace
            continue
        setattr(sys, name, open(dup, "w", buffering=1))  # noqa: SIM115 - lives as long as the process


def _worker(job: Job, tasks: Any, results: Any, parent: int) -> None:
    """A worker process: train the chunks it takes from `tasks` until it takes None; report through `results`."""
    child_signals()
    exit_with_parent(parent)
    _fresh_streams()
    while (chunk := tasks.get()) is not None:
        try:
            result = job(chunk, QueueProgress(results, chunk.id))
        except Exception as err:  # noqa: BLE001 - handed to the driver, which re-raises it
            try:
                pickle.dumps(err)
            except Exception:  # noqa: BLE001 - an exception that cannot travel: its text does
                err = RuntimeError(f"{type(err).__name__}: {err}")
            results.put(("error", chunk.id, err))
            return
        results.put(("done", chunk.id, result))


def require_ray() -> None:
    """Check that Ray is installed (without importing it), or raise a `BackendError` saying how to install it."""
    if importlib.util.find_spec("ray") is None:
        raise BackendError("the ray backend needs Ray, which is not installed: pip install 'eigenprune[ray]'")


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[ModuleType]:
    """Make Ray usable in this process for the duration of the `with` block.

    Uses a Ray already initialised here; otherwise connects to the cluster at `address` ("auto",
    "HOST:PORT" of its head, or "ray://HOST:10001" for Ray Client), or with no address starts a
    private local instance (`num_cpus` CPUs) that is shut down at the end: no dashboard, no usage
    statistics, and, unless RAY_AUTH_* is set, token authentication with a random token held only in
    this process's environment (Ray would otherwise write ~/.ray/auth_token). An address that does
    not answer within 10 s is a `BackendError` (Ray itself would retry for minutes).
    """
    require_ray()
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        yield sys.modules["ray"]
        return
    if address not in (None, "auto"):
        _check_reachable(address)
    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    own_auth = not any(k in os.environ for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"))
    if address is None and own_auth and "ray" not in sys.modules:  # Ray reads these when it is imported
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {k: v for k, v in env.items() if k not in os.environ}
    os.environ.update(env)
    try:
        import ray

        try:
            if address is None:
                ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
            else:
                ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        except Exception as err:  # noqa: BLE001 - whatever Ray raises, the user gets one line
            raise BackendError(f"cannot start or reach Ray at {address or 'a new local instance'}: {first_line(err)}") from None
        try:
            yield ray
        finally:
            ray.shutdown()
    finally:
        for k in env:
            os.environ.pop(k, None)


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise BackendError(f"Ray address must be auto, HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise BackendError(f"cannot reach Ray at {address}: {err.strerror or type(err).__name__}") from None


def run_ray(
    job: Job, chunks: Sequence[Unit], on_done: Callable[[ChunkResult], None], progress: Progress, gpus_per_task: float = 0,
) -> None:
    """Train each chunk as a Ray task (inside a `ray_session`) and hand results to the driver as they arrive.

    Each task asks for one CPU and `gpus_per_task` GPUs; Ray retries a task whose worker died, which
    is safe because tasks only return data. Per-epoch progress is not streamed back; each chunk's bar
    completes when it returns.
    """
    import ray

    remote = ray.remote(_in_ray_task).options(num_cpus=1, num_gpus=gpus_per_task, max_retries=2)
    bars, refs = {}, {}
    for chunk in chunks:
        bars[chunk.id] = progress.add(f"{chunk.id} (Ray task; shown when done)", 1)
        refs[remote.remote(job, chunk)] = chunk
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            result = ray.get(done[0])  # re-raises a task's exception here
            progress.finish(bars[refs[done[0]].id])
            on_done(result)
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        raise


def _in_ray_task(job: Job, chunk: Unit) -> ChunkResult:
    return job(chunk, Progress(quiet=True))
