"""Where chunks train: `local` (this process, or worker processes) or `ray` (a Ray cluster).

A backend gets the chunks to train, a `job(chunk, progress) -> ChunkResult` that trains one, and
`on_done(result)` which the driver calls as each chunk finishes (it commits the chunk to the run
folder). Jobs only compute and return bytes; the driver alone writes, so the same code works when
the workers are other machines that do not share a filesystem. Jobs derive everything from seeds,
so the backend does not change the results (up to float rounding from different thread counts).
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import secrets
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Protocol

from eigenprune.experiments.progress import Progress, QueueProgress
from eigenprune.experiments.store import ChunkResult
from eigenprune.pruning.checkpoint import first_line


class Unit(Protocol):
    """One piece of work (an `experiment.Chunk`): anything picklable with a string `id`."""

    @property
    def id(self) -> str: ...


Job = Callable[[Any, Any], ChunkResult]


class BackendError(RuntimeError):
    """A backend that cannot run as asked (Ray missing, cluster unreachable), stated in one line."""


def run_local(job: Job, chunks: Sequence[Unit], on_done: Callable[[ChunkResult], None], progress: Progress, workers: int = 1) -> None:
    """Train `chunks` one after another in this process, or in `workers` spawned processes.

    With workers > 1, `job` must be picklable (a module-level function or a `functools.partial` of one).
    """
    if workers <= 1:
        for chunk in chunks:
            on_done(job(chunk, progress))
        return
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        queue = manager.Queue()
        pending = {pool.submit(_in_worker, job, chunk, queue) for chunk in chunks}
        try:
            while pending:
                done, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
                while not queue.empty():
                    progress.relay(queue.get())
                for future in done:
                    on_done(future.result())  # re-raises a worker's exception here
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _in_worker(job: Job, chunk: Unit, queue: Any) -> ChunkResult:
    return job(chunk, QueueProgress(queue, chunk.id))


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
