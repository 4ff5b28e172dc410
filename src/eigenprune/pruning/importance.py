"""Per-node importance scores for a layer's output nodes (one scalar per hidden node).

A node's importance is the norm of its actual incoming weights, ||w_i|| with w_i = (lam_in - lam_out_i) * phi_i.
With lam_in = 0 (the paper's layer) that is the paper's spectral score L_i = |lam_out_i| * ||phi_i||, and on an
ordinary layer (or one whose lam_out is frozen at 1) it is the direct score M_i = ||w_i||. Defining it on the
actual weights keeps it exact when lam_in trains: a node with lam_out_i = 0 still has weights lam_in * phi_i.

All functions accept a single layer ([O, I] tensors) or a stacked one ([S, O, I]). For a convolution a node is
an output channel and its incoming weights are all its kernel entries (`node_importance` flattens them); in a grouped
one, those from its group's inputs (weight [O, I / groups, *kernel], each with its own lam_in: `spectral_weight`).
"""

from __future__ import annotations

import torch
from torch import nn

from eigenprune.core.layers import PLAIN_LAYERS, plain_names


def eigenvalue_importance(phi: torch.Tensor, lam_out: torch.Tensor) -> torch.Tensor:
    """L_i = |lam_out_i| * ||phi_i||_2 (row i of phi holds node i's incoming eigenvector entries);
    equal to `feature_norm` of the weights when lam_in = 0."""
    return lam_out.abs() * phi.norm(dim=-1)


def feature_norm(weight: torch.Tensor) -> torch.Tensor:
    """M_i = ||w_i||_2, the norm of node i's incoming weights."""
    return weight.norm(dim=-1)


def node_importance(layer: nn.Module) -> torch.Tensor:
    """The norm of each output node's (channel's) incoming weights (see the module docstring).

    On a spectral layer with lam_in fixed at 0 it is computed as the paper writes it, |lam_out_i| * ||phi_i||.
    """
    plain = isinstance(layer, PLAIN_LAYERS)
    kernel_dims = layer.weight.dim() - 2 if plain else getattr(layer, "kernel_dims", 0)

    def rows(t: torch.Tensor) -> torch.Tensor:  # [..., O, I, *kernel] -> [..., O, I * kernel]
        return t.flatten(t.dim() - 1 - kernel_dims) if kernel_dims else t

    with torch.no_grad():
        if hasattr(layer, "lam_out") and hasattr(layer, "phi"):
            if layer.lam_out.requires_grad and not layer.lam_in.requires_grad and not bool(layer.lam_in.any()):
                return eigenvalue_importance(rows(layer.phi), layer.lam_out)
            return feature_norm(rows(layer.weight))
        if plain:
            return feature_norm(rows(layer.weight))
    raise TypeError(f"node_importance needs a spectral layer or one of {plain_names()}, got {type(layer).__name__}")


def normalize(scores: torch.Tensor) -> torch.Tensor:
    """Scores divided by their maximum along the last dim (all-zero rows stay zero)."""
    top = scores.max(dim=-1, keepdim=True).values
    return scores / torch.where(top > 0, top, torch.ones_like(top))
