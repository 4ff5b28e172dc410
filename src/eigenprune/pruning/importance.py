"""Per-node importance scores for a layer's output nodes (one scalar per hidden node).

  eigenvalue    L_i = |lam_out_i| * ||phi_i||   (the paper's spectral ranking)
  feature_norm  M_i = ||w_i||                   (norm of node i's incoming weights; the direct ranking)

Both accept a single layer ([O, I] tensors) or a stacked one ([S, O, I]). With lam_in = 0 and
lam_out frozen at 1 the two coincide up to sign conventions, which is why the paper can compare
them on one axis.
"""

from __future__ import annotations

import torch
from torch import nn

from eigenprune.core.layers import SpectralLinear


def eigenvalue_importance(phi: torch.Tensor, lam_out: torch.Tensor) -> torch.Tensor:
    """L_i = |lam_out_i| * ||phi_i||_2 (row i of phi holds node i's incoming eigenvector entries)."""
    return lam_out.abs() * phi.norm(dim=-1)


def feature_norm(weight: torch.Tensor) -> torch.Tensor:
    """M_i = ||w_i||_2, the norm of node i's incoming weights."""
    return weight.norm(dim=-1)


def node_importance(layer: nn.Module) -> torch.Tensor:
    """The paper's score for `layer`'s output nodes: eigenvalue if its eigenvalues train, else feature norm."""
    with torch.no_grad():
        if isinstance(layer, SpectralLinear) or hasattr(layer, "lam_out"):
            if layer.lam_out.requires_grad:
                return eigenvalue_importance(layer.phi, layer.lam_out)
            return feature_norm(layer.weight)
        if isinstance(layer, nn.Linear):
            return feature_norm(layer.weight)
    raise TypeError(f"node_importance needs a SpectralLinear or nn.Linear, got {type(layer).__name__}")


def normalize(scores: torch.Tensor) -> torch.Tensor:
    """Scores divided by their maximum along the last dim (all-zero rows stay zero)."""
    top = scores.max(dim=-1, keepdim=True).values
    return scores / torch.where(top > 0, top, torch.ones_like(top))
