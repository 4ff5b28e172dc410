"""Figures of the recovery diagram (`experiments.recovery`), drawn from its output folder's tables."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from eigenprune.experiments.analysis import scaled_to_max
from eigenprune.experiments.store import OwnedFolder
from eigenprune.reporting.plots import save

COLORS = {"spectral": "tab:red", "direct": "tab:blue", "any": "k"}


def heatmaps(summary: pd.DataFrame):
    """n_c / h_T and n_c / k* on the (h_T, d) grid, mean over teacher seeds, one row per setting (fixed L2, path)."""
    settings = sorted(summary.setting.unique())
    fig, axes = plt.subplots(len(settings), 2, figsize=(10, 3.6 * len(settings)), squeeze=False, layout="constrained")
    for i, setting in enumerate(settings):
        g = summary[summary.setting == setting]
        for j, (col, title) in enumerate((("nc_over_ht", "n_c / h_T"), ("nc_over_kstar", "n_c / k*(eps)"))):
            grid = g.pivot_table(index="input_dim", columns="h_t", values=col, aggfunc="mean")
            ax = axes[i][j]
            im = ax.imshow(np.log2(grid.to_numpy(dtype=float)), cmap="RdBu_r", vmin=-2, vmax=2, origin="lower", aspect="auto")
            for (r, c), v in np.ndenumerate(grid.to_numpy(dtype=float)):
                ax.text(c, r, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(grid.shape[1]), grid.columns)
            ax.set_yticks(range(grid.shape[0]), grid.index)
            ax.set_xlabel("teacher width h_T")
            ax.set_ylabel("input dim d")
            ax.set_title(f"{title} ({setting} L2)", fontsize=10)
            fig.colorbar(im, ax=ax, label="log2 ratio")
    return fig


def capacity_comparison(mean_curves: pd.DataFrame, capacity_curve: pd.DataFrame, summary: pd.DataFrame, teachers: list[int],
                        setting: str = "fixed"):
    """For each teacher: the pruned wide student's test loss against kept nodes (mean over trials),
    over the capacity curve MSE*(k) of networks trained from scratch (best and mean over seeds)."""
    fig, axes = plt.subplots(1, len(teachers), figsize=(4.6 * len(teachers), 3.8), squeeze=False, layout="constrained")
    for ax, t in zip(axes[0], teachers):
        r = summary[(summary.teacher == t) & (summary.setting == setting)].iloc[0]
        c = mean_curves[(mean_curves.teacher == t) & (mean_curves.setting == setting)]
        ax.plot(c.kept, c.test_loss, color="tab:red", label="pruned wide student")
        for method in ("spectral", "direct"):
            cc = capacity_curve[(capacity_curve.teacher == t) & (capacity_curve.method == method)].sort_values("width")
            if len(cc):
                ax.plot(cc.width, cc["best"], "o-", ms=4, color=COLORS[method], label=f"{method} from scratch (best)")
                ax.plot(cc.width, cc["mean"], "o:", ms=3, color=COLORS[method], alpha=0.6, label=f"{method} from scratch (mean)")
        ax.axhline(r.eps, color="gray", lw=1, ls="--", label="eps (full student)")
        for x, ls, name in ((r.h_t, "-", "h_T"), (r.n_c, "--", "n_c"), (r.k_star, ":", "k*")):
            if np.isfinite(x):
                ax.axvline(x, color="k", lw=1, ls=ls, label=f"{name} = {x:.3g}")
        ax.set_yscale("log")
        ax.set_xlim(0, 1.6 * r.h_t)
        ax.set_xlabel("kept nodes / width k")
        ax.set_ylabel("test MSE")
        ax.set_title(f"h_T={r.h_t}, d={r.input_dim}, seed {r.teacher_seed} ({setting} L2)", fontsize=9)
        ax.legend(fontsize=6)
    return fig


def collapse(mean_curves: pd.DataFrame, summary: pd.DataFrame, setting: str = "fixed"):
    """Delta / max delta against kept / scale - 1 for every teacher, the scale being h_T, n_c and k*."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True, layout="constrained")
    g = summary[summary.setting == setting]
    cmap = plt.get_cmap("viridis")
    hs = sorted(g.h_t.unique())
    for ax, (scale, name) in zip(axes, (("h_t", "h_T"), ("n_c", "n_c"), ("k_star", "k*"))):
        for _, r in g.iterrows():
            if not np.isfinite(r[scale]) or r[scale] < 1:
                continue
            c = mean_curves[(mean_curves.teacher == r.teacher) & (mean_curves.setting == setting)]
            d = np.clip(c.delta.to_numpy(), 0, None)
            ax.plot(c.kept / r[scale] - 1, scaled_to_max(d), color=cmap(hs.index(r.h_t) / max(len(hs) - 1, 1)), lw=0.8, alpha=0.7)
        ax.set_xlim(-1, 1)
        ax.set_xlabel(f"kept / {name} - 1")
        ax.set_title(f"rescaled by {name}", fontsize=10)
    axes[0].set_ylabel("delta MSE / max")
    handles = [plt.Line2D([], [], color=cmap(i / max(len(hs) - 1, 1))) for i in range(len(hs))]
    axes[-1].legend(handles, [f"h_T={h}" for h in hs], fontsize=7)
    fig.suptitle(f"Collapse of the pruning curves of every teacher ({setting} L2)", fontsize=10)
    return fig


def predictors(summary: pd.DataFrame):
    """n_c against h_T, k* and n_detect (nodes whose removal alone costs more than the tolerance), per setting."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
    for setting, marker in (("fixed", "o"), ("path", "s")):
        g = summary[summary.setting == setting]
        for ax, col in zip(axes, ("h_t", "k_star", "n_detect")):
            ax.scatter(g[col], g.n_c, marker=marker, c=np.log2(g.input_dim), cmap="plasma", s=22, alpha=0.8, label=f"{setting} L2")
    for ax, name in zip(axes, ("h_T", "k*(eps)", "n_detect")):
        top = max(float(summary.n_c.max()), 1.0)
        ax.plot([1, top], [1, top], "k--", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("n_c")
    axes[0].legend(fontsize=7, title="colour: log2 d", title_fontsize=7)
    return fig


def write_figures(folder: OwnedFolder) -> list[Path]:
    """Draw every figure of a finished recovery folder (open for writing) into its figures/; returns the files."""
    summary = pd.read_parquet(folder.entry("summary.parquet"))
    curves = pd.read_parquet(folder.entry("mean_curves.parquet"))
    cap = pd.read_parquet(folder.entry("capacity_curve.parquet"))
    fixed = summary[summary.setting == "fixed"]
    picks = []
    for h in (20, int(fixed.h_t.max())):  # the paper's teacher width and the widest, at the d closest to 10
        g = fixed[fixed.h_t == h] if (fixed.h_t == h).any() else fixed
        g = g.iloc[(g.input_dim - 10).abs().argsort()]
        picks.append(int(g.teacher.iloc[0]))
    figures = {"heatmaps": heatmaps(summary), "capacity_comparison": capacity_comparison(curves, cap, summary, sorted(set(picks))),
               "predictors": predictors(summary)}
    for setting in sorted(summary.setting.unique()):
        figures[f"collapse_{setting}"] = collapse(curves, summary, setting)
    paths = []
    for name, fig in figures.items():
        paths.append(save(fig, folder, f"figures/{name}.png"))
    return paths
