"""A config's grid (methods x student widths x trials) -> chunks trained as batches -> run folder.

A chunk is one method and a bucket of similar widths, with all trials: every student in it shares
learning rate, batch size and epochs, so the chunk trains as one `Ensemble`. Widths are bucketed
so that padding never more than `pack_factor`-folds the work (see `plan_chunks`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from eigenprune import __version__
from eigenprune.analysis import critical_point, effective_dim, teacher_comparison
from eigenprune.checkpoint import save_model
from eigenprune.config import Config, ConfigError
from eigenprune.data import TrialData, derive_seed, teacher_data
from eigenprune.ensemble import Ensemble
from eigenprune.importance import node_importance, normalize
from eigenprune.nets import LayerPlan, make_student, make_teacher
from eigenprune.progress import Progress, QueueProgress
from eigenprune.prune import pruning_curves
from eigenprune.store import RunFolder
from eigenprune.train import TrainSpec, evaluate, train_ensemble


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
    start = time.perf_counter()
    log = train_ensemble(ens, data.x_train, data.y_train, trial_index, spec, shuffle, lambda e, loss: progress.update(task, e + 1, loss))
    seconds = time.perf_counter() - start
    train_loss = evaluate(ens, data.x_train, data.y_train, trial_index, spec.task).cpu()
    test_loss = evaluate(ens, data.x_test, data.y_test, trial_index, spec.task).cpu()
    scores = node_importance(ens.layers[0])
    widths = ens.layers[0].widths
    eff = effective_dim(scores, cfg.analysis.threshold, widths).cpu()
    curves = pruning_curves(ens, 0, scores, data.x_test, data.y_test, trial_index, spec.task).cpu()
    norm = normalize(scores).cpu()
    scores = scores.cpu()
    t_widths = list(cfg.data.teacher.widths)
    teacher = None
    if cfg.data.teacher.kind == "mlp" and len(t_widths) >= 2 and len(ens.layers) >= 3:
        teacher = make_teacher(cfg.data.input_dim, t_widths, cfg.data.teacher.seed, dtype)
    results, curve_rows, imp_rows = [], [], []
    for s, (w, t) in enumerate(keys):
        failed = int(log.failed_step[s]) >= 0
        base = {"method": chunk.method, "width": w, "trial": t}
        kept = np.arange(1, w + 1)
        full = float(curves[s, w - 1])  # the full model through the same computation: delta is exactly 0 at k = N
        n_c = critical_point(kept, curves[s, :w].numpy() - full, cfg.analysis.critical_rel_tol * full)
        compared = {"path_distance": np.nan, "in_strength_distance": np.nan}
        if teacher is not None and not failed:
            cmp = teacher_comparison(ens.student(s).cpu(), teacher, min(t_widths[0], w))
            compared = {k: cmp[k] for k in compared}
        results.append({
            **base, "teacher_kind": cfg.data.teacher.kind, "teacher_widths": ",".join(map(str, t_widths)),
            "teacher_width": t_widths[0], "train_loss": float(train_loss[s]), "test_loss": float(test_loss[s]),
            "effective_dim": int(eff[s]) if not failed else -1, "critical_point": n_c if not failed else -1, **compared,
            "status": "failed" if failed else "ok",
            "failed_step": int(log.failed_step[s]), "fail_reason": "non-finite loss" if failed else "",
            "lr": m.lr, "batch_size": m.batch_size, "epochs": m.epochs, "steps": log.steps,
            "l2_phi": m.l2_phi, "l2_lam": m.l2_lam if chunk.method == "spectral" else 0.0,
            "seed": student_seed(cfg, t, w), "chunk": chunk.id, "chunk_train_seconds": seconds,
            "checkpoint": f"chunks/{chunk.id}/students/{chunk.method}-N{w}-t{t}.safetensors" if cfg.save_students else "",
        })
        curve_rows.append(pd.DataFrame({**base, "kept": kept, "test_loss": curves[s, :w].numpy(),
                                        "delta_loss": curves[s, :w].numpy() - full, "kept_minus_teacher": kept - t_widths[0]}))
        imp_rows.append(pd.DataFrame({**base, "node": np.arange(w), "importance": scores[s, :w].numpy(),
                                      "normalized": norm[s, :w].numpy()}))
    tables = {"results": pd.DataFrame(results), "curves": pd.concat(curve_rows, ignore_index=True),
              "importance": pd.concat(imp_rows, ignore_index=True)}
    return tables, ens, keys


def summarize(cfg: Config, results: pd.DataFrame, curves: pd.DataFrame) -> dict:
    """Per (method, width): mean and std over trials of losses, effective dimension and delta at probes."""
    ok = results[results.status == "ok"]
    out: dict = {"teacher_widths": list(cfg.data.teacher.widths), "threshold": cfg.analysis.threshold, "groups": []}
    ok_curves = curves.merge(ok[["method", "width", "trial"]], on=["method", "width", "trial"])
    for (method, width), g in ok.groupby(["method", "width"]):
        row = {"method": method, "width": int(width), "trials_ok": len(g), "trials_failed": int(
            ((results.method == method) & (results.width == width) & (results.status != "ok")).sum())}
        for col in ("train_loss", "test_loss", "effective_dim", "critical_point", "path_distance", "in_strength_distance"):
            row[f"{col}_mean"] = float(g[col].mean())
            row[f"{col}_std"] = float(g[col].std(ddof=0))
        for k in cfg.analysis.probe_kept:
            sel = ok_curves[(ok_curves.method == method) & (ok_curves.width == width) & (ok_curves.kept == k)]
            if len(sel):
                row[f"delta_loss_at_{k}_mean"] = float(sel.delta_loss.mean())
                row[f"delta_loss_at_{k}_std"] = float(sel.delta_loss.std(ddof=0))
        out["groups"].append(row)
    return out


def manifest(cfg: Config, device: torch.device, wall: float, chunks: list[Chunk], skipped: list[str], workers: int) -> dict:
    info = {
        "eigenprune": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "numpy": np.__version__, "pandas": pd.__version__, "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "workers": workers, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "config_digest": cfg.digest(), "seed": cfg.seed, "data_seed": cfg.data.seed, "teacher_seed": cfg.data.teacher.seed,
        "wall_seconds": round(wall, 3), "chunks": [c.id for c in chunks], "chunks_resumed": skipped,
        "command": " ".join(sys.argv),
    }
    return info


def chunk_cost(cfg: Config, chunk: Chunk) -> float:
    """A rough relative training cost (steps x padded students x width) used to order the work."""
    m = cfg.method(chunk.method)
    steps = m.epochs * -(-cfg.data.n_train // m.batch_size)
    return steps * (1 + len(chunk.widths) * len(chunk.trials) * max(chunk.widths) / 2000)


def train_and_commit(cfg: Config, chunk: Chunk, folder: RunFolder, data: TrialData, device: torch.device, progress) -> str:
    """Train one chunk and rename its tables and checkpoints into the run folder."""
    tables, ens, keys = run_chunk(cfg, chunk, data, device, progress)

    def write_students(tmp: Path) -> None:
        if not cfg.save_students:
            return
        (tmp / "students").mkdir()
        for s, (w, t) in enumerate(keys):
            meta = {"method": chunk.method, "width": w, "trial": t, "config_digest": cfg.digest()}
            save_model(ens.student(s).cpu(), tmp / "students" / f"{chunk.method}-N{w}-t{t}.safetensors", meta)

    folder.commit_chunk(chunk.id, tables, write_students)
    return chunk.id


def _chunk_job(cfg_data: dict, chunk: Chunk, folder: str, queue, threads: int) -> str:
    """Worker-process entry: rebuild the (seeded, hence identical) data and train one chunk."""
    torch.set_num_threads(threads)
    cfg = Config.model_validate(cfg_data)
    return train_and_commit(cfg, chunk, RunFolder(folder), make_data(cfg), torch.device("cpu"), QueueProgress(queue, chunk.id))


def _run_in_workers(cfg: Config, todo: list[Chunk], folder: RunFolder, workers: int, progress: Progress) -> None:
    ctx = mp.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        queue = manager.Queue()
        futures = [pool.submit(_chunk_job, cfg.model_dump(), c, str(folder.path), queue, threads) for c in todo]
        try:
            while True:
                finished = all(f.done() for f in futures)
                while not queue.empty():
                    progress.relay(queue.get())
                if finished:
                    break
                time.sleep(0.1)
            for f in futures:
                f.result()  # re-raises a worker's exception here
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def run_experiment(cfg: Config, out: str | Path, fresh: bool = False, quiet: bool = False) -> Path:
    """Run every chunk of `cfg` not already finished in `out`, then merge, summarize and report.

    On the CPU, chunks run in `cfg.workers` processes (0 = one per core); on CUDA, in this process.
    """
    from eigenprune.report import build_report

    device = resolve_device(cfg.device)
    folder = RunFolder(out)
    folder.prepare(cfg, fresh=fresh)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    chunks = plan_chunks(cfg)
    skipped = [c.id for c in chunks if folder.done(c.id)]
    todo = sorted((c for c in chunks if c.id not in skipped), key=lambda c: -chunk_cost(cfg, c))
    workers = min(cfg.workers or os.cpu_count() or 1, len(todo)) if device.type == "cpu" else 1
    with Progress(quiet=quiet) as progress:
        if workers > 1:
            _run_in_workers(cfg, todo, folder, workers, progress)
        elif todo:
            data = make_data(cfg).to(device)
            for chunk in todo:
                train_and_commit(cfg, chunk, folder, data, device, progress)
    tables = folder.merge()
    folder.write_json("summary.json", summarize(cfg, tables["results"], tables["curves"]))
    folder.write_json("manifest.json", manifest(cfg, device, time.perf_counter() - start, chunks, skipped, workers))
    build_report(folder.path, quiet=quiet)
    return folder.path
