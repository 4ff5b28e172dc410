"""The task losses: mean squared error (regression) and cross-entropy (classification)."""

from __future__ import annotations

from typing import Literal

import torch
from torch.nn import functional as F

Task = Literal["regression", "classification"]


def _loss_terms(out: torch.Tensor, y: torch.Tensor, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [...], the residual out - y for regression or the log-probabilities for classification)."""
    if task == "regression":
        residual = out.squeeze(-1) - y
        return residual.square().mean(-1), residual
    logp = F.log_softmax(out, -1)
    return -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(-1), logp


def task_loss(out: torch.Tensor, y: torch.Tensor, task: Task) -> torch.Tensor:
    """Loss per leading index, averaged over the batch: out [..., B, C], y [..., B] -> [...].

    regression: mean squared error of the single output; classification: cross-entropy of the logits.
    """
    return _loss_terms(out, y, task)[0]


def task_loss_and_grad(out: torch.Tensor, y: torch.Tensor, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """`task_loss` and its gradient with respect to `out` (same shape as `out`), for hand-written backprop.

    regression: 2 (out - y) / B; classification: (softmax(out) - onehot(y)) / B.
    """
    loss, terms = _loss_terms(out, y, task)
    batch = out.shape[-2]
    if task == "regression":
        return loss, (2.0 / batch) * terms.unsqueeze(-1)
    onehot = torch.zeros_like(terms).scatter_(-1, y.unsqueeze(-1), 1.0)  # no host sync, unlike one_hot on CUDA
    return loss, (terms.exp() - onehot) / batch


def task_metric(out: torch.Tensor, y: torch.Tensor, task: Task, metric: str = "loss") -> torch.Tensor:
    """`task_loss`, or with metric="accuracy" the share of correct argmax predictions (classification)."""
    if metric == "loss":
        return task_loss(out, y, task)
    if metric == "accuracy" and task == "classification":
        return (out.argmax(-1) == y).to(out.dtype).mean(-1)
    raise ValueError(f"metric must be 'loss' (or 'accuracy' for classification), got {metric!r} for {task}")
