"""A config's grid (methods x student widths x trials) -> chunks trained as batches -> run folder.

A chunk is one method and a bucket of similar widths, with all trials: every student in it shares
learning rate, batch size and epochs, so the chunk trains as one `Ensemble`. Widths are bucketed
so that padding never more than `pack_factor`-folds the work (see `plan_chunks`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from eigenprune import __version__
from eigenprune.analysis import effective_dim
from eigenprune.backends import ray_session, require_ray, run_local, run_ray
from eigenprune.checkpoint import model_bytes
from eigenprune.config import Config, ConfigError
from eigenprune.data import TrialData, derive_seed, teacher_data
from eigenprune.ensemble import Ensemble
from eigenprune.importance import node_importance, normalize
from eigenprune.memory import DEFAULT_FRACTION, available_bytes, chunk_bytes, gb
from eigenprune.nets import LayerPlan, make_student
from eigenprune.progress import Progress
from eigenprune.prune import pruning_curves
from eigenprune.store import ChunkResult, RunFolder
from eigenprune.train import TrainSpec, evaluate, train_ensemble

Backend = Literal["local", "ray"]


@dataclass(frozen=True)
class Chunk:
    """Students trained together: one method, some widths, all trials."""

    method: str
    widths: tuple[int, ...]
    trials: tuple[int, ...]

    @property
    def id(self) -> str:
        return f"{self.method}-w{'_'.join(map(str, self.widths))}"


def plan_chunks(cfg: Config, pack_factor: float = 1.5) -> list[Chunk]:
    """Group widths (sorted) greedily while the padded size stays <= pack_factor x the real size."""
    chunks = []
    for method in cfg.methods:
        buckets: list[list[int]] = []
        for w in sorted(set(cfg.student.widths)):
            if buckets and (len(buckets[-1]) + 1) * w <= pack_factor * (sum(buckets[-1]) + w):
                buckets[-1].append(w)
            else:
                buckets.append([w])
        chunks += [Chunk(method, tuple(b), tuple(range(cfg.trials))) for b in buckets]
    return chunks


def student_plans(cfg: Config, method: str, width: int) -> list[LayerPlan]:
    """The paper's student: width N (spectral or direct, L2) -> rest (dense, no L2) -> sum readout."""
    m = cfg.method(method)
    plans = [LayerPlan(width, method, m.l2_phi, m.l2_lam)]
    plans += [LayerPlan(w, "direct", 0.0, 0.0) for w in cfg.student.rest]
    return plans + [LayerPlan(1, "fixed", 0.0, 0.0)]


def student_seed(cfg: Config, trial: int, width: int) -> int:
    """Spectral and direct students of one (trial, width) start from the same parameters."""
    return derive_seed("student", cfg.seed, trial, width)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but no CUDA device is available; use --device cpu")
    return torch.device(name)


def make_data(cfg: Config) -> TrialData:
    d, t = cfg.data, cfg.data.teacher
    return teacher_data(
        t.kind, d.input_dim, list(t.widths), t.seed, derive_seed("data", cfg.seed, d.seed), cfg.trials,
        d.n_train, d.n_test, t.latent_dim, d.standardize_targets, getattr(torch, cfg.dtype),
    )


def run_chunk(cfg: Config, chunk: Chunk, data: TrialData, device: torch.device, progress: Progress) -> tuple[dict, Ensemble, list]:
    """Train one chunk and measure every student in it; returns (tables, ensemble, student keys)."""
    dtype = getattr(torch, cfg.dtype)
    keys = [(w, t) for w in chunk.widths for t in chunk.trials]
    students = [make_student(cfg.data.input_dim, student_plans(cfg, chunk.method, w), student_seed(cfg, t, w), dtype) for w, t in keys]
    ens = Ensemble(students).to(device)
    trial_index = torch.tensor([t for _, t in keys], device=device)
    m = cfg.method(chunk.method)
    spec = TrainSpec(lr=m.lr, batch_size=m.batch_size, epochs=m.epochs)
    shuffle = [derive_seed("shuffle", cfg.seed, t) for t in range(cfg.trials)]
    task = progress.add(f"{chunk.method} N={','.join(map(str, chunk.widths))} ({len(keys)} students)", m.epochs)
    log = train_ensemble(ens, data.x_train, data.y_train, trial_index, spec, shuffle, lambda e, loss: progress.update(task, e + 1, loss))
    per_epoch = log.steps // m.epochs
    train_loss = evaluate(ens, data.x_train, data.y_train, trial_index, spec.task).cpu()
    test_loss = evaluate(ens, data.x_test, data.y_test, trial_index, spec.task).cpu()
    scores = node_importance(ens.layers[0])
    widths = ens.layers[0].widths
    eff = effective_dim(scores, cfg.analysis.threshold, widths).cpu()
    curves = pruning_curves(ens, 0, scores, data.x_test, data.y_test, trial_index, spec.task).cpu()
    norm = normalize(scores).cpu()
    scores = scores.cpu()
    t_widths = list(cfg.data.teacher.widths)
    results, curve_rows, imp_rows = [], [], []
    for s, (w, t) in enumerate(keys):
        step = int(log.failed_step[s])
        failed = step >= 0
        reason = f"loss became {float(log.failed_loss[s])} at step {step} (epoch {step // per_epoch}); frozen there" if failed else ""
        base = {"method": chunk.method, "width": w, "trial": t}
        results.append({
            **base, "teacher_kind": cfg.data.teacher.kind, "teacher_widths": ",".join(map(str, t_widths)),
            "teacher_width": t_widths[0], "train_loss": float(train_loss[s]), "test_loss": float(test_loss[s]),
            "effective_dim": int(eff[s]) if not failed else -1, "status": "failed" if failed else "ok",
            "failed_step": step, "fail_reason": reason,
            "lr": m.lr, "batch_size": m.batch_size, "epochs": m.epochs, "steps": log.steps,
            "l2_phi": m.l2_phi, "l2_lam": m.l2_lam if chunk.method == "spectral" else 0.0,
            "seed": student_seed(cfg, t, w), "chunk": chunk.id,
            "checkpoint": f"chunks/{chunk.id}/students/{chunk.method}-N{w}-t{t}.safetensors" if cfg.save_students else "",
        })
        delta = curves[s, :w] - curves[s, w - 1]  # the full model through the same computation: delta is exactly 0 at k = N
        kept = np.arange(1, w + 1)
        curve_rows.append(pd.DataFrame({**base, "kept": kept, "test_loss": curves[s, :w].numpy(),
                                        "delta_loss": delta.numpy(), "kept_minus_teacher": kept - t_widths[0]}))
        imp_rows.append(pd.DataFrame({**base, "node": np.arange(w), "importance": scores[s, :w].numpy(),
                                      "normalized": norm[s, :w].numpy()}))
    tables = {"results": pd.DataFrame(results), "curves": pd.concat(curve_rows, ignore_index=True),
              "importance": pd.concat(imp_rows, ignore_index=True)}
    return tables, ens, keys


def summarize(cfg: Config, results: pd.DataFrame, curves: pd.DataFrame) -> dict:
    """Per (method, width): trial counts, and mean and std over the trials that trained (status ok) of
    losses, effective dimension and delta at probes (None where no trial of the group trained)."""
    ok = results[results.status == "ok"]
    out: dict = {"teacher_widths": list(cfg.data.teacher.widths), "threshold": cfg.analysis.threshold, "groups": []}
    ok_curves = curves.merge(ok[["method", "width", "trial"]], on=["method", "width", "trial"])
    for (method, width), everyone in results.groupby(["method", "width"]):
        g = everyone[everyone.status == "ok"]
        row = {"method": method, "width": int(width), "trials_ok": len(g), "trials_failed": len(everyone) - len(g)}
        for col in ("train_loss", "test_loss", "effective_dim"):
            row[f"{col}_mean"] = float(g[col].mean()) if len(g) else None
            row[f"{col}_std"] = float(g[col].std(ddof=0)) if len(g) else None
        for k in cfg.analysis.probe_kept:
            sel = ok_curves[(ok_curves.method == method) & (ok_curves.width == width) & (ok_curves.kept == k)]
            if len(sel):
                row[f"delta_loss_at_{k}_mean"] = float(sel.delta_loss.mean())
                row[f"delta_loss_at_{k}_std"] = float(sel.delta_loss.std(ddof=0))
        out["groups"].append(row)
    return out


def _version(package: str) -> str | None:
    """An installed package's version, without importing it (importing Ray would set it up)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def manifest(cfg: Config, device: torch.device, wall: float, chunks: list[Chunk], skipped: list[str], run: dict) -> dict:
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
        "wall_seconds": round(wall, 3), "chunks": [c.id for c in chunks], "chunks_resumed": skipped,
    }
    return info


def check_memory(cfg: Config, chunks: list[Chunk], workers: int, device: torch.device) -> dict:
    """Refuse (ConfigError) a grid whose largest chunk would not fit in memory, before anything runs.

    The limit is `max_memory_gb`, or DEFAULT_FRACTION of the memory available now (free GPU memory on
    CUDA), shared by the `workers` chunks that run at once. Returns the figures for the manifest.
    """
    if cfg.max_memory_gb is not None:
        limit, source = cfg.max_memory_gb * 1e9, f"max_memory_gb {cfg.max_memory_gb:g}"
    else:
        free = available_bytes(device)
        limit, source = DEFAULT_FRACTION * free, f"{DEFAULT_FRACTION:.0%} of the {gb(free)} available on {device.type}"
    per_worker = limit / max(workers, 1)
    if workers > 1:
        source += f", shared by {workers} workers"
    need = {c.id: chunk_memory(cfg, c) for c in chunks}
    for c in chunks:
        if need[c.id] > per_worker:
            raise ConfigError(
                f"chunk {c.id} ({len(c.widths) * len(c.trials)} students) needs about {gb(need[c.id])}, more than the "
                f"{gb(per_worker)} limit ({source}); lower trials, widths or n_train, use fewer workers, or set max_memory_gb"
            )
    return {"memory_limit_bytes": int(per_worker), "memory_estimate_bytes": need}


def chunk_memory(cfg: Config, chunk: Chunk) -> int:
    """Estimated peak bytes of training and measuring one chunk (see `memory.chunk_bytes`)."""
    d = cfg.data
    widths = [d.input_dim, max(chunk.widths), *cfg.student.rest, 1]
    size = torch.tensor([], dtype=getattr(torch, cfg.dtype)).element_size()
    n_students = len(chunk.widths) * len(chunk.trials)
    return chunk_bytes(n_students, cfg.trials, widths, d.n_train, d.n_test, cfg.method(chunk.method).batch_size, size)


def chunk_cost(cfg: Config, chunk: Chunk) -> float:
    """A rough relative training cost (steps x padded students x width) used to order the work."""
    m = cfg.method(chunk.method)
    steps = m.epochs * -(-cfg.data.n_train // m.batch_size)
    return steps * (1 + len(chunk.widths) * len(chunk.trials) * max(chunk.widths) / 2000)


def train_chunk(cfg: Config, chunk: Chunk, data: TrialData, device: torch.device, progress: Progress) -> ChunkResult:
    """Train one chunk; its tables and student checkpoints (safetensors bytes) ready to commit."""
    start = time.perf_counter()
    tables, ens, keys = run_chunk(cfg, chunk, data, device, progress)
    files = {}
    if cfg.save_students:
        for s, (w, t) in enumerate(keys):
            meta = {"method": chunk.method, "width": w, "trial": t, "config_digest": cfg.digest()}
            files[f"students/{chunk.method}-N{w}-t{t}.safetensors"] = model_bytes(ens.student(s).cpu(), meta)
    return ChunkResult(chunk.id, tables, files, time.perf_counter() - start)


def _chunk_job(cfg_data: dict, threads: int, chunk: Chunk, progress: Progress) -> ChunkResult:
    """Entry point in a worker process or Ray task: rebuild the (seeded, hence identical) data, train one chunk."""
    if threads:
        torch.set_num_threads(threads)
    cfg = Config.model_validate(cfg_data)
    device = resolve_device(cfg.device)
    return train_chunk(cfg, chunk, make_data(cfg).to(device), device, progress)


def run_experiment(
    cfg: Config, out: str | Path, fresh: bool = False, quiet: bool = False, backend: Backend = "local", address: str | None = None,
) -> Path:
    """Run every chunk of `cfg` not already finished in `out`, then merge, summarize and report.

    local: on the CPU, chunks run in `cfg.workers` processes (0 = one per core); on CUDA, in this
    process. ray: each chunk is a Ray task (`address` of a cluster, or a private local instance).
    Finished chunks are committed as they arrive, so an interrupted run resumes where it stopped.
    """
    from eigenprune.report import build_report

    if address is not None and backend != "ray":
        raise ConfigError("--address is only used with --backend ray")
    chunks = plan_chunks(cfg)
    folder = RunFolder(out)
    resumable = not fresh and (folder.path / "config.yaml").is_file()  # prepare() below refuses another config's folder
    skipped = [c.id for c in chunks if resumable and folder.done(c.id)]
    todo = sorted((c for c in chunks if c.id not in skipped), key=lambda c: -chunk_cost(cfg, c))
    if backend == "ray":
        require_ray()
        device = torch.device(cfg.device if cfg.device != "auto" else "cpu")  # resolved inside each task
        workers, threads = cfg.workers, 1
        memory = check_memory(cfg, todo, 1, torch.device("cpu")) if device.type == "cpu" or cfg.max_memory_gb else {}
    else:
        device = resolve_device(cfg.device)
        workers = min(cfg.workers or os.cpu_count() or 1, len(todo)) if device.type == "cpu" else 1
        threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
        memory = check_memory(cfg, todo, workers, device)
    run = {"backend": backend, "ray_address": address, "ray": _version("ray") if backend == "ray" else None,
           "workers": workers, "threads_per_worker": threads, **memory}
    with contextlib.ExitStack() as stack:
        if backend == "ray":
            stack.enter_context(ray_session(address, cfg.workers or None))  # before anything is written
        folder.prepare(cfg, fresh=fresh)
        stack.callback(folder.release)
        torch.manual_seed(cfg.seed)
        start = time.perf_counter()
        with Progress(quiet=quiet) as progress:
            if backend == "ray":
                job = functools.partial(_chunk_job, cfg.model_dump(), threads)
                run_ray(job, todo, folder.commit_chunk, progress, gpus_per_task=1 if device.type == "cuda" else 0)
            elif workers > 1:
                run_local(functools.partial(_chunk_job, cfg.model_dump(), threads), todo, folder.commit_chunk, progress, workers)
            elif todo:
                data = make_data(cfg).to(device)
                run_local(lambda chunk, p: train_chunk(cfg, chunk, data, device, p), todo, folder.commit_chunk, progress)
        ids = [c.id for c in chunks]
        tables = folder.merge(ids)
        folder.write_json("summary.json", summarize(cfg, tables["results"], tables["curves"]))
        info = manifest(cfg, device, time.perf_counter() - start, chunks, skipped, run)
        folder.write_json("manifest.json", {**info, "chunk_train_seconds": folder.chunk_seconds(ids)})
        build_report(folder.path, quiet=quiet)
    return folder.path
