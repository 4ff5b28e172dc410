"""Summaries of trained students and their pruning curves.

effective dimension, critical point of a pruning curve, the exponential fit below it, the collapse
of rescaled curves, and path-product / in-strength statistics compared with the teacher.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from eigenprune.core.structure import linear_layers
from eigenprune.pruning.importance import node_importance, normalize


def normalized_importance(scores: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Scores [S, N] divided by their maximum: each row's own (groups None, ours), or the maximum over
    all rows with the same `groups` [S] id (the authors': over all trials of a width). Scores are >= 0;
    all-zero rows or groups stay zero."""
    if groups is None:
        return normalize(scores)
    row_top = scores.max(dim=-1).values
    ids = torch.unique(groups, return_inverse=True)[1]
    top = row_top.new_zeros(int(ids.max()) + 1).scatter_reduce(0, ids, row_top, "amax", include_self=False)[ids]
    return scores / torch.where(top > 0, top, torch.ones_like(top)).unsqueeze(-1)


def effective_dim(
    scores: torch.Tensor, threshold: float = 0.05, widths: torch.Tensor | None = None, groups: torch.Tensor | None = None,
    at_least: bool = False,
) -> torch.Tensor:
    """Number of nodes whose normalised importance exceeds `threshold` (`at_least`: is not below it).

    scores [..., N]; `widths` [...] limits each row to its first widths[i] entries (padding); `groups`
    selects the normalisation (see `normalized_importance`). Ours: per row, > threshold; the authors':
    groups = one id per width, at_least=True.
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    norm = normalized_importance(scores, groups)
    if widths is not None:  # padding counts as 0, below any threshold
        valid = torch.arange(scores.shape[-1], device=scores.device) < widths.unsqueeze(-1)
        norm = norm * valid
    return (norm >= threshold if at_least else norm > threshold).sum(-1)


def critical_point(kept: np.ndarray, delta: np.ndarray, tol: float) -> int:
    """Estimated critical kept count n_c of one pruning curve.

    n_c is the smallest k such that delta(k') <= tol for every k' >= k: from n_c nodes up, pruning
    costs (almost) nothing; below it the loss rises. `kept` must be increasing; delta = loss_k - loss_full.
    The experiment uses tol = critical_rel_tol x the full model's test loss (pruning that costs less
    than a tenth of the model's own error counts as free).
    """
    kept, delta = np.asarray(kept), np.asarray(delta, dtype=float)
    if kept.size == 0 or kept.shape != delta.shape:
        raise ValueError(f"kept and delta must be non-empty and of one shape, got {kept.shape} and {delta.shape}")
    above = np.nonzero(delta > tol)[0]
    return int(kept[0]) if above.size == 0 else int(kept[min(above[-1] + 1, kept.size - 1)])


def exponential(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    """a * exp(-b * x) + c, the authors' fit of delta below the critical point."""
    return a * np.exp(-b * x) + c


def fit_exponential(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Least-squares fit of y = a*exp(-b*x) + c; returns a, b, c and the fit's R^2 (NaNs if < 4 points)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size < 4:
        return {"a": np.nan, "b": np.nan, "c": np.nan, "r2": np.nan}
    span = max(float(x.max() - x.min()), 1.0)
    p0 = (max(float(y.max() - y.min()), 1e-12) * np.exp(x.min() * 3 / span), 3 / span, float(y.min()))
    from scipy.optimize import curve_fit  # imported when used: importing scipy takes 0.3-0.6 s

    try:
        (a, b, c), _ = curve_fit(exponential, x, y, p0=p0, maxfev=20000)
    except (RuntimeError, ValueError):
        return {"a": np.nan, "b": np.nan, "c": np.nan, "r2": np.nan}
    resid = y - exponential(x, a, b, c)
    total = float(((y - y.mean()) ** 2).sum())
    return {"a": float(a), "b": float(b), "c": float(c), "r2": 1 - float((resid**2).sum()) / total if total > 0 else np.nan}


def curve_spread(curves: list[tuple[np.ndarray, np.ndarray]], grid: np.ndarray) -> float:
    """Mean over `grid` of the coefficient of variation (std / mean) across curves (x, y), interpolated.

    Only grid points inside every curve's x range and with a positive mean count. 0 = perfect collapse.
    """
    ys = []
    for x, y in curves:
        order = np.argsort(x)
        x, y = np.asarray(x, dtype=float)[order], np.asarray(y, dtype=float)[order]
        ys.append(np.where((grid >= x[0]) & (grid <= x[-1]), np.interp(grid, x, y), np.nan))
    stack = np.vstack(ys)
    ok = ~np.isnan(stack).any(0)
    mean = stack[:, ok].mean(0)
    pos = mean > 0
    if not pos.any():
        return float("nan")
    return float((stack[:, ok].std(0)[pos] / mean[pos]).mean())


def scaled_to_max(delta: np.ndarray) -> np.ndarray:
    """delta / max(delta), the collapse's vertical rescaling, in float64; a curve whose maximum is not positive
    (pruning never raised the loss) stays as it is instead of being divided by zero."""
    delta = np.asarray(delta, dtype=np.float64)
    top = float(np.max(delta)) if delta.size else 0.0
    return delta / top if top > 0 else delta


def collapse_measure(curves: list[tuple[int, np.ndarray, np.ndarray]], points: int = 50) -> dict[str, float]:
    """How well pruning curves collapse after the paper's rescaling.

    `curves` holds (h_T, kept, delta) triples (e.g. mean curves for several N and teachers). Before:
    raw delta against kept - h_T on [-min h_T, 0]. After: delta / max(delta) against kept / h_T - 1 on
    [-1 + 1/min h_T, 0]. Returns both spreads (mean coefficient of variation across curves) and
    their ratio; a ratio well below 1 means the rescaled curves fall on one master curve.
    """
    h_min = min(h for h, _, _ in curves)
    before = curve_spread([(k - h, d) for h, k, d in curves], np.linspace(-h_min + 1, 0, points))
    after = curve_spread(
        [(k / h - 1, scaled_to_max(d)) for h, k, d in curves], np.linspace(-1 + 1 / h_min, 0, points)
    )
    return {"spread_before": before, "spread_after": after, "ratio": after / before if before > 0 else float("nan")}


def path_products(w1: torch.Tensor, w2: torch.Tensor) -> np.ndarray:
    """Sorted products w1[j, i] * w2[k, j] over every path input i -> hidden j -> hidden k."""
    prod = w2.unsqueeze(-1) * w1.unsqueeze(0)  # [K, J, I]
    return np.sort(prod.detach().flatten().cpu().double().numpy())


def in_strength(w: torch.Tensor) -> np.ndarray:
    """Sum of each node's incoming weights (w is [out, in])."""
    return w.detach().sum(-1).cpu().double().numpy()


def distribution_distance(a: np.ndarray, b: np.ndarray) -> float:
    """1-Wasserstein distance between two empirical distributions (equal weights): the integral of |F_a - F_b|.

    What `scipy.stats.wasserstein_distance` computes (tested against it), written out because importing
    scipy.stats takes 0.6-1.2 s, paid in every worker process and again by the report.
    """
    a, b = np.sort(np.asarray(a, dtype=float).ravel()), np.sort(np.asarray(b, dtype=float).ravel())
    if not a.size or not b.size:
        raise ValueError(f"distribution_distance needs two non-empty samples, got sizes {a.size} and {b.size}")
    points = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(a, points[:-1], side="right") / a.size
    cdf_b = np.searchsorted(b, points[:-1], side="right") / b.size
    return float(np.sum(np.abs(cdf_a - cdf_b) * np.diff(points)))


def teacher_comparison(student: nn.Module, teacher: nn.Module, n_keep: int) -> dict[str, np.ndarray | float]:
    """Compare a student pruned to its `n_keep` most important first-layer nodes with the teacher.

    Both nets' first two linear layers define the paths input -> hidden -> hidden2. Returns the
    sorted path products and first-layer in-strengths of both, and the Wasserstein distance between
    each pair. Path products are invariant to the ReLU rescaling symmetry; in-strengths are not.
    """
    s_layers, t_layers = linear_layers(student), linear_layers(teacher)
    if len(s_layers) < 3 or len(t_layers) < 3:
        raise ValueError("path analysis needs two hidden layers in both student and teacher")
    keep = node_importance(s_layers[0]).argsort(descending=True, stable=True)[:n_keep]
    with torch.no_grad():
        w1, w2 = s_layers[0].weight[keep], s_layers[1].weight[:, keep]
        sp, tp = path_products(w1, w2), path_products(t_layers[0].weight, t_layers[1].weight)
        si, ti = in_strength(w1), in_strength(t_layers[0].weight)
    return {"student_paths": sp, "teacher_paths": tp, "student_in": si, "teacher_in": ti,
            "path_distance": distribution_distance(sp, tp), "in_strength_distance": distribution_distance(si, ti)}
