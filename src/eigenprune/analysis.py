"""Scalar summaries of trained students: effective dimension and friends."""

from __future__ import annotations

import torch

from eigenprune.importance import normalize


def effective_dim(scores: torch.Tensor, threshold: float = 0.05, widths: torch.Tensor | None = None) -> torch.Tensor:
    """Number of nodes whose normalised importance (score / max score) exceeds `threshold`.

    scores [..., N]; `widths` [...] limits each row to its first widths[i] entries (padding).
    """
    norm = normalize(scores)
    if widths is not None:
        valid = torch.arange(scores.shape[-1], device=scores.device) < widths.unsqueeze(-1)
        norm = norm * valid
    return (norm > threshold).sum(-1)
