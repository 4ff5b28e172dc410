"""A reference width from the data: how narrow a network trained from scratch can imitate a teacher.

For a teacher, networks of widths k (a grid around and below h_T) are trained from scratch, direct
and spectral, several seeds each, all at once in batched ensembles. The capacity curve is MSE*(k),
the test MSE at width k (best and mean over seeds), and

    k*(eps) = the smallest width k of the grid whose MSE*(k) <= eps

with eps the full spectral student's test MSE (or 1.1 x that). k* is the "train the small network
from scratch" baseline the pruning literature asks for: the width a pruned student's n_c should be
compared with, since a teacher's size is only defined up to how well a narrower network can imitate it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def k_star(widths: Sequence[float], mse: Sequence[float], eps: float) -> float:
    """The smallest width whose MSE is <= eps (NaN where none is, or eps is NaN); widths need not be sorted.

    Widths with a NaN MSE (failed students) never count.
    """
    widths, mse = np.asarray(widths, dtype=float), np.asarray(mse, dtype=float)
    if widths.shape != mse.shape or widths.ndim != 1:
        raise ValueError(f"widths and mse must be 1-d and of one shape, got {widths.shape} and {mse.shape}")
    ok = mse <= eps  # False for NaN on either side
    return float(widths[ok].min()) if ok.any() else float("nan")


def k_star_per_layer(shapes: pd.DataFrame, layers: Sequence[str], eps: float, stat: str = "best") -> dict[str, float]:
    """Per-layer k* of deep networks trained from scratch on a grid of shapes: for each width column in
    `layers` (e.g. "k1", "k2"), the smallest value of it among the shapes whose `stat` column is <= eps,
    whatever the other layers' widths (NaN where no shape reaches eps)."""
    return {layer: k_star(shapes[layer].to_numpy(), shapes[stat].to_numpy(), eps) for layer in layers}


def capacity_widths(h_t: int, fractions: Sequence[float]) -> list[int]:
    """The grid of widths for a teacher of width h_T: round(f x h_T) for each fraction f, at least 1, unique, sorted."""
    if not fractions or any(not f > 0 for f in fractions):
        raise ValueError(f"capacity fractions must be positive numbers, got {list(fractions)}")
    return sorted({max(1, round(f * h_t)) for f in fractions})


def capacity_curve(runs: pd.DataFrame, keys: Sequence[str] = ("teacher",)) -> pd.DataFrame:
    """MSE*(k) from one row per trained network (columns `keys`, method, width, trial, test_loss):
    per (keys, method, width) the best (min) and mean test loss over seeds, their std and count, plus
    rows with method "any" taking the best over methods and the mean of the better method."""
    g = runs.groupby([*keys, "method", "width"]).test_loss
    table = pd.DataFrame({"best": g.min(), "mean": g.mean(), "std": g.std(ddof=1), "seeds": g.count()}).reset_index()
    both = table.groupby([*keys, "width"]).agg(best=("best", "min"), mean=("mean", "min"), seeds=("seeds", "sum")).reset_index()
    both["method"], both["std"] = "any", np.nan
    return pd.concat([table, both[table.columns]], ignore_index=True)


def k_star_table(curve: pd.DataFrame, eps: pd.DataFrame, keys: Sequence[str] = ("teacher",),
                 factors: Sequence[float] = (1.0, 1.1)) -> pd.DataFrame:
    """k* per (keys, method, statistic) and eps factor: `curve` from `capacity_curve`, `eps` one row per
    key with column `eps`. Columns: keys, method, stat ("best" or "mean"), factor, eps, k_star."""
    rows = []
    eps_of = eps.set_index(list(keys)).eps
    for key, g in curve.groupby([*keys, "method"]):
        *kv, method = key
        e = float(eps_of.loc[tuple(kv) if len(kv) > 1 else kv[0]])
        for stat in ("best", "mean"):
            for f in factors:
                rows.append({**dict(zip(keys, kv)), "method": method, "stat": stat, "factor": f, "eps": f * e,
                             "k_star": k_star(g.width.to_numpy(), g[stat].to_numpy(), f * e)})
    return pd.DataFrame(rows)
