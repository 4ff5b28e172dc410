"""Inputs and teachers -> per-trial train/test sets.

Every trial gets fresh inputs from its own seed; the teacher is the same for all trials.
Teachers (all frozen):
  mlp              y = sum of the last hidden layer of a ReLU MLP (the paper's teacher)
  linear           y = x @ w, w Glorot uniform from the teacher seed
  hidden_manifold  x = tanh(z F / sqrt(d)) for a latent z ~ N(0, I_d) and a fixed Gaussian F [d, D];
                   y = sigmoid(mlp_teacher(z)) (Goldt et al.'s hidden-manifold model)
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from eigenprune.layers import glorot_uniform_
from eigenprune.nets import make_teacher


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (same on every machine and Python)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class TrialData:
    """Train/test sets for T trials: x [T, P, D], y [T, P] (float targets, or class indices)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    task: str = "regression"
    n_outputs: int = 1
    target_scale: float = 1.0

    def to(self, device: torch.device | str) -> TrialData:
        moved = {k: getattr(self, k).to(device) for k in ("x_train", "y_train", "x_test", "y_test")}
        return TrialData(**moved, task=self.task, n_outputs=self.n_outputs, target_scale=self.target_scale)


def teacher_function(kind: str, input_dim: int, widths: list[int], seed: int, latent_dim: int, dtype: torch.dtype):
    """(make_inputs(n, generator), label(x_or_latent)) for a teacher kind."""
    if kind == "mlp":
        net = make_teacher(input_dim, widths, seed, dtype)
        return (lambda n, g: torch.randn(n, input_dim, generator=g, dtype=dtype)), (lambda x: net(x).squeeze(-1)), None
    if kind == "linear":
        w = glorot_uniform_(torch.empty(1, input_dim, dtype=dtype), torch.Generator().manual_seed(seed))
        return (lambda n, g: torch.randn(n, input_dim, generator=g, dtype=dtype)), (lambda x: (x @ w.T).squeeze(-1)), None
    if kind == "hidden_manifold":
        g0 = torch.Generator().manual_seed(seed)
        features = torch.randn(latent_dim, input_dim, generator=g0, dtype=dtype)
        net = make_teacher(latent_dim, widths, seed + 1, dtype)
        embed = lambda z: torch.tanh(z @ features / math.sqrt(latent_dim))  # noqa: E731
        label = lambda z: torch.sigmoid(net(z).squeeze(-1))  # noqa: E731
        return (lambda n, g: torch.randn(n, latent_dim, generator=g, dtype=dtype)), label, embed
    raise ValueError(f"teacher kind must be one of mlp, linear, hidden_manifold, got {kind!r}")


@torch.no_grad()
def teacher_data(
    kind: str, input_dim: int, widths: list[int], teacher_seed: int, data_seed: int, trials: int,
    n_train: int, n_test: int, latent_dim: int = 5, standardize: bool = False, dtype: torch.dtype = torch.float32,
) -> TrialData:
    """Gaussian (or hidden-manifold) inputs labelled by a frozen teacher, fresh inputs per trial.

    With `standardize`, targets are divided by the standard deviation of all training targets
    (losses are then in units of the target variance); the factor is kept in `target_scale`.
    """
    draw, label, embed = teacher_function(kind, input_dim, widths, teacher_seed, latent_dim, dtype)
    xs, ys = [], []
    for t in range(trials):
        g = torch.Generator().manual_seed(derive_seed("data", data_seed, t))
        u = draw(n_train + n_test, g)
        ys.append(label(u))
        xs.append(embed(u) if embed is not None else u)
    x, y = torch.stack(xs), torch.stack(ys)
    scale = float(y[:, :n_train].std()) if standardize else 1.0
    y = y / scale
    return TrialData(x[:, :n_train], y[:, :n_train], x[:, n_train:], y[:, n_train:], target_scale=scale)
