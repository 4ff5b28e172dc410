"""Training one ordinary PyTorch model: Adam on shuffled mini-batches of the task loss plus the spectral penalty.

`train_alone` is also the oracle the batched trainer (`eigenprune.batched.train`) is tested against:
both draw every epoch's shuffle from a `torch.Generator` seeded by the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from eigenprune.core.convert import spectral_penalty
from eigenprune.core.losses import Task, task_loss


@dataclass(frozen=True)
class TrainSpec:
    """How a group of students trains: all share learning rate, batch size and epoch count."""

    lr: float
    batch_size: int
    epochs: int
    task: Task = "regression"
    # the ensemble's hand-written gradients, the same with the first layer in fused kernels, or autograd
    backprop: Literal["manual", "fused", "autograd"] = "manual"
    cuda_graph: bool = False  # on CUDA: capture an epoch once and replay it (see `train_ensemble`)

    def __post_init__(self) -> None:
        if self.cuda_graph and self.backprop == "autograd":
            raise ValueError("cuda_graph needs backprop='manual' or 'fused' (autograd's backward is not captured)")


def adam(params: list[torch.Tensor], lr: float, capturable: bool = False) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, fused=True, capturable=capturable)


def batches(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def train_alone(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: TrainSpec, shuffle_seed: int) -> nn.Module:
    """Train one ordinary PyTorch model with the same loop (x [P, D], y [P]); the batched path's oracle."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adam(params, spec.lr)
    gen = torch.Generator().manual_seed(int(shuffle_seed))
    n = x.shape[0]
    for _ in range(spec.epochs):
        perm = torch.randperm(n, generator=gen).to(x.device)
        xs, ys = x[perm], y[perm]
        for b in batches(n, spec.batch_size):
            loss = task_loss(model(xs[b]), ys[b], spec.task) + spectral_penalty(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model
