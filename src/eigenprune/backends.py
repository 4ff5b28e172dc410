"""Where chunks train: `local` (this process, or worker processes) or `ray` (a Ray cluster).

A backend gets the chunks to train, a `job(chunk, progress) -> ChunkResult` that trains one, and
`on_done(result)` which the driver calls as each chunk finishes (it commits the chunk to the run
folder). Jobs only compute and return bytes; the driver alone writes, so the same code works when
the workers are other machines that do not share a filesystem. Jobs derive everything from seeds,
so the backend does not change the results (up to float rounding from different thread counts).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Protocol

from eigenprune.progress import Progress, QueueProgress
from eigenprune.store import ChunkResult


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


def run_ray(
    job: Job, chunks: Sequence[Unit], on_done: Callable[[ChunkResult], None], progress: Progress,
    address: str | None = None, num_cpus: int | None = None, gpus_per_task: float = 0,
) -> None:
    """Train each chunk as a Ray task and commit results in the driver as they arrive.

    Connects to the cluster at `address` ("auto", "ray://host:10001", "host:6379"), or uses the Ray
    already initialised in this process, or starts a private local instance (`num_cpus` CPUs, no
    dashboard, usage statistics off) that is shut down afterwards. Each task asks for one CPU and
    `gpus_per_task` GPUs; Ray retries a task whose worker died, which is safe because tasks only
    return data. Per-epoch progress is not streamed back; each chunk's bar completes when it returns.
    """
    try:
        import ray
    except ImportError:
        raise BackendError("the ray backend needs Ray, which is not installed: pip install 'eigenprune[ray]'") from None
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            if address is None:
                ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
            else:
                ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            where = address or "a new local instance"
            raise BackendError(f"cannot start or reach Ray at {where}: {str(err).strip().splitlines()[0]}") from None
    try:
        remote = ray.remote(_in_ray_task).options(num_cpus=1, num_gpus=gpus_per_task, max_retries=2)
        bars = {}
        refs = {}
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
    finally:
        if started:
            ray.shutdown()


def _in_ray_task(job: Job, chunk: Unit) -> ChunkResult:
    return job(chunk, Progress(quiet=True))
