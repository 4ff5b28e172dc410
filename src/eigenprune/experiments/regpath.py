"""Choosing the L2 strength on a regularization path, as for the lasso.

Each (teacher, method, width) is trained at K strengths (multipliers of the base L2 coefficients)
and several trials. Rules, applied to the validation loss averaged over trials:
  best  the strength with the lowest mean validation loss
  1se   the largest strength whose mean validation loss is within one standard error (over trials)
        of the best one's (Breiman's / glmnet's "one-standard-error rule"): the most regularized,
        hence narrowest, student that is statistically as good as the best
  stable  within the longest run of neighbouring strengths over which the mean effective dimension
        changes by less than `plateau_tol` (relative) per step, the strength with the lowest mean
        validation loss: the width the student keeps however the penalty is varied; falls back to
        1se when no two neighbours qualify
"""

from __future__ import annotations

import numpy as np
import pandas as pd

GROUP = ["teacher_index", "method", "width"]
RULES = ("best", "1se", "stable")


def best_rule(strengths: np.ndarray, mean: np.ndarray) -> float:
    """The strength with the lowest mean validation loss (ties: the larger strength)."""
    strengths, mean = np.asarray(strengths, dtype=float), np.asarray(mean, dtype=float)
    order = np.argsort(-strengths, kind="stable")
    return float(strengths[order][np.nanargmin(mean[order])])


def one_se_rule(strengths: np.ndarray, mean: np.ndarray, se: np.ndarray) -> float:
    """The largest strength with mean <= mean[best] + se[best]."""
    strengths, mean, se = (np.asarray(a, dtype=float) for a in (strengths, mean, se))
    best = int(np.nanargmin(mean))
    bound = mean[best] + (0.0 if np.isnan(se[best]) else se[best])
    return float(strengths[mean <= bound].max())


def stable_rule(strengths: np.ndarray, mean_val: np.ndarray, mean_dim: np.ndarray, plateau_tol: float = 0.15) -> float | None:
    """The lowest-validation-loss strength inside the longest effective-dimension plateau, or None if none.

    Strengths are sorted; neighbours i, i+1 belong to a plateau when |dim[i+1] - dim[i]| <= plateau_tol *
    max(dim[i], dim[i+1]). Ties between plateaus of equal length go to the stronger penalty.
    """
    order = np.argsort(np.asarray(strengths, dtype=float))
    k, val, dim = (np.asarray(a, dtype=float)[order] for a in (strengths, mean_val, mean_dim))
    flat = np.abs(np.diff(dim)) <= plateau_tol * np.maximum(dim[:-1], dim[1:])
    best: tuple[int, int] | None = None  # (start, end) indices of the longest run, inclusive
    start = None
    for i, ok in enumerate([*flat, False]):
        if ok and start is None:
            start = i
        elif not ok and start is not None:
            if best is None or i - start >= best[1] - best[0]:
                best = (start, i)
            start = None
    if best is None:
        return None
    inside = np.arange(best[0], best[1] + 1)
    return float(k[inside[np.nanargmin(val[inside])]])


def path_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per (teacher, method, width, strength): mean and standard error of validation loss over ok trials."""
    ok = results[results.status == "ok"]
    g = ok.groupby([*GROUP, "strength"]).val_loss
    table = pd.DataFrame({"val_mean": g.mean(), "val_se": g.std(ddof=1) / np.sqrt(g.count()), "trials": g.count()})
    table["dim_mean"] = ok.groupby([*GROUP, "strength"]).effective_dim.mean() if "effective_dim" in ok else np.nan
    return table.reset_index()


def select_strengths(results: pd.DataFrame) -> pd.DataFrame:
    """`results` with boolean columns `selected_best`, `selected_1se` and `selected_stable` (all trials of
    the chosen strength)."""
    out = results.copy()
    for rule in RULES:
        out[f"selected_{rule}"] = False
    if "val_loss" not in out or out.val_loss.isna().all():
        return out
    for key, g in path_table(results).groupby(GROUP):
        best = best_rule(g.strength.to_numpy(), g.val_mean.to_numpy())
        one_se = one_se_rule(g.strength.to_numpy(), g.val_mean.to_numpy(), g.val_se.to_numpy())
        stable = stable_rule(g.strength.to_numpy(), g.val_mean.to_numpy(), g.dim_mean.to_numpy())
        rows = np.logical_and.reduce([out[c] == v for c, v in zip(GROUP, key)])
        for rule, k in (("best", best), ("1se", one_se), ("stable", one_se if stable is None else stable)):
            out.loc[rows & (out.strength == k), f"selected_{rule}"] = True
    return out
