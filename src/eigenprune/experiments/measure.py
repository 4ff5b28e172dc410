"""Training one chunk and measuring every student in it: the run's tables (results, curves,
importance, layers), its checkpoints, and the summary over trials."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from eigenprune.batched.curves import joint_search, pruning_curves
from eigenprune.batched.ensemble import Ensemble
from eigenprune.batched.memory import reuse_freed_memory
from eigenprune.batched.train import evaluate, train_ensemble
from eigenprune.core.plans import make_student
from eigenprune.core.training import TrainSpec
from eigenprune.experiments import seeds
from eigenprune.experiments.analysis import critical_point, effective_dim, normalized_importance, teacher_comparison
from eigenprune.experiments.builders import make_teacher
from eigenprune.experiments.config import Config
from eigenprune.experiments.data import TrialData
from eigenprune.experiments.grid import Chunk, chunk_tile, student_file, student_plans, student_seed, validation_split
from eigenprune.experiments.progress import Progress
from eigenprune.experiments.store import GROUP_KEYS, STUDENT_KEYS, ChunkResult
from eigenprune.pruning.checkpoint import model_bytes
from eigenprune.pruning.importance import node_importance


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
    """Stack a chunk's students on `device` (in every process that trains, freed memory is kept for reuse:
    `batched.memory.reuse_freed_memory`)."""
    reuse_freed_memory()
    dtype = getattr(torch, cfg.dtype)
    keys = chunk.keys()
    input_dim = data.x_train.shape[-1]
    students = [make_student(input_dim, student_plans(cfg, chunk.method, w, k, data.n_outputs), student_seed(cfg, t, w), dtype)
                for w, t, k in keys]
    m = cfg.method(chunk.method)
    ens = Ensemble(students).to(device)
    n_fit = validation_split(cfg, data.x_train.shape[1])
    tile = chunk_tile(cfg, len(keys), max(chunk.widths), min(m.batch_size, n_fit), device, ens.layers)
    return Prepared(
        ens=ens, trial_index=torch.tensor([t for _, t, _ in keys], device=device),
        spec=TrainSpec(lr=m.lr, batch_size=m.batch_size, epochs=m.epochs, task=data.task, backprop=cfg.backprop,
                       cuda_graph=cfg.cuda_graphs, optimizer=cfg.parity.optimizer, compile=cfg.compile, tile=tile),
        shuffle=seeds.shuffle_seeds(cfg.seed, cfg.trials), n_fit=n_fit,
    )


def run_chunk(cfg: Config, chunk: Chunk, data: TrialData, device: torch.device,
              progress: Progress) -> tuple[dict, Ensemble, list, float]:
    """Train one chunk on its teacher's `data` and measure every student; returns (tables, ensemble, keys,
    seconds the training loop took)."""
    cfg = cfg.for_teacher(chunk.teacher)
    keys = chunk.keys()
    input_dim = data.x_train.shape[-1]
    dtype = getattr(torch, cfg.dtype)
    prep = prepare_chunk(cfg, chunk, data, device)
    ens, trial_index, n_fit, m = prep.ens, prep.trial_index, prep.n_fit, cfg.method(chunk.method)
    fit_x, fit_y = data.x_train[:, :n_fit], data.y_train[:, :n_fit]
    label = f"{chunk.method} N={','.join(map(str, chunk.widths))}" + (f" h_T={cfg.data.teacher.widths[0]}" if chunk.teacher else "")
    label += f" trials {chunk.trials[0]}-{chunk.trials[-1]}" if chunk.split else ""
    bar = progress.add(f"{label} ({len(keys)} students)", m.epochs)
    start = time.perf_counter()
    log = train_ensemble(ens, fit_x, fit_y, trial_index, prep.spec, prep.shuffle, lambda e, loss: progress.update(bar, e + 1, loss))
    train_seconds = time.perf_counter() - start  # the log is read back to the host: the device has finished
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
    return tables, ens, keys, train_seconds


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


def train_chunk(cfg: Config, chunk: Chunk, data: TrialData, device: torch.device, progress: Progress) -> ChunkResult:
    """Train one chunk; its tables and student checkpoints (safetensors bytes) ready to commit."""
    start = time.perf_counter()
    tables, ens, keys, train_seconds = run_chunk(cfg, chunk, data, device, progress)
    files = {}
    if cfg.save_students:
        for s, (w, t, k) in enumerate(keys):
            meta = {"method": chunk.method, "width": w, "trial": t, "strength": k, "teacher_index": chunk.teacher,
                    "config_digest": cfg.digest(), "data_sha256": data.source_sha256}
            files[f"students/{student_file(chunk.method, w, t, k)}"] = model_bytes(ens.student(s).cpu(), meta)
    return ChunkResult(chunk.id, tables, files, time.perf_counter() - start, train_seconds)
