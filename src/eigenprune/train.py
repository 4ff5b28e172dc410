"""The training loop: Adam on mini-batches, L2 regularization, divergence guard.

`train_ensemble` trains a stack of students; `train_alone` is the same loop for one ordinary
PyTorch model and is the oracle the batched path is tested against. Both draw every epoch's
shuffle from one `torch.Generator` per trial seeded by `shuffle_seed`, so they see identical batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from eigenprune.ensemble import Ensemble
from eigenprune.memory import EVAL_BLOCK
from eigenprune.nets import spectral_penalty

Task = Literal["regression", "classification"]


@dataclass(frozen=True)
class TrainSpec:
    """How a group of students trains: all share learning rate, batch size and epoch count."""

    lr: float
    batch_size: int
    epochs: int
    task: Task = "regression"
    backprop: Literal["manual", "autograd"] = "manual"  # the ensemble's hand-written gradients, or autograd


def task_loss(out: torch.Tensor, y: torch.Tensor, task: Task) -> torch.Tensor:
    """Loss per leading index, averaged over the batch: out [..., B, C], y [..., B] -> [...].

    regression: mean squared error of the single output; classification: cross-entropy.
    """
    if task == "regression":
        return (out.squeeze(-1) - y).square().mean(-1)
    lead = out.shape[:-1]
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none").view(lead).mean(-1)


def task_metric(out: torch.Tensor, y: torch.Tensor, task: Task, metric: str = "loss") -> torch.Tensor:
    """`task_loss`, or with metric="accuracy" the share of correct argmax predictions (classification)."""
    if metric == "loss":
        return task_loss(out, y, task)
    if metric == "accuracy" and task == "classification":
        return (out.argmax(-1) == y).to(out.dtype).mean(-1)
    raise ValueError(f"metric must be 'loss' (or 'accuracy' for classification), got {metric!r} for {task}")


def _optimizer(params: list[torch.Tensor], lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, fused=True)


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


@dataclass
class TrainLog:
    """What training left besides the parameters: per-student first non-finite step (-1 = none)
    and the loss value seen at that step (nan, inf or -inf; 0 where none failed)."""

    failed_step: torch.Tensor
    failed_loss: torch.Tensor
    steps: int


def train_ensemble(
    ens: Ensemble,
    x: torch.Tensor,
    y: torch.Tensor,
    trial_index: torch.Tensor,
    spec: TrainSpec,
    shuffle_seeds: list[int],
    on_epoch: Callable[[int, float], None] | None = None,
) -> TrainLog:
    """Train every student of `ens` on its own trial's data, in place.

    x [T, P, D] and y [T, P] hold the training sets of T trials; `trial_index` [S] says which one
    each student uses; `shuffle_seeds[t]` seeds trial t's batch order. A student whose loss turns
    NaN/inf gets no data gradient from that step on and its parameters are frozen from the end of that
    epoch (Adam's momentum may move them until then); it is reported in `failed_step`. The others are
    untouched by it. `on_epoch(epoch, mean_loss_of_live_students)` reports progress.
    """
    params = [p for p in ens.parameters() if p.requires_grad]
    opt = _optimizer(params, spec.lr)
    manual = spec.backprop == "manual"
    gens = [torch.Generator().manual_seed(int(s)) for s in shuffle_seeds]
    n = x.shape[1]
    batches = _batches(n, spec.batch_size)
    failed_step = torch.full((ens.n_students,), -1, dtype=torch.long, device=x.device)
    failed_loss = x.new_zeros(ens.n_students)
    alive = torch.ones(ens.n_students, dtype=torch.bool, device=x.device)
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
    step, frozen = 0, None
    for epoch in range(spec.epochs):
        perm = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(x.device)
        xs, ys = x[rows, perm][trial_index], y[rows, perm][trial_index]
        running = x.new_zeros(ens.n_students)
        for b in batches:
            xb, yb = xs[:, b], ys[:, b]
            if manual:
                loss = ens.loss_and_grads(xb, yb, spec.task, alive)
                bad = ~torch.isfinite(loss)
            else:
                loss = task_loss(ens(xb), yb, spec.task) + ens.penalty()
                bad = ~torch.isfinite(loss)
                opt.zero_grad(set_to_none=True)
                torch.where(alive & ~bad, loss, torch.zeros_like(loss)).sum().backward()
            first = bad & (failed_step < 0)
            failed_loss = torch.where(first, loss.detach(), failed_loss)
            failed_step = torch.where(first, step, failed_step)
            loss = torch.where(alive & ~bad, loss.detach(), torch.zeros_like(loss))
            alive = alive & ~bad  # no data gradient from the failing step on (checked without a device sync)
            opt.step()
            if frozen is not None:  # students that failed in an earlier epoch keep their parameters
                dead, saved = frozen
                with torch.no_grad():
                    for p, v in zip(params, saved):
                        p[dead] = v
            running += loss
            step += 1
        if frozen is None and not bool(alive.all()) or frozen is not None and int((~alive).sum()) > len(frozen[0]):
            dead = torch.nonzero(~alive).squeeze(1)
            frozen = (dead, [p.detach()[dead].clone() for p in params])
        if on_epoch is not None:
            live = running[alive]
            on_epoch(epoch, float(live.mean()) / len(batches) if live.numel() else float("nan"))
    return TrainLog(failed_step=failed_step.cpu(), failed_loss=failed_loss.cpu(), steps=step)


def train_alone(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: TrainSpec, shuffle_seed: int) -> nn.Module:
    """Train one ordinary PyTorch model with the same loop (x [P, D], y [P]); the batched path's oracle."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(params, spec.lr)
    gen = torch.Generator().manual_seed(int(shuffle_seed))
    n = x.shape[0]
    for _ in range(spec.epochs):
        perm = torch.randperm(n, generator=gen).to(x.device)
        xs, ys = x[perm], y[perm]
        for b in _batches(n, spec.batch_size):
            loss = task_loss(model(xs[b]), ys[b], spec.task) + spectral_penalty(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model


@torch.no_grad()
def evaluate(
    ens: Ensemble, x: torch.Tensor, y: torch.Tensor, trial_index: torch.Tensor, task: Task, chunk: int = EVAL_BLOCK,
    keep: dict[int, torch.Tensor] | None = None, metric: str = "loss",
) -> torch.Tensor:
    """Loss (or accuracy) of every student on its trial's set (x [T, P, D], y [T, P]) -> [S] (no penalty).

    `keep` masks hidden nodes as in `Ensemble.forward`.
    """
    total = x.new_zeros(ens.n_students)
    n = x.shape[1]
    for b in _batches(n, chunk):
        total += task_metric(ens(x[trial_index, b], keep=keep), y[trial_index, b], task, metric) * (b.stop - b.start)
    return total / n
