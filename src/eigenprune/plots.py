"""One function per figure. Each takes the run's tables and returns a matplotlib Figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

COLORS = {"spectral": "tab:red", "direct": "tab:blue"}


def _ok(results: pd.DataFrame) -> pd.DataFrame:
    return results[results.status == "ok"]


def _nothing_to_show():
    """A placeholder figure for a run in which no student trained (all diverged)."""
    fig, ax = plt.subplots(figsize=(5.5, 2))
    ax.text(0.5, 0.5, "no student trained successfully", ha="center", va="center")
    ax.set_axis_off()
    return fig


def importance_histograms(importance: pd.DataFrame, results: pd.DataFrame, widths: list[int] | None = None):
    """Histograms of normalised importance (L for spectral, M for direct), one column per width."""
    ok = _ok(results)[["method", "width", "trial"]]
    imp = importance.merge(ok, on=["method", "width", "trial"])
    methods = [m for m in ("spectral", "direct") if m in set(imp.method)]
    widths = widths or sorted(imp.width.unique())
    if not methods:
        return _nothing_to_show()
    fig, axes = plt.subplots(len(methods), len(widths), figsize=(3.2 * len(widths), 2.6 * len(methods)), squeeze=False)
    for i, method in enumerate(methods):
        for j, w in enumerate(widths):
            ax = axes[i][j]
            vals = imp[(imp.method == method) & (imp.width == w)].normalized
            ax.hist(vals, bins=np.linspace(0, 1, 41), color=COLORS[method], alpha=0.8)
            ax.set_yscale("log")
            ax.set_title(f"{method}, N={w}", fontsize=9)
            ax.set_xlabel("L / max L" if method == "spectral" else "M / max M", fontsize=8)
    fig.suptitle("Node importance (pooled over trials)")
    fig.tight_layout()
    return fig


def effective_dimension(results: pd.DataFrame, teacher_width: int, threshold: float):
    """Effective dimension (mean +- std over trials) against student width N, teacher width marked."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ok = _ok(results)
    for method, g in ok.groupby("method"):
        s = g.groupby("width").effective_dim.agg(["mean", "std"]).fillna(0)
        ax.errorbar(s.index, s["mean"], yerr=s["std"], marker="o", capsize=3, label=method, color=COLORS.get(method))
    ax.axhline(teacher_width, ls="--", color="k", lw=1, label=f"teacher width {teacher_width}")
    ax.set_xscale("log")
    ax.set_xlabel("student width N")
    ax.set_ylabel(f"effective dimension (importance > {threshold:g} max)")
    ax.legend()
    fig.tight_layout()
    return fig


def losses(results: pd.DataFrame):
    """Train and test loss against student width, both methods."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ok = _ok(results)
    for method, g in ok.groupby("method"):
        for col, ls in (("train_loss", ":"), ("test_loss", "-")):
            s = g.groupby("width")[col].agg(["mean", "std"]).fillna(0)
            ax.errorbar(s.index, s["mean"], yerr=s["std"], ls=ls, marker="o", capsize=3,
                        color=COLORS.get(method), label=f"{method} {col.split('_')[0]}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("student width N")
    ax.set_ylabel("MSE")
    if len(ok):
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def pruning_curves(curves: pd.DataFrame, results: pd.DataFrame, teacher_width: int):
    """Mean delta loss vs kept - h_T, one line per width, one panel per method."""
    ok = _ok(results)[["method", "width", "trial"]]
    cur = curves.merge(ok, on=["method", "width", "trial"])
    methods = [m for m in ("spectral", "direct") if m in set(cur.method)]
    if not methods:
        return _nothing_to_show()
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 4), squeeze=False, sharey=True)
    cmap = plt.get_cmap("viridis")
    widths = sorted(cur.width.unique())
    for ax, method in zip(axes[0], methods):
        for j, w in enumerate(widths):
            g = cur[(cur.method == method) & (cur.width == w)].groupby("kept_minus_teacher").delta_loss.mean()
            ax.plot(g.index, g.values, color=cmap(j / max(len(widths) - 1, 1)), label=f"N={w}")
        ax.axvline(0, ls="--", color="k", lw=1)
        ax.set_xlim(-teacher_width, 3 * teacher_width)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_title(method)
        ax.set_xlabel(r"kept nodes $n_\lambda - h_T$")
        ax.set_ylabel(r"$\Delta$MSE (test)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
