"""Choosing the L2 strength on a regularization path, as for the lasso.

Each (teacher, method, width) is trained at K strengths (multipliers of the base L2 coefficients)
and several trials. Rules, applied to the validation loss averaged over trials:
  best  the strength with the lowest mean validation loss
  1se   the largest strength whose mean validation loss is within one standard error (over trials)
        of the best one's (Breiman's / glmnet's "one-standard-error rule"): the most regularized,
        hence narrowest, student that is statistically as good as the best
"""

from __future__ import annotations

import numpy as np
import pandas as pd

GROUP = ["teacher_index", "method", "width"]


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


def path_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per (teacher, method, width, strength): mean and standard error of validation loss over ok trials."""
    ok = results[results.status == "ok"]
    g = ok.groupby([*GROUP, "strength"]).val_loss
    table = pd.DataFrame({"val_mean": g.mean(), "val_se": g.std(ddof=1) / np.sqrt(g.count()), "trials": g.count()})
    return table.reset_index()


def select_strengths(results: pd.DataFrame) -> pd.DataFrame:
    """`results` with boolean columns `selected_best` and `selected_1se` (all trials of the chosen strength)."""
    out = results.copy()
    out["selected_best"] = False
    out["selected_1se"] = False
    if "val_loss" not in out or out.val_loss.isna().all():
        return out
    for key, g in path_table(results).groupby(GROUP):
        best = best_rule(g.strength.to_numpy(), g.val_mean.to_numpy())
        one_se = one_se_rule(g.strength.to_numpy(), g.val_mean.to_numpy(), g.val_se.to_numpy())
        rows = np.logical_and.reduce([out[c] == v for c, v in zip(GROUP, key)])
        out.loc[rows & (out.strength == best), "selected_best"] = True
        out.loc[rows & (out.strength == one_se), "selected_1se"] = True
    return out
