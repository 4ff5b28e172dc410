"""The task losses: mean squared error (regression) and cross-entropy (classification)."""

from __future__ import annotations

from typing import Literal

import torch
from torch.nn import functional as F

Task = Literal["regression", "classification"]


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
