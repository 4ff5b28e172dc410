"""Converting any model between ordinary and spectral layers, and the penalty to add to its loss."""

from __future__ import annotations

import torch
from torch import nn

from eigenprune.core.layers import SpectralLinear


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
