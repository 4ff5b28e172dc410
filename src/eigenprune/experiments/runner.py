"""Running a config: its chunks (see `grid`) planned (`plan`), trained and measured (`measure`) on a
backend, committed to the run folder as they finish, then merged, summarized and described in a manifest."""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib.metadata
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from eigenprune import __version__
from eigenprune.core.io import first_line
from eigenprune.experiments.backends import BackendError, ray_session, require_ray, run_local, run_ray
from eigenprune.experiments.config import Config, ConfigError
from eigenprune.experiments.data import DataSpec, TrialData, check_same_data, data_spec, make_data
from eigenprune.experiments.grid import Chunk
from eigenprune.experiments.measure import summarize, train_chunk
from eigenprune.experiments.plan import plan_work, resolve_device
from eigenprune.experiments.progress import Progress
from eigenprune.experiments.regpath import select_strengths
from eigenprune.experiments.store import ChunkResult, RunFolder, RunFolderError, parquet_writer

Backend = Literal["local", "ray"]


def _version(package: str) -> str | None:
    """An installed package's version, without importing it (importing Ray would set it up)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def manifest(cfg: Config, device: torch.device, wall: float, chunk_ids: list[str], skipped: list[str], run: dict) -> dict:
    """Everything needed to repeat a run: versions, machine, seeds, digest, command, parallelism, timings."""
    info = {
        "eigenprune": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "numpy": np.__version__, "pandas": pd.__version__, "pyarrow": _version("pyarrow"), "safetensors": _version("safetensors"),
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), **run, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else platform.machine(),
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "config_digest": cfg.digest(), "seed": cfg.seed, "data_seed": cfg.data.seed, "teacher_seed": cfg.data.teacher.seed,
        "command": shlex.join(["eigenprune", *sys.argv[1:]]), "python_executable": sys.executable, "cwd": os.getcwd(),
        "wall_seconds": round(wall, 3), "chunks": chunk_ids, "chunks_resumed": skipped,
    }
    return info


@contextlib.contextmanager
def _memory_errors(chunk: Chunk) -> Iterator[None]:
    """Running out of memory while a chunk trains, stated in one line (`BackendError`) instead of torch's traceback."""
    try:
        yield
    except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError; the CPU allocator raises a plain one
        if not isinstance(err, (MemoryError, torch.OutOfMemoryError)) and "can't allocate memory" not in str(err):
            raise
        raise BackendError(f"chunk {chunk.id} ran out of memory ({first_line(err)[:200]}); finished chunks are kept: "
                           "lower max_memory_gb or the number of workers, then rerun the same command to resume") from None


def _chunk_job(cfg_data: dict, threads: int, spec: DataSpec, chunk: Chunk, progress: Progress) -> ChunkResult:
    """Entry point in a worker process or Ray task: rebuild the (seeded, hence identical) data, train one chunk.

    Data read from a user's file must have the bytes the driver saw (`spec.digest`), or the chunk is refused.
    """
    if threads:
        torch.set_num_threads(threads)
    cfg = Config.model_validate(cfg_data)
    device = resolve_device(cfg.device)
    with _memory_errors(chunk):
        data = make_data(cfg.for_teacher(chunk.teacher))
        check_same_data(cfg, data, spec)
        return train_chunk(cfg, chunk, data.to(device), device, progress)


def _teachers_data(cfg: Config, chunks: list[Chunk], real: TrialData | None) -> dict[int, TrialData]:
    """The data of every teacher `chunks` train on: real data as the driver read it (one teacher), or teacher data."""
    if real is not None:
        return {0: real}
    return {t: make_data(cfg.for_teacher(t)) for t in sorted({c.teacher for c in chunks})}


def _train_here(cfg: Config, data: dict, device: torch.device, chunk: Chunk, progress: Progress) -> ChunkResult:
    """Train one chunk in this process, on data already built (`data[teacher]`)."""
    with _memory_errors(chunk):
        return train_chunk(cfg, chunk, data[chunk.teacher], device, progress)


def _committer(folder: RunFolder) -> Callable[[ChunkResult], Path]:
    """`folder.commit_chunk`, with an OSError (the folder removed, moved or made read-only while the run goes) as one
    `RunFolderError` line that names the chunk; the chunks committed before stay as they are."""
    def commit(result: ChunkResult) -> Path:
        try:
            return folder.commit_chunk(result)
        except OSError as err:
            where = f" ({err.filename})" if err.filename else ""
            if not folder.path.is_dir():
                raise RunFolderError(f"cannot commit chunk {result.chunk_id}: the run folder {folder.path} is gone (moved or "
                                     f"removed while the run was going: {err.strerror or type(err).__name__}{where})") from None
            raise RunFolderError(f"cannot commit chunk {result.chunk_id} to {folder.path}: {err.strerror or first_line(err)}{where}; "
                                 f"the chunks committed before are kept: {_remedy(err)} and rerun the same command to resume") from None
    return commit


_REMEDY = {errno.ENOSPC: "free some disk space", errno.EDQUOT: "free some disk space (the disk quota is used up)",
           errno.EFBIG: "raise the file size limit (ulimit -f)", errno.EROFS: "move the folder to a writable file system"}


def _remedy(err: OSError) -> str:
    """What to do before resuming after a failed commit (pyarrow's OSErrors carry the errno only in their text)."""
    code = err.errno or next((c for c in _REMEDY if f"[errno {c}]" in str(err)), None)
    return _REMEDY.get(code, "make the folder writable")
def run_experiment(
    cfg: Config, out: str | Path, fresh: bool = False, quiet: bool = False, backend: Backend = "local", address: str | None = None,
    finish: Callable[[RunFolder], object] | None = None,
) -> Path:
    """Run every chunk of `cfg` not already finished in `out`, then merge, summarize and report.

    local: on the CPU, chunks run in `cfg.workers` processes (0 = one per core); on CUDA, in this
    process. ray: each chunk is a Ray task (`address` of a cluster, or a private local instance).
    Finished chunks are committed as they arrive, so an interrupted run resumes where it stopped; a chunk
    longer than `cfg.max_chunk_minutes` trains as groups of trials (`plan.plan_work`), each committed.
    `finish(folder)` runs last, while the folder is still locked (the CLI builds the report there).
    """
    if address is not None and backend != "ray":
        raise ConfigError("--address is only used with --backend ray")
    real = make_data(cfg) if cfg.data.source != "teacher" else None  # bad data fails before a run folder exists
    spec = data_spec(cfg, real)
    folder = RunFolder(out)
    resumable = not fresh and folder.check_ours() is not None  # prepare() below refuses another config's or data's folder
    if backend == "ray":
        require_ray()
    work = plan_work(cfg, spec, backend, done=folder.done if resumable else None)
    todo, skipped, device, workers, threads = work.chunks, work.finished, work.device, work.workers, work.threads
    run = {"backend": backend, "ray_address": address, "ray": _version("ray") if backend == "ray" else None,
           "workers": workers, "threads_per_worker": threads, **work.memory}
    with contextlib.ExitStack() as stack:
        if backend == "ray":
            stack.enter_context(ray_session(address, cfg.workers or None))  # before anything is written
        folder.prepare(cfg, fresh=fresh, data_digest=spec.digest)
        stack.callback(folder.release)
        torch.manual_seed(cfg.seed)
        commit = _committer(folder)
        start = time.perf_counter()
        with Progress(quiet=quiet) as progress:
            if backend == "ray":
                job = functools.partial(_chunk_job, cfg.model_dump(), threads, spec)
                run_ray(job, todo, commit, progress, gpus_per_task=1 if device.type == "cuda" else 0)
            elif workers > 1:
                job = functools.partial(_chunk_job, cfg.model_dump(), threads, spec)
                run_local(job, todo, commit, progress, workers)
            elif todo:
                data = _teachers_data(cfg, todo, real)
                run_local(functools.partial(_train_here, cfg, {t: d.to(device) for t, d in data.items()}, device), todo, commit, progress)
        ids = skipped + [c.id for c in todo]
        tables = folder.merge(ids)
        tables["results"] = select_strengths(tables["results"])
        folder.write("results.parquet", parquet_writer(tables["results"]))
        folder.write_json("summary.json", summarize(cfg, tables["results"], tables["curves"]))
        info = manifest(cfg, device, time.perf_counter() - start, ids, skipped, run)
        folder.write_json("manifest.json", {**info, **folder.chunk_seconds(ids)})
        if finish is not None:
            finish(folder)
    return folder.path
