"""Training one chunk and measuring every student in it: the run's tables (results, curves,
importance, layers), its checkpoints, and the summary over trials."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from eigenprune.batched import tiled
from eigenprune.batched.curves import joint_search
from eigenprune.batched.ensemble import Ensemble
from eigenprune.batched.train import evaluate
from eigenprune.core.training import TrainSpec
from eigenprune.experiments import experiment_seeds
from eigenprune.experiments.analysis import critical_point, normalized_importance, teacher_comparison
from eigenprune.experiments.builders import make_teacher, student_plans
from eigenprune.experiments.config import Config
from eigenprune.experiments.data import TrialData
from eigenprune.experiments.grid import Chunk
from eigenprune.experiments.group import GroupResult, StudentGroup, eigenvalue_scores, measure_group
from eigenprune.experiments.progress import Progress
from eigenprune.experiments.store import GROUP_KEYS, STUDENT_KEYS, ChunkResult
from eigenprune.pruning.checkpoint import model_bytes


def student_file(method: str, width: int, trial: int, strength: float) -> str:
    """File name of a student's checkpoint inside its chunk's students/ folder."""
    return f"{method}-N{width}-t{trial}" + (f"-s{strength:g}" if strength != 1.0 else "") + ".safetensors"


def importance_groups(cfg: Config, keys: list[tuple[int, int, float]]) -> torch.Tensor | None:
    """The effective dimension's normalisation groups of a chunk's students (width, trial, strength):
    None (each student its own, ours), or one id per (width, strength) under `parity.effective_dim: authors`."""
    if cfg.parity.effective_dim != "authors":
        return None
    ids: dict[tuple[int, float], int] = {}
    return torch.tensor([ids.setdefault((w, k), len(ids)) for w, _, k in keys])


TILE_FROM = 2**22
"""With `tile: auto`, the first layer runs tiled (`batched.tiled`) in chunks whose step holds more than this
many first-layer activations (students x batch rows x padded nodes), on a CPU: where the step is bound by
memory traffic (see `grid.PAD_LIMIT`); narrower chunks keep the eager step (measured: docs/benchmarks.md, speed
round 5)."""


def chunk_tile(cfg: Config, students: int, width: int, batch: int, device: torch.device, layers) -> int:
    """The `TrainSpec.tile` of a chunk of `students` padded to `width`, trained in batches of `batch` rows on
    `device`; `layers`: its stacked layers or one student's layer plans (a first layer with bias, or a single layer,
    is never tiled by auto)."""
    if cfg.tile != "auto":
        return cfg.tile
    if cfg.backprop != "manual" or cfg.compile_step or device.type != "cpu" or tiled.applies(layers) is not None:
        return 0
    return tiled.TILE if students * batch * width > TILE_FROM else 0


def chunk_group(cfg: Config, chunk: Chunk, data: TrialData, device: torch.device) -> StudentGroup:
    """A chunk's students (of `cfg.for_teacher(chunk.teacher)`): plans, seeds (spectral and direct students of one
    (trial, width) start from the same parameters), trials, the method's training spec (tiled on `device` where
    `chunk_tile` says so) and every trial's batch order."""
    keys = chunk.keys()
    plans = [student_plans(cfg, chunk.method, w, k, data.n_outputs) for w, _, k in keys]
    n_fit = cfg.regularization.n_fit(data.x_train.shape[1])
    tile = chunk_tile(cfg, len(keys), max(chunk.widths), min(cfg.method(chunk.method).batch_size, n_fit), device, plans[0])
    label = f"{chunk.method} N={','.join(map(str, chunk.widths))}" + (f" h_T={cfg.data.teacher.widths[0]}" if chunk.teacher else "")
    label += f" trials {chunk.trials[0]}-{chunk.trials[-1]}" if chunk.split else ""
    return StudentGroup(
        plans=plans,
        seeds=[experiment_seeds.student_seed(cfg.seed, t, w) for w, t, _ in keys], trials=[t for _, t, _ in keys],
        spec=replace(cfg.train_spec(chunk.method, data.task), tile=tile), shuffle=experiment_seeds.shuffle_seeds(cfg.seed, cfg.trials),
        dtype=getattr(torch, cfg.dtype), label=f"{label} ({len(keys)} students)")


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
    """Stack a chunk's students on `device`, untrained (for timing and tests; a run trains through `run_chunk`)."""
    group = chunk_group(cfg, chunk, data, device)
    ens, trial_index = group.stack(data.x_train.shape[-1], device)
    return Prepared(ens, trial_index, group.spec, group.shuffle, cfg.regularization.n_fit(data.x_train.shape[1]))


@dataclass
class ChunkRun:
    """A trained and measured chunk: its tables (results, curves, importance, layers), the trained ensemble, each
    student's (width, trial, strength) in ensemble order, and the seconds the training loop took."""

    tables: dict[str, pd.DataFrame]
    ens: Ensemble
    keys: list[tuple[int, int, float]]
    train_seconds: float


def run_chunk(cfg: Config, chunk: Chunk, data: TrialData, device: torch.device, progress: Progress) -> ChunkRun:
    """Train one chunk on its teacher's `data` and measure every student (`measure_group`, every hidden layer),
    then the joint search (`search`), the distances to the teacher (`teacher_distances`) and the tables."""
    cfg = cfg.for_teacher(chunk.teacher)
    keys = chunk.keys()
    n_fit = cfg.regularization.n_fit(data.x_train.shape[1])
    result = measure_group(chunk_group(cfg, chunk, data, device), data, n_fit, device, scorers={"eigenvalue": eigenvalue_scores},
                           layers=None, threshold=cfg.analysis.threshold, groups=importance_groups(cfg, keys), progress=progress)
    search_widths = search(cfg, result, data, n_fit)
    distances = teacher_distances(cfg, result, keys, data.x_train.shape[-1])
    tables = chunk_tables(cfg, chunk, result, data, search_widths, distances)
    return ChunkRun(tables, result.ens, keys, result.train_seconds)


def search(cfg: Config, result: GroupResult, data: TrialData, n_fit: int) -> list[torch.Tensor]:
    """The joint search of every hidden layer's width (`batched.curves.joint_search`, on the training patterns):
    adds search_test_loss (and search_test_accuracy) to `result.metrics`; returns per layer the widths [S] kept."""
    ens, ti, device = result.ens, result.trial_index, result.trial_index.device
    stats = result.stats["eigenvalue"]
    widths, kept = joint_search(ens, [st.scores.to(device) for st in stats], data.x_train[:, :n_fit], data.y_train[:, :n_fit], ti,
                                data.task, cfg.analysis.search_rel_tol)
    result.metrics["search_test_loss"] = evaluate(ens, data.x_test, data.y_test, ti, data.task, kept=kept).cpu()
    if data.task == "classification":
        result.metrics["search_test_accuracy"] = evaluate(ens, data.x_test, data.y_test, ti, data.task, kept=kept,
                                                          metric="accuracy").cpu()
    return widths


def teacher_distances(cfg: Config, result: GroupResult, keys: list[tuple[int, int, float]], input_dim: int) -> list[dict]:
    """Per student, path_distance and in_strength_distance to an MLP teacher of two or more hidden layers
    (`analysis.teacher_comparison`); NaN for other data, shallower students and failed students."""
    nothing = {"path_distance": np.nan, "in_strength_distance": np.nan}
    t_widths = list(cfg.data.teacher.widths)
    if cfg.data.source != "teacher" or cfg.data.teacher.kind != "mlp" or len(t_widths) < 2 or len(result.ens.layers) < 3:
        return [dict(nothing) for _ in keys]
    teacher = make_teacher(input_dim, t_widths, cfg.data.teacher.seed, getattr(torch, cfg.dtype))
    out = []
    for s, (w, _, _) in enumerate(keys):
        if result.failures.failed(s):
            out.append(dict(nothing))
            continue
        cmp = teacher_comparison(result.ens.student(s).cpu(), teacher, min(t_widths[0], w))
        out.append({c: cmp[c] for c in nothing})
    return out


def chunk_tables(cfg: Config, chunk: Chunk, result: GroupResult, data: TrialData, search_widths: list[torch.Tensor],
                 distances: list[dict]) -> dict[str, pd.DataFrame]:
    """The chunk's rows of the run's four tables: results (one row per student), curves (per student, layer
    and kept count), importance (per student and first-layer node) and layers (per student and hidden layer)."""
    t_widths = list(cfg.data.teacher.widths) if cfg.data.source == "teacher" else []
    stats = result.stats["eigenvalue"]
    normalized = normalized_importance(stats[0].scores, importance_groups(cfg, chunk.keys()))
    results, curve_rows, imp_rows, layer_rows = [], [], [], []
    for s, (w, t, k) in enumerate(chunk.keys()):
        base = {"teacher_index": chunk.teacher, "method": chunk.method, "width": w, "trial": t, "strength": k}
        per_layer, curves = _layer_rows(cfg, result, s, base, t_widths, [int(sw[s]) for sw in search_widths])
        layer_rows += per_layer
        curve_rows += curves
        results.append(_result_row(cfg, chunk, result, s, base, data, t_widths, per_layer, distances[s]))
        scores, norm = stats[0].scores[s, :w], normalized[s, :w]
        if cfg.parity.importance_scale == "sqrt_n":  # the authors' RescaledEigenvalue
            scores = scores * w**0.5
        imp_rows.append(pd.DataFrame({**base, "node": np.arange(w), "importance": scores.numpy(), "normalized": norm.numpy()}))
    return {"results": pd.DataFrame(results), "curves": pd.concat(curve_rows, ignore_index=True),
            "importance": pd.concat(imp_rows, ignore_index=True), "layers": pd.DataFrame(layer_rows)}


def _layer_rows(cfg: Config, result: GroupResult, s: int, base: dict, t_widths: list[int],
                search_width: list[int]) -> tuple[list[dict], list[pd.DataFrame]]:
    """Student `s`'s rows of the layers table and frames of the curves table, one per hidden layer."""
    failed = result.failures.failed(s)
    rows, frames = [], []
    for layer, st in enumerate(result.stats["eigenvalue"]):
        n = int(result.ens.layers[layer].widths[s])
        kept = np.arange(1, n + 1)
        curve = st.curves[s, :n].numpy()
        full = float(curve[-1])  # the full model through the same computation: delta is exactly 0 at k = n
        with np.errstate(invalid="ignore"):  # a failed student's curve is NaN
            delta = curve - full
        n_c = -1 if failed else critical_point(kept, delta, cfg.analysis.critical_rel_tol * full)
        t_w = t_widths[layer] if layer < len(t_widths) else np.nan
        row = {**base, "layer": layer, "layer_width": n, "teacher_layer_width": t_w,
               "effective_dim": int(st.effective_dim[s]), "critical_point": n_c, "search_width": search_width[layer]}
        frame = {**base, "layer": layer, "kept": kept, "test_loss": curve, "delta_loss": delta, "kept_minus_teacher": kept - t_w}
        if st.accuracy is not None:
            acc = st.accuracy[s, :n].numpy()
            frame["test_accuracy"] = acc
            row["width_within_accuracy_tol"] = int(kept[np.nonzero(acc >= acc[-1] - cfg.analysis.accuracy_tol)[0][0]])
        rows.append(row)
        frames.append(pd.DataFrame(frame))
    return rows, frames


def _result_row(cfg: Config, chunk: Chunk, result: GroupResult, s: int, base: dict, data: TrialData, t_widths: list[int],
                per_layer: list[dict], distances: dict) -> dict:
    """Student `s`'s row of the results table."""
    w, t, k = base["width"], base["trial"], base["strength"]
    m, failed = cfg.method(chunk.method), result.failures.failed(s)
    return {
        **base, "teacher_kind": cfg.data.teacher.kind if cfg.data.source == "teacher" else cfg.data.source,
        "teacher_widths": ",".join(map(str, t_widths)), "teacher_width": t_widths[0] if t_widths else np.nan,
        "target_scale": data.target_scale, **{name: float(v[s]) for name, v in result.metrics.items()},
        "effective_dim": per_layer[0]["effective_dim"] if not failed else -1,
        "critical_point": per_layer[0]["critical_point"] if not failed else -1,
        "search_widths": ",".join(str(r["search_width"]) for r in per_layer), **distances, **result.failures.record(s),
        "lr": m.lr, "batch_size": m.batch_size, "epochs": m.epochs, "steps": result.steps,
        "l2_phi": m.l2_phi * k, "l2_lam": m.l2_lam * k if chunk.method == "spectral" else 0.0,
        "seed": experiment_seeds.student_seed(cfg.seed, t, w), "chunk": chunk.id,
        "checkpoint": f"chunks/{chunk.id}/students/{student_file(chunk.method, w, t, k)}" if cfg.save_students else "",
    }


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
    run = run_chunk(cfg, chunk, data, device, progress)
    files = {}
    if cfg.save_students:
        for s, (w, t, k) in enumerate(run.keys):
            meta = {"method": chunk.method, "width": w, "trial": t, "strength": k, "teacher_index": chunk.teacher,
                    "config_digest": cfg.digest(), "data_sha256": data.source_sha256}
            files[f"students/{student_file(chunk.method, w, t, k)}"] = model_bytes(run.ens.student(s).cpu(), meta)
    return ChunkResult(chunk.id, run.tables, files, time.perf_counter() - start, run.train_seconds)
