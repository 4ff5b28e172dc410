"""Scalar summaries of trained students: effective dimension, critical point and friends."""

from __future__ import annotations

import numpy as np
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


def critical_point(kept, delta, tol: float) -> int:
    """The smallest kept count from which on pruning is harmless: the critical point of a pruning curve.

    `kept` [K] are node counts in increasing order and `delta` [K] the loss increase ΔMSE =
    loss(kept) - loss(full) at each. Returns the smallest kept[i] such that delta[j] <= tol for
    every j >= i (so a lucky dip below tol at small counts does not count). If even the largest
    count fails (only possible with tol below delta at full width), returns kept[-1] + 1.
    Plain arrays, lists or 1-d tensors are accepted.
    """
    kept = np.asarray(kept)
    delta = np.asarray(delta, dtype=float)
    if kept.ndim != 1 or kept.shape != delta.shape or kept.size == 0:
        raise ValueError(f"kept and delta must be non-empty 1-d arrays of one length, got shapes {kept.shape} and {delta.shape}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if np.any(np.diff(kept) <= 0):
        raise ValueError("kept must be strictly increasing")
    bad = np.flatnonzero(~(delta <= tol))  # NaN counts as bad
    if bad.size == 0:
        return int(kept[0])
    if bad[-1] == kept.size - 1:
        return int(kept[-1]) + 1
    return int(kept[bad[-1] + 1])
