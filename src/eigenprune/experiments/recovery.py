"""Does the student find the teacher? A recovery diagram over a grid of teachers.

For every teacher d -> h_T -> rest -> sum (first-layer widths h_T x input dims d x teacher seeds):
  - one wide spectral student width N, several trials, at the L2 multipliers of `regularization`
    (mode fixed: 1 only; mode path: every multiplier, of which 1 is the fixed-L2 reading and the
    rule's choice on the validation set the path reading);
  - n_c, the critical point of each student's pruning curve (`analysis.critical_point`), and eps,
    the full student's test MSE;
  - the capacity curve (`capacity`): narrow networks trained from scratch at widths round(f x h_T),
    direct and spectral, one per trial, and k*(eps), k*(1.1 eps);
  - the per-node teacher signal: the test MSE when one teacher node is removed, relative to eps,
    and n_detect, the number of teacher nodes whose removal costs more than critical_rel_tol x eps
    (the tolerance n_c is read at).
The tables (one row per student, per network of the capacity curves, per teacher node, per
teacher-and-setting) go to an output folder; `summarize`, `explain` and `collapse_table` turn them
into the diagram's numbers. Entry point: `eigenprune recovery CONFIG --out DIR` (with figures).

Teachers of one input dimension train together: their trials are stacked on the data axis, so all
wide students of that dimension form one ensemble (`group.measure_group`), and the capacity networks a
few more. Seeds come from `experiment_seeds`, as in `eigenprune run`: trial t of every teacher of one
input dimension has the same inputs and batch order, and students of one (trial, width) start alike.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch
import yaml
from pydantic import Field, model_validator
from scipy.stats import spearmanr

from eigenprune import __version__
from eigenprune.core.plans import LayerPlan
from eigenprune.experiments.analysis import collapse_measure, critical_point
from eigenprune.experiments.builders import make_teacher, paper_student
from eigenprune.experiments.capacity import capacity_curve, capacity_widths, k_star_table
from eigenprune.experiments.config import (
    DirectConfig,
    PositiveFloat,
    PositiveInt,
    RegularizationConfig,
    RunName,
    Seed,
    Settings,
    SpectralConfig,
    Trials,
    parse_config,
    read_yaml,
)
from eigenprune.experiments.data import TrialData, teacher_data
from eigenprune.experiments.experiment_seeds import data_seed, shuffle_seeds, student_seed
from eigenprune.experiments.grid import pack_widths
from eigenprune.experiments.group import GroupResult, StudentGroup, eigenvalue_scores, measure_group
from eigenprune.experiments.regpath import select_strengths
from eigenprune.experiments.store import OwnedFolder, RunFolderError, parquet_writer

TEACHER_KEYS = ["teacher", "h_t", "input_dim", "teacher_seed"]
TABLES = ("students", "curves", "capacity", "signals")


class RecoveryConfig(Settings):
    """The diagram's grid and training (defaults: the CPU-sized diagram of docs/recovery.md)."""

    name: RunName = "recovery"
    trials: Trials = 2  # wide students per teacher and strength; also the capacity curve's seeds per width
    teacher_widths: Annotated[list[PositiveInt], Field(min_length=1)] = [5, 10, 20, 50, 100]
    input_dims: Annotated[list[PositiveInt], Field(min_length=1)] = [5, 10, 20, 40]
    teacher_seeds: Annotated[list[Seed], Field(min_length=1)] = [1234, 1]
    teacher_rest: list[PositiveInt] = [10]  # the teacher's and the student's later hidden widths
    standardize_targets: bool = True  # every teacher's targets to unit variance: one L2 strength means the same everywhere
    n_train: PositiveInt = 4000
    n_test: PositiveInt = 2000
    student_width: PositiveInt = 160
    spectral: SpectralConfig = SpectralConfig(epochs=300)
    direct: DirectConfig = DirectConfig(epochs=300)
    regularization: RegularizationConfig = RegularizationConfig(mode="path", multipliers=[0.05, 0.2, 1.0, 5.0])
    capacity_fractions: Annotated[list[PositiveFloat], Field(min_length=1)] = [0.1, 0.2, 0.35, 0.5, 0.7, 1.0, 1.4]
    capacity_methods: Annotated[list[Literal["spectral", "direct"]], Field(min_length=1)] = ["spectral", "direct"]
    critical_rel_tol: PositiveFloat = 0.1
    threshold: Annotated[float, Field(gt=0, lt=1)] = 0.05
    track_band: tuple[PositiveFloat, PositiveFloat] = (0.8, 1.25)  # "tracks the teacher": n_c / h_T inside this band
    threads: Annotated[int, Field(ge=0)] = 1  # torch threads (0: leave torch's default)

    @model_validator(mode="after")
    def _consistent(self) -> RecoveryConfig:
        if self.student_width <= max(self.teacher_widths):
            raise ValueError(f"student_width {self.student_width} must exceed the widest teacher ({max(self.teacher_widths)})")
        if self.regularization.mode == "path" and 1.0 not in self.regularization.multipliers:
            raise ValueError(f"regularization.multipliers {self.regularization.multipliers} must include 1.0 (the fixed-L2 reading)")
        if not self.track_band[0] < 1 < self.track_band[1]:
            raise ValueError(f"track_band must be (low < 1, high > 1), got {self.track_band}")
        return self


def load_recovery_config(path: str | Path | None, overrides: dict | None = None) -> RecoveryConfig:
    """A `RecoveryConfig` from YAML (None = the defaults) plus dotted-key `overrides`; every problem is one `ConfigError` line."""
    return parse_config(*read_yaml(path, overrides, "default recovery config"), model=RecoveryConfig)


def _group(cfg: RecoveryConfig, method: str, keys: list[tuple[int, int, int, float]], label: str) -> StudentGroup:
    """Students of `method` for `keys` = (data row, trial, width, L2 strength), on data rows stacked per teacher."""
    m = getattr(cfg, method)
    return StudentGroup(
        plans=[paper_student(LayerPlan(w, method, m.l2_phi * k, m.l2_lam * k), list(cfg.teacher_rest)) for _, _, w, k in keys],
        seeds=[student_seed(cfg.seed, t, w) for _, t, w, _ in keys], trials=[row for row, _, _, _ in keys],
        spec=m.train_spec(), shuffle=shuffle_seeds(cfg.seed, cfg.trials) * len(cfg.teacher_widths) * len(cfg.teacher_seeds),
        dtype=getattr(torch, cfg.dtype), label=label)


@torch.no_grad()
def node_removal_mse(teacher: torch.nn.Sequential, x: torch.Tensor) -> np.ndarray:
    """[h_T] test MSE between the teacher and the teacher with first-layer node j removed, on inputs x [P, D]."""
    first, second = teacher[0], teacher[2]
    h1 = torch.relu(first(x))  # [P, h]
    z2 = second(h1)  # [P, r]
    rest = teacher[3:]  # ReLU, then the later layers
    full = rest(z2).squeeze(-1)  # [P]
    cut = z2.unsqueeze(1) - h1.unsqueeze(-1) * second.weight.T.unsqueeze(0)  # [P, h, r]: node j's contribution removed
    out = rest(cut).squeeze(-1)  # [P, h]
    return ((out - full.unsqueeze(1)) ** 2).mean(0).double().numpy()


def run_recovery(cfg: RecoveryConfig, log: Callable[[str], None] = print) -> dict[str, pd.DataFrame]:
    """Train everything of the diagram; returns the raw tables (see the module docstring)."""
    teachers = [(h, d, s) for d in cfg.input_dims for h in cfg.teacher_widths for s in cfg.teacher_seeds]
    out: dict[str, list[pd.DataFrame]] = {name: [] for name in TABLES}
    start = time.perf_counter()
    for d in cfg.input_dims:
        ids = [i for i, (_, dd, _) in enumerate(teachers) if dd == d]
        data = _stacked_data(cfg, teachers, ids, out["signals"])
        slot = {i: j * cfg.trials for j, i in enumerate(ids)}  # teacher i, trial t -> data row slot[i] + t
        students, curves = _wide_students(cfg, data, ids, slot)
        out["students"].append(students)
        out["curves"].append(curves)
        log(f"d={d}: {len(students)} wide students trained ({time.perf_counter() - start:.0f} s)")
        for method in cfg.capacity_methods:
            out["capacity"] += _capacity_networks(cfg, data, {i: teachers[i][0] for i in ids}, slot, method)
            log(f"d={d}: {method} capacity networks trained ({time.perf_counter() - start:.0f} s)")
    frame = pd.DataFrame(teachers, columns=["h_t", "input_dim", "teacher_seed"]).rename_axis("teacher").reset_index()
    tables = {name: pd.concat(parts, ignore_index=True).merge(frame, on="teacher") for name, parts in out.items()}
    tables["teachers"] = frame
    return tables


def _stacked_data(cfg: RecoveryConfig, teachers: list[tuple[int, int, int]], ids: list[int], signals: list[pd.DataFrame]) -> TrialData:
    """The trials of teachers `ids` (one input dimension) stacked on the trial axis; appends each teacher's
    per-node signal (`node_removal_mse`, in units of its target variance) to `signals`."""
    dtype, parts = getattr(torch, cfg.dtype), []
    for i in ids:
        h, d, ts = teachers[i]
        data = teacher_data("mlp", d, [h, *cfg.teacher_rest], ts, data_seed(cfg.seed, 0), cfg.trials, cfg.n_train, cfg.n_test,
                            standardize=cfg.standardize_targets, dtype=dtype)
        parts.append(data)
        removal = node_removal_mse(make_teacher(d, [h, *cfg.teacher_rest], ts, dtype), data.x_test[0]) / data.target_scale**2
        signals.append(pd.DataFrame({"teacher": i, "node": np.arange(h), "removal_mse": removal}))
    return TrialData(*(torch.cat([getattr(p, k) for p in parts]) for k in ("x_train", "y_train", "x_test", "y_test")))


def _test_losses(result: GroupResult) -> np.ndarray:
    """[S] test MSE of every network of a measured group; NaN for the failed ones (they never count)."""
    return np.where(result.failures.mask(), np.nan, result.metrics["test_loss"].double().numpy())


def _wide_students(cfg: RecoveryConfig, data: TrialData, ids: list[int], slot: dict[int, int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The wide spectral students of every teacher `ids`, trial and strength: one row each (test and validation
    loss, effective dimension, critical point, failure record), and their pruning curves."""
    width = cfg.student_width
    keys = [(i, t, k) for i in ids for t in range(cfg.trials) for k in cfg.regularization.strengths()]
    group = _group(cfg, "spectral", [(slot[i] + t, t, width, k) for i, t, k in keys], "wide students")
    result = measure_group(group, data, cfg.regularization.n_fit(cfg.n_train), torch.device("cpu"),
                           scorers={"eigenvalue": eigenvalue_scores}, threshold=cfg.threshold)
    stats = result.stats["eigenvalue"][0]
    test, val, curves = _test_losses(result), result.metrics["val_loss"].double().numpy(), stats.curves.double().numpy()
    kept = np.arange(1, width + 1)
    rows, frames = [], []
    for s, (i, t, k) in enumerate(keys):
        ok = not result.failures.failed(s)
        full = curves[s, -1]
        n_c = critical_point(kept, curves[s] - full, cfg.critical_rel_tol * full) if ok else -1
        rows.append({"teacher": i, "trial": t, "strength": k, "test_loss": test[s], "val_loss": val[s],
                     "effective_dim": int(stats.effective_dim[s]) if ok else -1, "critical_point": n_c, **result.failures.record(s)})
        frames.append(pd.DataFrame({"teacher": i, "trial": t, "strength": k, "kept": kept, "test_loss": curves[s]}))
    return pd.DataFrame(rows), pd.concat(frames, ignore_index=True)


def _capacity_networks(cfg: RecoveryConfig, data: TrialData, h_t: dict[int, int], slot: dict[int, int], method: str) -> list[pd.DataFrame]:
    """The capacity curves' narrow networks of `method`, trained from scratch at widths round(f x h_T) of every
    teacher in `h_t` (teacher -> h_T), in buckets of similar widths: one row per network with its test loss."""
    grids = {i: capacity_widths(h, cfg.capacity_fractions) for i, h in h_t.items()}
    out = []
    for bucket in pack_widths([w for g in grids.values() for w in g], pack_factor=2.0, floor=10):
        keys = [(i, w, t) for i in grids for w in grids[i] if w in bucket for t in range(cfg.trials)]
        group = _group(cfg, method, [(slot[i] + t, t, w, 1.0) for i, w, t in keys], f"{method} capacity networks")
        result = measure_group(group, data, cfg.regularization.n_fit(cfg.n_train), torch.device("cpu"))
        failures = pd.DataFrame([result.failures.record(s) for s in range(len(keys))])
        out.append(pd.concat([pd.DataFrame({"teacher": [i for i, _, _ in keys], "method": method, "width": [w for _, w, _ in keys],
                                            "trial": [t for _, _, t in keys], "test_loss": _test_losses(result)}), failures], axis=1))
    return out


def readings(students: pd.DataFrame, rule: str, mode: str) -> pd.DataFrame:
    """Which students each setting reads: "fixed" (strength 1) and, on a path, "path" (the rule's choice
    per teacher on the validation loss). Returns the ok students with a `setting` column."""
    ok = students[students.status == "ok"]
    parts = [ok[ok.strength == 1.0].assign(setting="fixed")]
    if mode == "path":
        chosen = select_strengths(ok.assign(teacher_index=ok.teacher, method="spectral", width=0))
        parts.append(ok[chosen[f"selected_{rule}"].to_numpy()].assign(setting="path"))
    return pd.concat(parts, ignore_index=True)


def summarize(read: pd.DataFrame, capacity: pd.DataFrame, signals: pd.DataFrame, critical_rel_tol: float,
              track_band: Sequence[float] = (0.8, 1.25)) -> pd.DataFrame:
    """One row per (teacher, setting): n_c (mean over trials), eps (mean full test MSE), k*(eps) and
    k*(1.1 eps) from the capacity curve's best over seeds and methods, the per-node teacher signal
    (median and max removal MSE over eps, n_detect = nodes whose removal MSE > critical_rel_tol x eps),
    h_T / d, the ratios n_c / h_T and n_c / k*, and `tracks` (n_c / h_T inside `track_band`)."""
    per = read.groupby([*TEACHER_KEYS, "setting"]).agg(
        n_c=("critical_point", "mean"), n_c_std=("critical_point", "std"), eps=("test_loss", "mean"),
        effective_dim=("effective_dim", "mean"), strength=("strength", "first"), trials=("trial", "count")).reset_index()
    curve = capacity_curve(capacity, ["teacher"])
    rows = []
    for _, r in per.iterrows():
        mine = curve[(curve.teacher == r.teacher) & (curve.method == "any")]
        ks = k_star_table(mine, pd.DataFrame({"teacher": [r.teacher], "eps": [r.eps]}))
        best = ks[ks.stat == "best"].set_index("factor").k_star
        sig = signals[signals.teacher == r.teacher].removal_mse.to_numpy()
        rows.append({"k_star": best.loc[1.0], "k_star_11": best.loc[1.1],
                     "signal_median": float(np.median(sig)) / r.eps, "signal_max": float(sig.max()) / r.eps,
                     "n_detect": int((sig > critical_rel_tol * r.eps).sum())})
    table = pd.concat([per, pd.DataFrame(rows, index=per.index)], axis=1)
    table["h_t_over_d"] = table.h_t / table.input_dim
    table["nc_over_ht"] = table.n_c / table.h_t
    table["nc_over_kstar"] = table.n_c / table.k_star
    table["nc_over_detect"] = table.n_c / table.n_detect.where(table.n_detect > 0)
    table["tracks"] = table.nc_over_ht.between(*track_band)
    return table


def best_split(x: np.ndarray, label: np.ndarray) -> tuple[float, float]:
    """The threshold on x that best separates a boolean `label` (x > threshold predicts one class, either
    way round) and its accuracy: (threshold, accuracy). Thresholds are midpoints between sorted x."""
    x, label = np.asarray(x, dtype=float), np.asarray(label, dtype=bool)
    keep = ~np.isnan(x)
    x, label = x[keep], label[keep]
    if x.size == 0:
        return float("nan"), float("nan")
    xs = np.unique(x)
    cuts = np.concatenate([[xs[0] - 1], (xs[:-1] + xs[1:]) / 2])
    acc = [max(np.mean((x > c) == label), np.mean((x > c) != label)) for c in cuts]
    j = int(np.argmax(acc))
    return float(cuts[j]), float(acc[j])


def explain(table: pd.DataFrame, predictors: Sequence[str], target: str = "nc_over_ht", label: str = "tracks") -> pd.DataFrame:
    """How well each predictor column explains `target` (Spearman rank correlation over the rows) and the
    boolean `label` (the best single threshold's accuracy, against the majority-class rate)."""
    rows = []
    majority = max(table[label].mean(), 1 - table[label].mean())
    for p in predictors:
        ok = table[[p, target]].dropna()
        rho = spearmanr(ok[p], ok[target]).statistic if len(ok) > 2 and ok[p].nunique() > 1 else float("nan")
        cut, acc = best_split(table[p].to_numpy(), table[label].to_numpy())
        rows.append({"predictor": p, "spearman": float(rho), "threshold": cut, "accuracy": acc, "majority_rate": float(majority),
                     "rows": len(ok)})
    return pd.DataFrame(rows)


def mean_curves(curves: pd.DataFrame, read: pd.DataFrame) -> pd.DataFrame:
    """Per (teacher, setting, kept): the mean over the setting's students of test loss and of
    delta = test loss - the student's full test loss."""
    keys = read[["teacher", "trial", "strength", "setting"]]
    c = curves.merge(keys, on=["teacher", "trial", "strength"])
    full = c.groupby(["teacher", "trial", "strength", "setting"]).test_loss.transform("last")
    c = c.assign(delta=c.test_loss - full)
    return c.groupby(["teacher", "setting", "kept"]).agg(test_loss=("test_loss", "mean"), delta=("delta", "mean")).reset_index()


def collapse_table(curves: pd.DataFrame, summary: pd.DataFrame, points: int = 50) -> pd.DataFrame:
    """The collapse measure (`analysis.collapse_measure`) across every teacher of a setting, with the
    kept axis rescaled by h_T, by the measured n_c and by k*. `curves` from `mean_curves`. Teachers
    without the scale (k* not reached, n_c < 1) are left out and counted."""
    rows = []
    for setting, g in summary.groupby("setting"):
        for scale in ("h_t", "n_c", "k_star"):
            use = g[g[scale].notna() & (g[scale] >= 1)]
            triples = []
            for _, r in use.iterrows():
                c = curves[(curves.teacher == r.teacher) & (curves.setting == setting)]
                triples.append((float(r[scale]), c.kept.to_numpy(), np.clip(c.delta.to_numpy(), 0, None)))
            nothing = {"spread_before": np.nan, "spread_after": np.nan, "ratio": np.nan}
            m = collapse_measure(triples, points) if len(triples) > 1 else nothing
            rows.append({"setting": setting, "rescaled_by": scale, "teachers": len(triples), "left_out": len(g) - len(triples), **m})
    return pd.DataFrame(rows)


def analyse(tables: dict[str, pd.DataFrame], cfg: RecoveryConfig) -> dict[str, pd.DataFrame]:
    """The diagram's derived tables: summary (per teacher and setting), explain, collapse, mean curves,
    capacity curve."""
    read = readings(tables["students"], cfg.regularization.rule, cfg.regularization.mode)
    summary = summarize(read, tables["capacity"], tables["signals"], cfg.critical_rel_tol, cfg.track_band)
    predictors = ["signal_median", "signal_max", "n_detect", "h_t_over_d", "h_t", "input_dim"]
    expl = pd.concat([explain(g, predictors).assign(setting=s) for s, g in summary.groupby("setting")], ignore_index=True)
    curves = mean_curves(tables["curves"], read)
    return {"summary": summary, "explain": expl, "collapse": collapse_table(curves, summary), "mean_curves": curves,
            "capacity_curve": capacity_curve(tables["capacity"], ["teacher"])}


def write_folder(folder: OwnedFolder, cfg: RecoveryConfig, tables: dict[str, pd.DataFrame], derived: dict[str, pd.DataFrame],
                 wall: float) -> None:
    """Write every table (parquet), the derived ones also as JSON, the config and a manifest (atomically, recorded)."""
    for name, df in {**tables, **derived}.items():
        folder.write(f"{name}.parquet", parquet_writer(df))
    small = {k: derived[k].to_dict(orient="records") for k in ("summary", "explain", "collapse")}
    folder.write_json("tables.json", small)
    folder.write("config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    manifest = {"eigenprune": __version__, "torch": torch.__version__, "python": sys.version.split()[0],
                "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "wall_seconds": round(wall, 1),
                "command": " ".join(sys.argv)}
    folder.write_json("manifest.json", manifest)


def prepare_out(out: str | Path) -> OwnedFolder:
    """The output folder, open for writing: created, an empty one, or one an earlier recovery run made
    (never a folder holding files eigenprune did not write; refused in one line)."""
    folder = OwnedFolder(out, "recovery")
    folder.open(create=True)
    return folder


def open_finished(path: str | Path) -> OwnedFolder:
    """A finished recovery folder, open for (re)drawing its figures; RunFolderError (one line) for anything else."""
    if not (Path(path) / "summary.parquet").is_file():
        raise RunFolderError(f"{path} holds no recovery tables (summary.parquet); give a finished recovery folder")
    folder = OwnedFolder(path, "recovery")
    folder.open()
    return folder


def recover(cfg: RecoveryConfig, folder: OwnedFolder, log: Callable[[str], None] = print) -> tuple[dict[str, pd.DataFrame], int]:
    """Train the diagram (`run_recovery`, with `cfg.threads` torch threads), analyse it and write every table into
    `folder`; returns the derived tables and how many networks diverged (left out of the summaries)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or threads)
    try:
        start = time.perf_counter()
        tables = run_recovery(cfg, log)
    finally:
        torch.set_num_threads(threads)
    derived = analyse(tables, cfg)
    write_folder(folder, cfg, tables, derived, time.perf_counter() - start)
    return derived, int((tables["students"].status != "ok").sum() + (tables["capacity"].status != "ok").sum())
