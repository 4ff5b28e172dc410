"""Training and measuring a group of students as one batched `Ensemble`: the one path that `eigenprune run`
(a chunk), `eigenprune compare` (the criteria that train alike) and `eigenprune recovery` (a grid's wide
students and its capacity networks) all take.

plans -> Ensemble -> train -> evaluate -> score -> effective dimension -> pruning curves, with a failure
record per student; each caller turns the `GroupResult` into its own rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from eigenprune.batched.curves import pruning_curves
from eigenprune.batched.ensemble import Ensemble
from eigenprune.batched.memory import reuse_freed_memory
from eigenprune.batched.train import TrainLog, evaluate, train_ensemble
from eigenprune.core.plans import LayerPlan, make_student
from eigenprune.core.training import TrainSpec
from eigenprune.experiments.analysis import effective_dim
from eigenprune.experiments.data import TrialData
from eigenprune.experiments.progress import Progress
from eigenprune.pruning.importance import node_importance

Scorer = Callable[[Ensemble, int, torch.Tensor], torch.Tensor]
"""(ensemble, hidden layer, each student's trial index) -> [S, N] importance of that layer's nodes, per student."""


def eigenvalue_scores(ens: Ensemble, layer: int, trial_index: torch.Tensor) -> torch.Tensor:
    """The paper's ranking: the norm of each node's incoming weights, |λ_out_i|·‖φ_i‖ (`node_importance`)."""
    return node_importance(ens.layers[layer])


@dataclass(frozen=True)
class StudentGroup:
    """Students that train together: per student its layer plans, the seed of its initial parameters and the
    data trial it trains on (a row of the data's trial axis); one training spec; per data trial the seed of
    its batch order (`shuffle`); the dtype, and a label for the progress bar."""

    plans: list[list[LayerPlan]]
    seeds: list[int]
    trials: list[int]
    spec: TrainSpec
    shuffle: list[int]
    dtype: torch.dtype = torch.float32
    label: str = "students"

    def stack(self, input_dim: int, device: torch.device) -> tuple[Ensemble, torch.Tensor]:
        """The students as one `Ensemble` on `device`, and each one's trial index (in every process that trains,
        freed memory is kept for reuse: `batched.memory.reuse_freed_memory`)."""
        reuse_freed_memory()
        students = [make_student(input_dim, p, s, self.dtype) for p, s in zip(self.plans, self.seeds)]
        return Ensemble(students).to(device), torch.tensor(self.trials, device=device)


@dataclass(frozen=True)
class Failures:
    """Which students failed: their loss became NaN or inf at some step, the trainer froze them, and their
    numbers must not count. Per student the step (-1: trained) and the reason ("" if trained)."""

    step: tuple[int, ...]
    reason: tuple[str, ...]

    @classmethod
    def from_log(cls, log: TrainLog, epochs: int) -> Failures:
        per_epoch = log.steps // epochs
        steps = tuple(int(s) for s in log.failed_step)
        reasons = tuple(f"loss became {float(log.failed_loss[s])} at step {step} (epoch {step // per_epoch}); frozen from the "
                        "end of that epoch" if step >= 0 else "" for s, step in enumerate(steps))
        return cls(steps, reasons)

    def failed(self, s: int) -> bool:
        return self.step[s] >= 0

    def mask(self) -> np.ndarray:
        """[S] True for the failed students."""
        return np.array(self.step) >= 0

    def record(self, s: int) -> dict:
        """Student `s`'s columns of every table: status ("ok" or "failed"), failed_step and fail_reason."""
        return {"status": "failed" if self.failed(s) else "ok", "failed_step": self.step[s], "fail_reason": self.reason[s]}


@dataclass
class LayerStats:
    """Per student, for one hidden layer and one scorer (on the CPU): the scores [S, N], the effective
    dimension [S], the pruning curve [S, N] (test loss keeping the top k nodes, k = 1..N) and, for
    classification, the same curve of test accuracy."""

    scores: torch.Tensor
    effective_dim: torch.Tensor
    curves: torch.Tensor
    accuracy: torch.Tensor | None


@dataclass
class GroupResult:
    """A trained and measured group: the ensemble on its device and each student's trial index, the failure
    record, per-student metrics on the CPU (train_loss, test_loss, val_loss — NaN without a validation part —
    and, for classification, train_accuracy and test_accuracy), `stats[scorer][i]` for the i-th measured
    hidden layer, the Adam steps and the seconds the training loop took."""

    ens: Ensemble
    trial_index: torch.Tensor
    failures: Failures
    metrics: dict[str, torch.Tensor]
    stats: dict[str, list[LayerStats]]
    steps: int
    train_seconds: float


def group_metrics(ens: Ensemble, data: TrialData, trial_index: torch.Tensor, n_fit: int) -> dict[str, torch.Tensor]:
    """Per student: loss on the `n_fit` patterns it trained on, on the test set and on the rest of the training
    set (the validation part; NaN where there is none), and accuracies for classification."""
    fit_x, fit_y = data.x_train[:, :n_fit], data.y_train[:, :n_fit]
    metrics = {"train_loss": evaluate(ens, fit_x, fit_y, trial_index, data.task),
               "test_loss": evaluate(ens, data.x_test, data.y_test, trial_index, data.task)}
    metrics["val_loss"] = (evaluate(ens, data.x_train[:, n_fit:], data.y_train[:, n_fit:], trial_index, data.task)
                           if n_fit < data.x_train.shape[1] else torch.full_like(metrics["train_loss"], float("nan")))
    if data.task == "classification":
        metrics["train_accuracy"] = evaluate(ens, fit_x, fit_y, trial_index, data.task, metric="accuracy")
        metrics["test_accuracy"] = evaluate(ens, data.x_test, data.y_test, trial_index, data.task, metric="accuracy")
    return metrics


def layer_stats(ens: Ensemble, layer: int, scores: torch.Tensor, data: TrialData, trial_index: torch.Tensor, threshold: float,
                groups: torch.Tensor | None = None) -> LayerStats:
    """Effective dimension (normalised score above `threshold`; `groups`: see `analysis.effective_dim`) and
    pruning curves on the test set of hidden layer `layer`, ranked by `scores`."""
    g = None if groups is None else groups.to(scores.device)
    eff = effective_dim(scores, threshold, ens.layers[layer].widths, g, at_least=groups is not None)
    curves = pruning_curves(ens, layer, scores, data.x_test, data.y_test, trial_index, data.task)
    acc = (pruning_curves(ens, layer, scores, data.x_test, data.y_test, trial_index, data.task, metric="accuracy")
           if data.task == "classification" else None)
    return LayerStats(scores.cpu(), eff.cpu(), curves.cpu(), None if acc is None else acc.cpu())


def measure_group(group: StudentGroup, data: TrialData, n_fit: int, device: torch.device, *,
                  scorers: dict[str, Scorer] | None = None, layers: Sequence[int] | None = (0,), threshold: float = 0.05,
                  groups: torch.Tensor | None = None, progress: Progress | None = None) -> GroupResult:
    """Train `group` on the first `n_fit` training patterns of its trials of `data` (on `device`), then measure
    every student: `group_metrics`, and `layer_stats` of each scorer on each of `layers` (None: every hidden layer)."""
    ens, trial_index = group.stack(data.x_train.shape[-1], device)
    on_epoch = None
    if progress is not None:
        bar = progress.add(group.label, group.spec.epochs)
        on_epoch = lambda e, loss: progress.update(bar, e + 1, loss)  # noqa: E731
    start = time.perf_counter()
    log = train_ensemble(ens, data.x_train[:, :n_fit], data.y_train[:, :n_fit], trial_index, group.spec, group.shuffle, on_epoch)
    train_seconds = time.perf_counter() - start  # the log is read back to the host: the device has finished
    metrics = {k: v.cpu() for k, v in group_metrics(ens, data, trial_index, n_fit).items()}
    layers = range(len(ens.layers) - 1) if layers is None else layers
    stats = {name: [layer_stats(ens, layer, score(ens, layer, trial_index), data, trial_index, threshold, groups) for layer in layers]
             for name, score in (scorers or {}).items()}
    return GroupResult(ens, trial_index, Failures.from_log(log, group.spec.epochs), metrics, stats, log.steps, train_seconds)
