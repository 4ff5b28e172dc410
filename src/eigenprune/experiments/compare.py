"""Compare node-importance criteria on the teacher-student task: which one finds the teacher's width?

For every criterion (see `criteria.py`), students of several widths N are trained over several
trials with the layer plan the criterion asks for, all from the same initial parameters per (N,
trial). Criteria that train alike (feature_norm, random and taylor all score one directly trained
student) share their students; plans with the same trainable parts train as one batched
`Ensemble`. All criteria use one optimizer schedule (`train`), so they get the same number of steps.
`threads` sets torch's intra-op threads while training (default 1: these small batched matmuls gain
little from more, and on a shared 2-core machine two threads ran 5-20x slower; 0 = leave as is).

Per student we record the test loss, the effective dimension (normalised score above
`threshold`), the critical point (`analysis.critical_point`: the smallest kept count whose ΔMSE,
and that of every larger count, stays <= `critical_tol`) and ΔMSE at kept = h_T. Outputs in the
folder: config.yaml, compare.parquet (one row per student), compare_curves.parquet (ΔMSE for every
kept count), compare_summary.parquet and compare.md (mean ± std over trials per criterion and N).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import torch
import yaml
from pydantic import Field, model_validator

from eigenprune.core.plans import LayerPlan
from eigenprune.experiments.analysis import critical_point
from eigenprune.experiments.builders import paper_student
from eigenprune.experiments.config import (
    DataConfig,
    Float,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    RunName,
    Schedule,
    Settings,
    parse_config,
    read_yaml,
    repeated,
)
from eigenprune.experiments.data import TrialData, teacher_set
from eigenprune.experiments.experiment_seeds import data_seed, shuffle_seeds, student_seed
from eigenprune.experiments.group import StudentGroup, measure_group
from eigenprune.experiments.progress import Progress
from eigenprune.experiments.store import OwnedFolder, parquet_writer
from eigenprune.pruning.criteria import CRITERIA, Criterion, get_criterion


class CompareTrain(Schedule):
    """The one optimizer schedule every criterion's students train with (Adam, mini-batches)."""

    lr: PositiveFloat = 0.005
    batch_size: PositiveInt = 100
    epochs: PositiveInt = 500


class CompareConfig(Settings):
    """The comparison's settings; the defaults are the CPU-sized run reported in docs/pruning.md."""

    name: RunName = "compare"
    data: DataConfig = DataConfig(n_train=4000, n_test=2000)
    widths: Annotated[list[PositiveInt], Field(min_length=1)] = [40, 100, 200]
    rest: list[PositiveInt] = [10]
    criteria: Annotated[list[str], Field(min_length=1)] = list(CRITERIA)
    params: dict[str, dict[str, Float]] = {}
    train: CompareTrain = CompareTrain()
    threshold: Annotated[float, Field(gt=0, lt=1)] = 0.05
    critical_tol: NonNegativeFloat = 0.01
    threads: NonNegativeInt = 1

    @model_validator(mode="after")
    def _known_criteria(self) -> CompareConfig:
        if self.data.source != "teacher":
            raise ValueError(f"compare trains on teacher data only; data.source {self.data.source!r} is not supported")
        for name, values in (("criteria", self.criteria), ("widths", self.widths)):
            if len(set(values)) < len(values):
                raise ValueError(f"{name} lists {repeated(values)} more than once; list each once")
        if self.train.batch_size > self.data.n_train:
            raise ValueError(f"train.batch_size {self.train.batch_size} is larger than the {self.data.n_train} training "
                             f"patterns (data.n_train); use a batch_size of at most {self.data.n_train}")
        for name in [*self.criteria, *self.params]:
            if name not in CRITERIA:
                raise ValueError(f"unknown criterion {name!r}; known: {', '.join(CRITERIA)}")
        for name, params in self.params.items():
            try:
                get_criterion(name, **params)
            except TypeError:
                raise ValueError(f"params.{name}: unknown parameter in {sorted(params)} for criterion {name!r}") from None
        return self

    def criterion(self, name: str) -> Criterion:
        return get_criterion(name, **self.params.get(name, {}))


def load_compare_config(path: str | Path | None, overrides: dict | None = None) -> CompareConfig:
    """A `CompareConfig` from YAML (None = the defaults) plus dotted-key `overrides`; raises `ConfigError`."""
    return parse_config(*read_yaml(path, overrides, "default compare config"), model=CompareConfig)


def _fmt(mean: float, std: float, digits: int) -> str:
    if np.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if digits else f"{mean:.1f} ± {std:.1f}"


def summarize_compare(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over trials per (criterion, width) of test loss, effective dim, critical point, ΔMSE at h_T."""
    ok = rows[rows.status == "ok"]
    cols = ["test_loss", "effective_dim", "critical_point", "delta_at_teacher"]
    agg = ok.groupby(["criterion", "width"], sort=False)[cols].agg(["mean", "std"])
    agg.columns = [f"{c}_{s}" for c, s in agg.columns]
    agg = agg.reset_index()
    agg.insert(2, "trials", ok.groupby(["criterion", "width"], sort=False).size().to_numpy())
    return agg


def markdown_table(summary: pd.DataFrame, cfg: CompareConfig) -> str:
    """The summary as a markdown table (mean ± std over trials), with the settings it came from."""
    h_t = cfg.data.teacher.widths[0]
    lines = [
        f"Teacher {cfg.data.input_dim}→{'→'.join(map(str, cfg.data.teacher.widths))}→1 (h_T = {h_t}); "
        f"{cfg.trials} trials; P = {cfg.data.n_train} train / {cfg.data.n_test} test; "
        f"Adam lr {cfg.train.lr}, batch {cfg.train.batch_size}, {cfg.train.epochs} epochs for every criterion. "
        f"Effective dim: normalised score > {cfg.threshold}; critical point: smallest kept count with ΔMSE <= "
        f"{cfg.critical_tol} there and above; ΔMSE at h_T: test MSE with the {h_t} best nodes kept minus the full model's.",
        "",
        "| criterion | N | test MSE | effective dim | critical point | ΔMSE at kept = h_T |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in summary.itertuples():
        lines.append(
            f"| {r.criterion} | {r.width} | {_fmt(r.test_loss_mean, r.test_loss_std, 4)} | "
            f"{_fmt(r.effective_dim_mean, r.effective_dim_std, 0)} | {_fmt(r.critical_point_mean, r.critical_point_std, 0)} | "
            f"{_fmt(r.delta_at_teacher_mean, r.delta_at_teacher_std, 4)} |"
        )
    return "\n".join(lines) + "\n"


def _run_group(cfg: CompareConfig, kind: str, group: list[LayerPlan], plans: dict[LayerPlan, list[str]],
               criteria: dict[str, Criterion], data: TrialData, progress: Progress) -> tuple[list[dict], list[pd.DataFrame]]:
    """Train the students of plans with the same trainable parts as one ensemble (`measure_group`); score and
    prune them per criterion."""
    h_t = cfg.data.teacher.widths[0]
    keys = [(plan, w, trial) for plan in group for w in cfg.widths for trial in range(cfg.trials)]
    names = [n for plan in group for n in plans[plan]]
    students = StudentGroup(
        plans=[paper_student(replace(plan, width=w), list(cfg.rest)) for plan, w, _ in keys],
        seeds=[student_seed(cfg.seed, trial, w) for _, w, trial in keys], trials=[trial for _, _, trial in keys],
        spec=cfg.train.train_spec(), shuffle=shuffle_seeds(cfg.seed, cfg.trials), dtype=getattr(torch, cfg.dtype),
        label=f"{kind}: {', '.join(names)} ({len(keys)} students)")
    x, y = data.x_train, data.y_train
    scorers = {name: lambda ens, layer, ti, c=criteria[name]: c(ens, layer, x[ti], y[ti]) for name in names}
    result = measure_group(students, data, x.shape[1], torch.device("cpu"), scorers=scorers, threshold=cfg.threshold,
                           progress=progress)
    rows, curve_rows = [], []
    for plan in group:
        for name in plans[plan]:
            stats = result.stats[name][0]
            for s, (p, w, trial) in enumerate(keys):
                if p != plan:
                    continue
                kept = np.arange(1, w + 1)
                delta = (stats.curves[s, :w] - stats.curves[s, w - 1]).numpy()
                rows.append({
                    "criterion": name, "width": w, "trial": trial, "test_loss": float(result.metrics["test_loss"][s]),
                    "effective_dim": int(stats.effective_dim[s]), "critical_point": critical_point(kept, delta, cfg.critical_tol),
                    "delta_at_teacher": float(delta[h_t - 1]) if w >= h_t else float("nan"), **result.failures.record(s),
                    "plan": f"{plan.kind} l2_phi={plan.l2_phi} l2_lam={plan.l2_lam} l1_lam={plan.l1_lam} group_lasso={plan.group_lasso}",
                })
                curve_rows.append(pd.DataFrame({"criterion": name, "width": w, "trial": trial, "kept": kept,
                                                "test_loss": stats.curves[s, :w].numpy(), "delta_loss": delta}))
    return rows, curve_rows


def run_compare(cfg: CompareConfig, out: str | Path, quiet: bool = False) -> Path:
    """Train, score, prune and tabulate every criterion of `cfg`; write the outputs into folder `out`."""
    folder = OwnedFolder(out, "compare")
    folder.open(create=True)  # refuses, before anything is written, a folder eigenprune did not make
    try:
        return _run_compare(cfg, folder, quiet)
    finally:
        folder.release()


def _run_compare(cfg: CompareConfig, folder: OwnedFolder, quiet: bool) -> Path:
    folder.refuse_foreign(("config.yaml", "compare.parquet", "compare_curves.parquet", "compare_summary.parquet", "compare.md"))
    folder.remove_temporaries()
    folder.write("config.yaml", yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    data = teacher_set(cfg.data, data_seed(cfg.seed, cfg.data.seed), cfg.trials, getattr(torch, cfg.dtype))
    criteria = {name: cfg.criterion(name) for name in cfg.criteria}
    plans: dict[LayerPlan, list[str]] = {}  # criteria that train alike share their students
    for name, crit in criteria.items():
        plans.setdefault(crit.layer_plan(1), []).append(name)
    groups: dict[str, list[LayerPlan]] = {}  # plans with the same trainable parts share one ensemble
    for plan in plans:
        groups.setdefault(plan.kind, []).append(plan)
    rows, curve_rows = [], []
    start, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(cfg.threads or threads)
    try:
        with Progress(quiet=quiet) as progress:
            for kind, group in groups.items():
                r, c = _run_group(cfg, kind, group, plans, criteria, data, progress)
                rows += r
                curve_rows += c
    finally:
        torch.set_num_threads(threads)
    table = pd.DataFrame(rows)
    seconds = time.perf_counter() - start
    summary = summarize_compare(table)
    folder.write("compare.parquet", parquet_writer(table))
    folder.write("compare_curves.parquet", parquet_writer(pd.concat(curve_rows, ignore_index=True)))
    folder.write("compare_summary.parquet", parquet_writer(summary))
    folder.write("compare.md", markdown_table(summary, cfg) + f"\nTraining and scoring took {seconds:.0f} s.\n")
    return folder.path
