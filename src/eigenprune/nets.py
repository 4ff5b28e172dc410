"""MLP builders: frozen teachers, spectral/direct students, and `spectralize` for any model.

Every network here is a plain `nn.Sequential` of linear layers with ReLU between them. A student's
layers are all `SpectralLinear` (a "direct" layer is one whose eigenvalues are frozen at 1), so the
batched ensemble can stack them; `despectralize` turns any of them back into `nn.Linear`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from eigenprune.layers import SpectralLinear, glorot_uniform_

LayerKind = Literal["spectral", "direct", "fixed"]


@dataclass(frozen=True)
class LayerPlan:
    """One layer of a student: its output width, how it trains, and its L2 coefficients."""

    width: int
    kind: LayerKind = "spectral"
    l2_phi: float = 0.01
    l2_lam: float = 5e-4
    bias: bool = False


def make_layer(n_in: int, plan: LayerPlan, generator: torch.Generator, dtype: torch.dtype) -> SpectralLinear:
    """A `SpectralLinear` whose trainable parts follow `plan.kind`.

    spectral: phi and lam_out train; direct: phi (and bias) train, lam_out frozen at 1 (w = -phi);
    fixed: nothing trains and w = 1 (the paper's all-ones readout).
    """
    layer = SpectralLinear(
        n_in, plan.width, bias=plan.bias, train_phi=plan.kind != "fixed", train_lam_out=plan.kind == "spectral",
        train_bias=plan.kind != "fixed", l2_phi=plan.l2_phi, l2_lam=plan.l2_lam, generator=generator, dtype=dtype,
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


def make_teacher(input_dim: int, widths: list[int], seed: int, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """A frozen MLP teacher: input -> widths... (ReLU, no bias, Glorot from `seed`) -> sum of the last layer."""
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    n_in = input_dim
    for width in widths:
        linear = nn.Linear(n_in, width, bias=False, dtype=dtype)
        glorot_uniform_(linear.weight, generator)
        layers += [linear, nn.ReLU()]
        n_in = width
    readout = nn.Linear(n_in, 1, bias=False, dtype=dtype)
    nn.init.ones_(readout.weight)
    layers.append(readout)
    teacher = nn.Sequential(*layers)
    teacher.requires_grad_(False)
    return teacher


def linear_layers(model: nn.Module) -> list[nn.Module]:
    """The `nn.Linear` and `SpectralLinear` layers of `model`, in order."""
    return [m for m in model.modules() if isinstance(m, (nn.Linear, SpectralLinear))]


def spectralize(model: nn.Module, **kwargs) -> nn.Module:
    """Replace every `nn.Linear` inside `model` (in place) by an exact `SpectralLinear` copy; returns `model`.

    The outputs are unchanged (lam_in = 0, lam_out = 1, phi = -W). Keyword arguments go to
    `SpectralLinear` (flags, L2 coefficients).
    """
    if isinstance(model, nn.Linear):
        return SpectralLinear.from_linear(model, **kwargs)
    for name, child in model.named_children():
        setattr(model, name, spectralize(child, **kwargs))
    return model


def despectralize(model: nn.Module) -> nn.Module:
    """Replace every `SpectralLinear` inside `model` (in place) by the `nn.Linear` it computes; returns `model`."""
    if isinstance(model, SpectralLinear):
        return model.to_linear()
    for name, child in model.named_children():
        setattr(model, name, despectralize(child))
    return model


def spectral_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of `penalty()` over all `SpectralLinear` layers of `model` (add it to the loss)."""
    terms = [m.penalty() for m in model.modules() if isinstance(m, SpectralLinear)]
    return torch.stack(terms).sum() if terms else torch.zeros(())
