"""Building students from per-layer plans: how each layer trains and how it is regularized.

Every student is a plain `nn.Sequential` of `SpectralLinear` layers with ReLU between them (a
"direct" layer is one whose eigenvalues are frozen at 1), so the batched ensemble can stack them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from eigenprune.core.layers import Role, SpectralLinear


@dataclass(frozen=True)
class LayerPlan:
    """One layer of a student: its output width, how it trains (`kind`: the `role` of the layer `make_layer` builds),
    and its regularization coefficients.

    `l1_lam` and `group_lasso` are the pruning baselines' sparsity terms (see `SpectralLinear`).
    """

    width: int
    kind: Role = "spectral"
    l2_phi: float = 0.01
    l2_lam: float = 5e-4
    bias: bool = False
    l1_lam: float = 0.0
    group_lasso: float = 0.0


def make_layer(n_in: int, plan: LayerPlan, generator: torch.Generator, dtype: torch.dtype) -> SpectralLinear:
    """A `SpectralLinear` whose trainable parts follow `plan.kind`, so that its `role` is `plan.kind`.

    spectral: phi and lam_out train; direct: phi (and bias) train, lam_out frozen at 1 (w = -phi);
    fixed: nothing trains and w = 1 (the paper's all-ones readout).
    """
    layer = SpectralLinear(
        n_in, plan.width, bias=plan.bias, train_phi=plan.kind != "fixed", train_lam_out=plan.kind == "spectral",
        train_bias=plan.kind != "fixed", l2_phi=plan.l2_phi, l2_lam=plan.l2_lam, l1_lam=plan.l1_lam,
        group_lasso=plan.group_lasso, generator=generator, dtype=dtype,
    )
    if plan.kind == "fixed":
        with torch.no_grad():
            layer.phi.fill_(-1.0)
    return layer


def make_student(input_dim: int, plans: list[LayerPlan], seed: int, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """A student MLP: one `SpectralLinear` per plan, ReLU between them, none after the last."""
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    n_in = input_dim
    for i, plan in enumerate(plans):
        layers.append(make_layer(n_in, plan, generator, dtype))
        if i < len(plans) - 1:
            layers.append(nn.ReLU())
        n_in = plan.width
    return nn.Sequential(*layers)
