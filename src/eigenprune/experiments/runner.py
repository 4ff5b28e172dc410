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
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from eigenprune import __version__
from eigenprune.batched import fused
from eigenprune.batched.curves import joint_search, pruning_curves
from eigenprune.batched.ensemble import Ensemble
from eigenprune.batched.memory import DEFAULT_FRACTION, available_bytes, chunk_bytes, gb
from eigenprune.batched.train import evaluate, train_ensemble
from eigenprune.core.plans import LayerPlan, make_student
from eigenprune.core.training import TrainSpec
from eigenprune.experiments import seeds
from eigenprune.experiments.analysis import critical_point, effective_dim, normalized_importance, teacher_comparison
from eigenprune.experiments.backends import ray_session, require_ray, run_local, run_ray
from eigenprune.experiments.builders import make_teacher, paper_student
from eigenprune.experiments.config import Config, ConfigError, DataConfig
from eigenprune.experiments.data import DataError, TrialData, csv_data, digits_data, file_sha256, teacher_data
from eigenprune.experiments.progress import Progress
from eigenprune.experiments.regpath import select_strengths
from eigenprune.experiments.store import GROUP_KEYS, STUDENT_KEYS, ChunkResult, RunFolder, parquet_writer
from eigenprune.pruning.checkpoint import model_bytes
from eigenprune.pruning.importance import node_importance

Backend = Literal["local", "ray"]


@dataclass(frozen=True)
class Chunk:
    """Students trained together: one teacher, one method, some widths, all trials and L2 strengths."""

    method: str
    widths: tuple[int, ...]
    trials: tuple[int, ...]
    teacher: int = 0
    strengths: tuple[float, ...] = (1.0,)
    split: bool = False  # a subset of the trials, split off by the memory planner

    @property
    def id(self) -> str:
        name = f"{self.method}-w{'_'.join(map(str, self.widths))}" + (f"-t{self.teacher}" if self.teacher else "")
        return name + (f"-tr{self.trials[0]}_{self.trials[-1]}" if self.split else "")

    def keys(self) -> list[tuple[int, int, float]]:
        """(width, trial, strength) of every student, in ensemble order."""
        return [(w, t, k) for w in self.widths for t in self.trials for k in self.strengths]


def plan_chunks(cfg: Config, pack_factor: float = 1.5) -> list[Chunk]:
    """Group widths (sorted) greedily while the padded size stays <= pack_factor x the real size;
    one chunk per (teacher, method, bucket of widths)."""
    buckets: list[list[int]] = []
    for w in sorted(set(cfg.student.widths)):
        if buckets and (len(buckets[-1]) + 1) * w <= pack_factor * (sum(buckets[-1]) + w):
            buckets[-1].append(w)
        else:
            buckets.append([w])
    trials, strengths = tuple(range(cfg.trials)), tuple(cfg.strengths())
    return [Chunk(method, tuple(b), trials, teacher, strengths)
            for teacher in range(len(cfg.teacher_list())) for method in cfg.methods for b in buckets]


def student_plans(cfg: Config, method: str, width: int, strength: float = 1.0, n_outputs: int = 1) -> list[LayerPlan]:
    """The paper's student: width N (spectral or direct, L2 x strength) -> rest (dense, no L2) -> sum readout.

    With `student.deep` the rest trains like the first layer (its own eigenvalues and L2); with
    `student.head: linear` the readout is a trainable dense layer with bias to `n_outputs`.
    """
    m = cfg.method(method)
    l2_phi, l2_lam = m.l2_phi * strength, m.l2_lam * strength
    if cfg.parity.l2_float32:  # Keras rounds its coefficients to float32 even in float64 runs
        l2_phi, l2_lam = float(np.float32(l2_phi)), float(np.float32(l2_lam))
    first = LayerPlan(width, method, l2_phi, l2_lam)
    return paper_student(first, list(cfg.student.rest), cfg.student.deep, cfg.student.head, n_outputs)


def student_file(method: str, width: int, trial: int, strength: float) -> str:
    """File name of a student's checkpoint inside its chunk's students/ folder."""
    return f"{method}-N{width}-t{trial}" + (f"-s{strength:g}" if strength != 1.0 else "") + ".safetensors"


def student_seed(cfg: Config, trial: int, width: int) -> int:
    """Spectral and direct students of one (trial, width) start from the same parameters."""
    return seeds.student_seed(cfg.seed, trial, width)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but no CUDA device is available; use --device cpu")
    return torch.device(name)


def make_data(cfg: Config) -> TrialData:
    """The trials' train/test sets: teacher data, or a per-trial split of digits or a CSV file."""
    d = cfg.data
    seed = seeds.data_seed(cfg.seed, d.seed)
    if d.source == "digits":
        return digits_data(cfg.trials, seed, d.test_fraction, getattr(torch, cfg.dtype))
    if d.source == "csv":  # the file's bytes are part of the run's identity: hashed as they are read
        digest = file_sha256(d.csv.path) if Path(d.csv.path).is_file() else None
        data = csv_data(d.csv.path, d.csv.target, d.csv.features, d.csv.task, cfg.trials, seed, d.test_fraction,
                        getattr(torch, cfg.dtype))
        return replace(data, source_sha256=digest)
    return teacher_set(d, seed, cfg.trials, getattr(torch, cfg.dtype))


def teacher_set(d: DataConfig, seed: int, trials: int, dtype: torch.dtype) -> TrialData:
    """Teacher-labelled train/test sets of `trials` trials for a data config (see `data.teacher_data`)."""
    t = d.teacher
    return teacher_data(t.kind, d.input_dim, list(t.widths), t.seed, seed, trials, d.n_train, d.n_test, t.latent_dim,
                        d.standardize_targets, dtype)


def validation_split(cfg: Config, n_train: int | None = None) -> int:
    """Training patterns actually trained on (on a regularization path, the rest of the training set is
    held out as the validation set that chooses the strength)."""
    n_train = cfg.data.n_train if n_train is None else n_train
    if cfg.regularization.mode != "path":
        return n_train
    n_fit = n_train - round(n_train * cfg.regularization.validation_fraction)
    if n_fit < 1 or n_fit == n_train:
        raise ConfigError(f"regularization.validation_fraction {cfg.regularization.validation_fraction} leaves no "
                          f"training or no validation patterns out of {n_train} training patterns")
    return n_fit


@dataclass
class LayerStats:
    """Per hidden layer of a chunk's students: importance, effective dimension and pruning curves."""

    scores: torch.Tensor
    effective_dim: torch.Tensor
    curves: torch.Tensor
    accuracy: torch.Tensor | None


def importance_groups(cfg: Config, keys: list[tuple[int, int, float]]) -> torch.Tensor | None:
    """The effective dimension's normalisation groups of a chunk's students (width, trial, strength):
    None (each student its own, ours), or one id per (width, strength) under `parity.effective_dim: authors`."""
    if cfg.parity.effective_dim != "authors":
        return None
    ids: dict[tuple[int, float], int] = {}
    return torch.tensor([ids.setdefault((w, k), len(ids)) for w, _, k in keys])


def layer_stats(cfg: Config, ens: Ensemble, data: TrialData, trial_index: torch.Tensor,
                groups: torch.Tensor | None = None) -> list[LayerStats]:
    stats = []
    for layer in range(len(ens.layers) - 1):
        scores = node_importance(ens.layers[layer])
        g = None if groups is None else groups.to(scores.device)
        eff = effective_dim(scores, cfg.analysis.threshold, ens.layers[layer].widths, g, at_least=groups is not None)
        curves = pruning_curves(ens, layer, scores, data.x_test, data.y_test, trial_index, data.task)
        acc = (pruning_curves(ens, layer, scores, data.x_test, data.y_test, trial_index, data.task, metric="accuracy")
               if data.task == "classification" else None)
        stats.append(LayerStats(scores.cpu(), eff.cpu(), curves.cpu(), None if acc is None else acc.cpu()))
    return stats


@dataclass
class Prepared:
    """A chunk ready to train: its students stacked on the device, which trial each uses, the training
    spec, every trial's shuffle seed, and how many training patterns it fits (the rest validates)."""

    ens: Ensemble
    trial_index: torch.Tensor
    spec: TrainSpec
    shuffle: list[int]
    n_fit: int


def prepare_chunk(cfg: Config, chunk: Chunk, data: TrialData, device: torch.device) -> Prepared:
    dtype = getattr(torch, cfg.dtype)
    keys = chunk.keys()
    input_dim = data.x_train.shape[-1]
    students = [make_student(input_dim, student_plans(cfg, chunk.method, w, k, data.n_outputs), student_seed(cfg, t, w), dtype)
                for w, t, k in keys]
    m = cfg.method(chunk.method)
    return Prepared(
        ens=Ensemble(students).to(device), trial_index=torch.tensor([t for _, t, _ in keys], device=device),
        spec=TrainSpec(lr=m.lr, batch_size=m.batch_size, epochs=m.epochs, task=data.task, backprop=cfg.backprop,
                       cuda_graph=cfg.cuda_graphs, optimizer=cfg.parity.optimizer),
        shuffle=seeds.shuffle_seeds(cfg.seed, cfg.trials), n_fit=validation_split(cfg, data.x_train.shape[1]),
    )


def run_chunk(cfg: Config, chunk: Chunk, data: TrialData, device: torch.device, progress: Progress) -> tuple[dict, Ensemble, list]:
    """Train one chunk on its teacher's `data` and measure every student; returns (tables, ensemble, keys)."""
    cfg = cfg.for_teacher(chunk.teacher)
    keys = chunk.keys()
    input_dim = data.x_train.shape[-1]
    dtype = getattr(torch, cfg.dtype)
    prep = prepare_chunk(cfg, chunk, data, device)
    ens, trial_index, n_fit, m = prep.ens, prep.trial_index, prep.n_fit, cfg.method(chunk.method)
    fit_x, fit_y = data.x_train[:, :n_fit], data.y_train[:, :n_fit]
    label = f"{chunk.method} N={','.join(map(str, chunk.widths))}" + (f" h_T={cfg.data.teacher.widths[0]}" if chunk.teacher else "")
    bar = progress.add(f"{label} ({len(keys)} students)", m.epochs)
    log = train_ensemble(ens, fit_x, fit_y, trial_index, prep.spec, prep.shuffle, lambda e, loss: progress.update(bar, e + 1, loss))
    per_epoch = log.steps // m.epochs
    metrics = {"train_loss": evaluate(ens, fit_x, fit_y, trial_index, data.task),
               "test_loss": evaluate(ens, data.x_test, data.y_test, trial_index, data.task)}
    metrics["val_loss"] = (evaluate(ens, data.x_train[:, n_fit:], data.y_train[:, n_fit:], trial_index, data.task)
                           if n_fit < data.x_train.shape[1] else torch.full_like(metrics["train_loss"], float("nan")))
    if data.task == "classification":
        metrics["train_accuracy"] = evaluate(ens, fit_x, fit_y, trial_index, data.task, metric="accuracy")
        metrics["test_accuracy"] = evaluate(ens, data.x_test, data.y_test, trial_index, data.task, metric="accuracy")
    groups = importance_groups(cfg, keys)
    stats = layer_stats(cfg, ens, data, trial_index, groups)
    normalized = normalized_importance(stats[0].scores, groups)
    search_widths, search_kept = joint_search(ens, [st.scores.to(device) for st in stats], fit_x, fit_y, trial_index, data.task,
                                         cfg.analysis.search_rel_tol)
    metrics["search_test_loss"] = evaluate(ens, data.x_test, data.y_test, trial_index, data.task, kept=search_kept)
    if data.task == "classification":
        metrics["search_test_accuracy"] = evaluate(ens, data.x_test, data.y_test, trial_index, data.task, kept=search_kept,
                                                   metric="accuracy")
    metrics = {k: v.cpu() for k, v in metrics.items()}
    t_widths = list(cfg.data.teacher.widths) if cfg.data.source == "teacher" else []
    teacher = None
    if cfg.data.source == "teacher" and cfg.data.teacher.kind == "mlp" and len(t_widths) >= 2 and len(ens.layers) >= 3:
        teacher = make_teacher(input_dim, t_widths, cfg.data.teacher.seed, dtype)
    h_t = t_widths[0] if t_widths else np.nan
    results, curve_rows, imp_rows, layer_rows = [], [], [], []
    for s, (w, t, k) in enumerate(keys):
        step = int(log.failed_step[s])
        failed = step >= 0
        reason = (f"loss became {float(log.failed_loss[s])} at step {step} (epoch {step // per_epoch}); "
                  "frozen from the end of that epoch") if failed else ""
        base = {"teacher_index": chunk.teacher, "method": chunk.method, "width": w, "trial": t, "strength": k}
        per_layer = []
        for layer, st in enumerate(stats):
            n = int(ens.layers[layer].widths[s])
            kept = np.arange(1, n + 1)
            curve = st.curves[s, :n].numpy()
            full = float(curve[-1])  # the full model through the same computation: delta is exactly 0 at k = n
            with np.errstate(invalid="ignore"):  # a failed student's curve is NaN
                delta = curve - full
            n_c = -1 if failed else critical_point(kept, delta, cfg.analysis.critical_rel_tol * full)
            t_w = t_widths[layer] if layer < len(t_widths) else np.nan
            row = {**base, "layer": layer, "layer_width": n, "teacher_layer_width": t_w,
                   "effective_dim": int(st.effective_dim[s]), "critical_point": n_c, "search_width": int(search_widths[layer][s])}
            frame = {**base, "layer": layer, "kept": kept, "test_loss": curve, "delta_loss": delta,
                     "kept_minus_teacher": kept - t_w}
            if st.accuracy is not None:
                acc = st.accuracy[s, :n].numpy()
                frame["test_accuracy"] = acc
                row["width_within_accuracy_tol"] = int(kept[np.nonzero(acc >= acc[-1] - cfg.analysis.accuracy_tol)[0][0]])
            per_layer.append(row)
            curve_rows.append(pd.DataFrame(frame))
        layer_rows += per_layer
        compared = {"path_distance": np.nan, "in_strength_distance": np.nan}
        if teacher is not None and not failed:
            cmp = teacher_comparison(ens.student(s).cpu(), teacher, min(t_widths[0], w))
            compared = {c: cmp[c] for c in compared}
        results.append({
            **base, "teacher_kind": cfg.data.teacher.kind if cfg.data.source == "teacher" else cfg.data.source,
            "teacher_widths": ",".join(map(str, t_widths)), "teacher_width": h_t, "target_scale": data.target_scale,
            **{name: float(v[s]) for name, v in metrics.items()},
            "effective_dim": per_layer[0]["effective_dim"] if not failed else -1,
            "critical_point": per_layer[0]["critical_point"] if not failed else -1,
            "search_widths": ",".join(str(r["search_width"]) for r in per_layer), **compared,
            "status": "failed" if failed else "ok",
            "failed_step": step, "fail_reason": reason,
            "lr": m.lr, "batch_size": m.batch_size, "epochs": m.epochs, "steps": log.steps,
            "l2_phi": m.l2_phi * k, "l2_lam": m.l2_lam * k if chunk.method == "spectral" else 0.0,
            "seed": student_seed(cfg, t, w), "chunk": chunk.id,
            "checkpoint": f"chunks/{chunk.id}/students/{student_file(chunk.method, w, t, k)}" if cfg.save_students else "",
        })
        scores, norm = stats[0].scores[s, :w], normalized[s, :w]
        if cfg.parity.importance_scale == "sqrt_n":  # the authors' RescaledEigenvalue
            scores = scores * w**0.5
        imp_rows.append(pd.DataFrame({**base, "node": np.arange(w), "importance": scores.numpy(), "normalized": norm.numpy()}))
    tables = {"results": pd.DataFrame(results), "curves": pd.concat(curve_rows, ignore_index=True),
              "importance": pd.concat(imp_rows, ignore_index=True), "layers": pd.DataFrame(layer_rows)}
    return tables, ens, keys


SUMMARY_COLUMNS = ("train_loss", "val_loss", "test_loss", "effective_dim", "critical_point", "path_distance",
                   "in_strength_distance", "search_test_loss", "train_accuracy", "test_accuracy", "search_test_accuracy")


def summarize(cfg: Config, results: pd.DataFrame, curves: pd.DataFrame) -> dict:
    """Per (teacher, method, width, strength): trial counts, and mean and std over the trials that trained
    (status ok) of losses, effective dimension, critical point, teacher distances and delta loss at the
    probe kept counts (None where no trial of the group trained)."""
    ok = results[results.status == "ok"]
    out: dict = {"teachers": [list(t.widths) for t in cfg.teacher_list()], "threshold": cfg.analysis.threshold,
                 "regularization": cfg.regularization.mode, "groups": []}
    ok_curves = curves[curves.layer == 0].merge(ok[STUDENT_KEYS], on=STUDENT_KEYS)
    for key, g in results.groupby(GROUP_KEYS):
        good = g[g.status == "ok"]
        row = {**dict(zip(GROUP_KEYS, key)), "teacher_width": float(g.teacher_width.iloc[0]),
               "trials_ok": len(good), "trials_failed": len(g) - len(good)}
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
        for flag in ("selected_best", "selected_1se", "selected_stable"):
            if flag in g:
                row[flag] = bool(g[flag].any())
        for col in [c for c in SUMMARY_COLUMNS if c in g]:
            row[f"{col}_mean"] = float(good[col].mean()) if len(good) else None
            row[f"{col}_std"] = float(good[col].std(ddof=0)) if len(good) else None
        sel = ok_curves.merge(pd.DataFrame([dict(zip(GROUP_KEYS, key))]), on=GROUP_KEYS)
        for k in cfg.analysis.probe_kept:
            at = sel[sel.kept == k]
            if len(at):
                row[f"delta_loss_at_{k}_mean"] = float(at.delta_loss.mean())
                row[f"delta_loss_at_{k}_std"] = float(at.delta_loss.std(ddof=0))
        out["groups"].append(row)
    return out


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


def check_memory(
    cfg: Config, chunks: list[Chunk], workers: int, device: torch.device, shape: tuple[int, int, int, int] | None = None,
) -> tuple[list[Chunk], dict]:
    """Fit the chunks into memory before anything runs: split a chunk that is too large into groups of
    trials that fit, and refuse (ConfigError) one that does not fit even with a single trial.

    The limit is `max_memory_gb`, or DEFAULT_FRACTION of the memory available now (free GPU memory on
    CUDA), shared by the `workers` chunks that run at once. `shape` = (inputs, training patterns, test
    patterns, outputs) of real data (default: the teacher config's). Returns the chunks to run and the
    figures for the manifest.
    """
    if cfg.max_memory_gb is not None:
        limit, source = cfg.max_memory_gb * 1e9, f"max_memory_gb {cfg.max_memory_gb:g}"
    else:
        free = available_bytes(device)
        limit, source = DEFAULT_FRACTION * free, f"{DEFAULT_FRACTION:.0%} of the {gb(free)} available on {device.type}"
    per_worker = limit / max(workers, 1)
    if workers > 1:
        source += f", shared by {workers} workers"
    if (teacher := teacher_memory(cfg)) > per_worker:
        raise ConfigError(f"the teacher needs about {gb(teacher)} to label the data, more than the {gb(per_worker)} limit "
                          f"({source}); lower data.teacher.widths (or data.n_train, n_test) or set max_memory_gb")
    fitted = []
    for c in chunks:
        need = chunk_memory(cfg, c, shape)
        if need <= per_worker:
            fitted.append(c)
            continue
        size = _most_trials(lambda m, c=c: chunk_memory(cfg, replace(c, trials=c.trials[:m], split=True), shape) <= per_worker,
                            len(c.trials) - 1)
        if not size:
            raise ConfigError(
                f"chunk {c.id} ({len(c.keys())} students) needs about {gb(need)}, more than the "
                f"{gb(per_worker)} limit ({source}); lower trials, widths or n_train, use fewer workers, or set max_memory_gb"
            )
        fitted += [replace(c, trials=c.trials[i : i + size], split=True) for i in range(0, len(c.trials), size)]
    need = {c.id: chunk_memory(cfg, c, shape) for c in fitted}
    return fitted, {"memory_limit_bytes": int(per_worker), "memory_estimate_bytes": need}


def teacher_memory(cfg: Config) -> int:
    """Estimated peak bytes of making teacher data (0 for real data): the largest teacher's weights and
    its activations on one trial's training and test inputs."""
    if cfg.data.source != "teacher":
        return 0
    d, size = cfg.data, torch.tensor([], dtype=getattr(torch, cfg.dtype)).element_size()
    need = 0
    for t in cfg.teacher_list():
        sizes = [t.latent_dim if t.kind == "hidden_manifold" else d.input_dim, *t.widths, 1]
        params = sum(a * b for a, b in zip(sizes, sizes[1:]))
        need = max(need, size * (params + 2 * (d.n_train + d.n_test) * max(sizes)))
    return need


def _most_trials(fits: Callable[[int], bool], most: int) -> int:
    """The largest m in 1..most with fits(m) (memory grows with the trials in a chunk), or 0: a bisection,
    so that a chunk of 100,000 trials is planned in microseconds, not by trying every size."""
    low, high = 0, most
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def chunk_memory(cfg: Config, chunk: Chunk, shape: tuple[int, int, int, int] | None = None) -> int:
    """Estimated peak bytes of training and measuring one chunk (see `memory.chunk_bytes`);
    `shape` = (inputs, training patterns, test patterns, outputs), default: the teacher config's."""
    d = cfg.data
    inputs, n_train, n_test, outputs = shape or (d.input_dim, d.n_train, d.n_test, 1)
    widths = [inputs, max(chunk.widths), *cfg.student.rest, outputs]
    size = torch.tensor([], dtype=getattr(torch, cfg.dtype)).element_size()
    n_students = len(chunk.widths) * len(chunk.trials) * len(chunk.strengths)
    return chunk_bytes(n_students, cfg.trials, widths, n_train, n_test, cfg.method(chunk.method).batch_size, size)


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
        for s, (w, t, k) in enumerate(keys):
            meta = {"method": chunk.method, "width": w, "trial": t, "strength": k, "teacher_index": chunk.teacher,
                    "config_digest": cfg.digest(), "data_sha256": data.source_sha256}
            files[f"students/{student_file(chunk.method, w, t, k)}"] = model_bytes(ens.student(s).cpu(), meta)
    return ChunkResult(chunk.id, tables, files, time.perf_counter() - start)


def _chunk_job(cfg_data: dict, threads: int, data_sha256: str | None, chunk: Chunk, progress: Progress) -> ChunkResult:
    """Entry point in a worker process or Ray task: rebuild the (seeded, hence identical) data, train one chunk.

    Data read from a user's file must have the bytes the driver saw (`data_sha256`), or the chunk is refused.
    """
    if threads:
        torch.set_num_threads(threads)
    cfg = Config.model_validate(cfg_data)
    device = resolve_device(cfg.device)
    data = make_data(cfg.for_teacher(chunk.teacher))
    check_same_data(cfg, data, data_sha256)
    return train_chunk(cfg, chunk, data.to(device), device, progress)


def check_same_data(cfg: Config, data: TrialData, data_sha256: str | None) -> None:
    """Refuse (`DataError`) data whose source file is no longer the one the run started on."""
    if data.source_sha256 != data_sha256:
        raise DataError(f"{cfg.data.csv.path} changed while the run was going (sha256 {str(data_sha256)[:12]} at the start, "
                        f"{str(data.source_sha256)[:12]} now); finished chunks are kept, rerun once the file is final")


def adam_steps(cfg: Config, method: str, n_fit: int) -> tuple[int, int]:
    """(batch size, Adam steps of the whole training) of a `method` student fitting `n_fit` patterns."""
    m = cfg.method(method)
    batch = min(m.batch_size, n_fit)
    return batch, m.epochs * -(-n_fit // batch)


def data_shape(cfg: Config) -> tuple[tuple[int, int, int, int] | None, str | None]:
    """(inputs, training patterns, test patterns, outputs) of real data (None for teacher data, whose
    shape is the config's), and the sha256 of the user's file it came from (None if none); loading it
    here makes bad data fail before a run folder exists."""
    shape, digest = None, None
    if cfg.data.source != "teacher":
        real = make_data(cfg)
        shape = (real.x_train.shape[-1], real.x_train.shape[1], real.x_test.shape[1], real.n_outputs)
        digest = real.source_sha256
    n_train = shape[1] if shape else cfg.data.n_train
    n_fit = validation_split(cfg, n_train)
    for method in cfg.methods:
        batch = cfg.method(method).batch_size
        if batch > n_fit:
            held = f" ({n_train - n_fit} of the {n_train} are held out for validation)" if n_fit < n_train else ""
            raise ConfigError(f"{method}.batch_size {batch} is larger than the {n_fit} training patterns{held}; "
                              f"use a batch_size of at most {n_fit}")
    return shape, digest


def local_plan(cfg: Config, chunks: list[Chunk], shape: tuple[int, int, int, int] | None):
    """Where and how the local backend runs `chunks`: (device, worker processes, torch threads per
    worker, the chunks after the memory planner, the memory figures). Raises ConfigError first."""
    device = resolve_device(cfg.device)
    if cfg.backprop == "fused":
        check_fused(cfg, device, shape)
    workers = min(cfg.workers or os.cpu_count() or 1, len(chunks)) if device.type == "cpu" else 1
    threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    chunks, memory = check_memory(cfg, chunks, workers, device, shape)
    return device, workers, threads, chunks, memory


def plan_run(cfg: Config, measure_steps: int = 0) -> tuple[pd.DataFrame, dict]:
    """What `run_experiment` would train, without writing anything: one row per chunk (after the memory
    planner) with its students, padded width, Adam steps and memory estimate, and the run's device,
    workers and memory limit. With `measure_steps`, each chunk also trains at least that many steps
    (random data of the chunk's shape, on the config's device, with its threads per worker) and the
    steady time per step is extrapolated to the chunk's training: an estimate that leaves out
    evaluation and analysis, and the slowdown of workers running side by side.
    """
    shape, _ = data_shape(cfg)
    chunks = sorted(plan_chunks(cfg), key=lambda c: -chunk_cost(cfg, c))
    device, workers, threads, chunks, memory = local_plan(cfg, chunks, shape)
    inputs, n_train, _, outputs = shape or (cfg.data.input_dim, cfg.data.n_train, 0, 1)
    n_fit = validation_split(cfg, n_train)
    rows = []
    for c in chunks:
        batch, steps = adam_steps(cfg, c.method, n_fit)
        row = {"chunk": c.id, "students": len(c.keys()), "padded_width": max(c.widths), "steps": steps,
               "memory_gb": memory["memory_estimate_bytes"][c.id] / 1e9}
        if measure_steps:
            with _torch_threads(threads):
                row["step_ms"] = 1e3 * _time_steps(cfg, c, inputs, outputs, n_fit, batch, measure_steps, device)
            row["train_s_estimate"] = row["steps"] * row["step_ms"] / 1e3
        rows.append(row)
    info = {"device": str(device), "workers": workers, "threads_per_worker": threads, "memory_limit_gb": memory["memory_limit_bytes"] / 1e9}
    if measure_steps:  # the workers take the chunks in this order (run_experiment's), each the next free one
        loads = [0.0] * workers
        for r in rows:
            loads[loads.index(min(loads))] += r["train_s_estimate"]
        info.update({"train_s_estimate_sequential": sum(r["train_s_estimate"] for r in rows), "train_s_estimate_wall": max(loads)})
    return pd.DataFrame(rows), info


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _time_steps(cfg: Config, chunk: Chunk, inputs: int, outputs: int, n_fit: int, batch: int, steps: int,
                device: torch.device) -> float:
    """Seconds per Adam step of `chunk` on random data of its shape (at most its `n_fit` training
    patterns): at least `steps` steps are timed, after two epochs that are not (the first pays one-off
    costs, the second captures a CUDA graph where the config asks for one)."""
    per_epoch = min(max(1, -(-steps // 2)), -(-n_fit // batch))
    timed = max(2, -(-steps // per_epoch))
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, cfg.dtype)
    x = torch.randn(cfg.trials, min(per_epoch * batch, n_fit), inputs, generator=gen, dtype=dtype)
    classify = cfg.data.source == "digits" or (cfg.data.source == "csv" and cfg.data.csv.task == "classification")
    y = (torch.randint(0, outputs, x.shape[:2], generator=gen) if classify
         else torch.randn(x.shape[:2], generator=gen, dtype=dtype))
    data = TrialData(x, y, x[:, :1], y[:, :1], "classification" if classify else "regression", outputs).to(device)
    prep = prepare_chunk(cfg, chunk, data, device)
    stamps: list[float] = []

    def on_epoch(epoch: int, loss: float) -> None:  # the loss was read back: the device has finished the epoch
        stamps.append(time.perf_counter())

    log = train_ensemble(prep.ens, data.x_train, data.y_train, prep.trial_index, replace(prep.spec, epochs=2 + timed, batch_size=batch),
                         prep.shuffle, on_epoch)
    return (stamps[-1] - stamps[1]) / (timed * log.steps // (2 + timed))


def check_fused(cfg: Config, device: torch.device | None, shape: tuple[int, int, int, int] | None = None) -> None:
    """Refuse `backprop: fused` before anything is written where its kernels cannot run these students."""
    input_dim, n_outputs = (shape[0], shape[3]) if shape else (cfg.data.input_dim, 1)
    method, width = cfg.methods[0], max(cfg.student.widths)
    try:
        fused.check(Ensemble([make_student(input_dim, student_plans(cfg, method, width, 1.0, n_outputs), 0)]).layers, device)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def run_experiment(
    cfg: Config, out: str | Path, fresh: bool = False, quiet: bool = False, backend: Backend = "local", address: str | None = None,
    finish: Callable[[RunFolder], object] | None = None,
) -> Path:
    """Run every chunk of `cfg` not already finished in `out`, then merge, summarize and report.

    local: on the CPU, chunks run in `cfg.workers` processes (0 = one per core); on CUDA, in this
    process. ray: each chunk is a Ray task (`address` of a cluster, or a private local instance).
    Finished chunks are committed as they arrive, so an interrupted run resumes where it stopped.
    `finish(folder)` runs last, while the folder is still locked (the CLI builds the report there).
    """
    if address is not None and backend != "ray":
        raise ConfigError("--address is only used with --backend ray")
    shape, data_sha256 = data_shape(cfg)
    chunks = plan_chunks(cfg)
    folder = RunFolder(out)
    resumable = not fresh and folder.check_ours() is not None  # prepare() below refuses another config's or data's folder
    skipped = [c.id for c in chunks if resumable and folder.done(c.id)]
    todo = sorted((c for c in chunks if c.id not in skipped), key=lambda c: -chunk_cost(cfg, c))
    if backend == "ray":
        require_ray()
        device = torch.device(cfg.device if cfg.device != "auto" else "cpu")  # resolved inside each task
        workers, threads = cfg.workers, 1
        if cfg.backprop == "fused":
            check_fused(cfg, None, shape)  # the students; each task checks its own device
        if device.type == "cpu" or cfg.max_memory_gb:
            todo, memory = check_memory(cfg, todo, 1, torch.device("cpu"), shape)
        else:
            memory = {}
    else:
        device, workers, threads, todo, memory = local_plan(cfg, todo, shape)
    split_done = [c.id for c in todo if c.split and resumable and folder.done(c.id)]  # resuming a split chunk
    skipped += split_done
    todo = [c for c in todo if c.id not in split_done]
    run = {"backend": backend, "ray_address": address, "ray": _version("ray") if backend == "ray" else None,
           "workers": workers, "threads_per_worker": threads, **memory}
    with contextlib.ExitStack() as stack:
        if backend == "ray":
            stack.enter_context(ray_session(address, cfg.workers or None))  # before anything is written
        folder.prepare(cfg, fresh=fresh, data_digest=data_sha256)
        stack.callback(folder.release)
        torch.manual_seed(cfg.seed)
        start = time.perf_counter()
        with Progress(quiet=quiet) as progress:
            if backend == "ray":
                job = functools.partial(_chunk_job, cfg.model_dump(), threads, data_sha256)
                run_ray(job, todo, folder.commit_chunk, progress, gpus_per_task=1 if device.type == "cuda" else 0)
            elif workers > 1:
                job = functools.partial(_chunk_job, cfg.model_dump(), threads, data_sha256)
                run_local(job, todo, folder.commit_chunk, progress, workers)
            elif todo:
                data = {t: make_data(cfg.for_teacher(t)) for t in sorted({c.teacher for c in todo})}
                for d in data.values():
                    check_same_data(cfg, d, data_sha256)
                data = {t: d.to(device) for t, d in data.items()}
                run_local(lambda chunk, p: train_chunk(cfg, chunk, data[chunk.teacher], device, p), todo, folder.commit_chunk, progress)
        ids = skipped + [c.id for c in todo]
        tables = folder.merge(ids)
        tables["results"] = select_strengths(tables["results"])
        folder.write("results.parquet", parquet_writer(tables["results"]))
        folder.write_json("summary.json", summarize(cfg, tables["results"], tables["curves"]))
        info = manifest(cfg, device, time.perf_counter() - start, ids, skipped, run)
        folder.write_json("manifest.json", {**info, "chunk_train_seconds": folder.chunk_seconds(ids)})
        if finish is not None:
            finish(folder)
    return folder.path
