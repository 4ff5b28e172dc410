"""One function per figure. Each takes the run's tables and returns a matplotlib Figure."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from eigenprune.experiments.analysis import scaled_to_max  # noqa: E402
from eigenprune.experiments.backends import child_signals, exit_with_parent, signals_held  # noqa: E402

COLORS = {"spectral": "tab:red", "direct": "tab:blue"}


def _ok(results: pd.DataFrame) -> pd.DataFrame:
    return results[results.status == "ok"]


def _nothing_to_show():
    """A placeholder figure for a run in which no student trained (all diverged)."""
    fig, ax = plt.subplots(figsize=(5.5, 2), layout="constrained")
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
    fig, axes = plt.subplots(len(methods), len(widths), figsize=(3.2 * len(widths), 2.6 * len(methods)), squeeze=False,
                             layout="constrained")
    for i, method in enumerate(methods):
        for j, w in enumerate(widths):
            ax = axes[i][j]
            vals = imp[(imp.method == method) & (imp.width == w)].normalized
            counts, _, _ = ax.hist(vals, bins=np.linspace(0, 1, 41), color=COLORS[method], alpha=0.8)
            if counts.any():  # no student of this width trained: an empty panel, not a log scale of nothing
                ax.set_yscale("log")
            ax.set_title(f"{method}, N={w}", fontsize=9)
            ax.set_xlabel("L / max L" if method == "spectral" else "M / max M", fontsize=8)
    fig.suptitle("Node importance (pooled over trials)")
    return fig


def effective_dimension(results: pd.DataFrame, teacher_width: int | None, threshold: float):
    """Effective dimension (mean +- std over trials) against student width N, teacher width marked."""
    fig, ax = plt.subplots(figsize=(5.5, 4), layout="constrained")
    ok = _ok(results)
    for method, g in ok.groupby("method"):
        s = g.groupby("width").effective_dim.agg(["mean", "std"]).fillna(0)
        ax.errorbar(s.index, s["mean"], yerr=s["std"], marker="o", capsize=3, label=method, color=COLORS.get(method))
    if teacher_width:
        ax.axhline(teacher_width, ls="--", color="k", lw=1, label=f"teacher width {teacher_width}")
    ax.set_xscale("log")
    ax.set_xlabel("student width N")
    ax.set_ylabel(f"effective dimension (importance > {threshold:g} max)")
    ax.legend()
    return fig


def losses(results: pd.DataFrame):
    """Train and test loss against student width, both methods."""
    fig, ax = plt.subplots(figsize=(5.5, 4), layout="constrained")
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
    return fig


def pruning_curves(curves: pd.DataFrame, results: pd.DataFrame, teacher_width: int | None):
    """Mean delta loss vs kept - h_T (vs kept without a teacher), one line per width, one panel per method;
    dotted: the mean critical point."""
    ok = _ok(results)[["method", "width", "trial"]]
    cur = curves.merge(ok, on=["method", "width", "trial"])
    methods = [m for m in ("spectral", "direct") if m in set(cur.method)]
    if not methods:
        return _nothing_to_show()
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 4), squeeze=False, sharey=True, layout="constrained")
    cmap = plt.get_cmap("viridis")
    widths = sorted(cur.width.unique())
    for ax, method in zip(axes[0], methods):
        for j, w in enumerate(widths):
            g = cur[(cur.method == method) & (cur.width == w)].groupby("kept").delta_loss.mean()
            g.index = g.index - (teacher_width or 0)
            color = cmap(j / max(len(widths) - 1, 1))
            ax.plot(g.index, g.values, color=color, label=f"N={w}")
            if "critical_point" in results:
                n_c = results[(results.method == method) & (results.width == w) & (results.status == "ok")].critical_point.mean()
                ax.axvline(n_c - (teacher_width or 0), color=color, ls=":", lw=1)
        if teacher_width:
            ax.axvline(0, ls="--", color="k", lw=1)
            ax.set_xlim(-teacher_width, 3 * teacher_width)
        else:
            ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_title(method)
        ax.set_xlabel(r"kept nodes $n_\lambda - h_T$" if teacher_width else r"kept nodes $n_\lambda$")
        ax.set_ylabel(r"$\Delta$MSE (test)")
        ax.legend(fontsize=8)
    return fig


def collapse(curves: list[tuple[str, int, np.ndarray, np.ndarray]], measure: dict[str, float], scale: str = "h_T"):
    """Rescaled pruning curves: delta / max(delta) against kept / h - 1, one line per (label, h); h is the
    teacher's width (`scale` "h_T") or another per-curve size such as the critical point ("n_c")."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    cmap = plt.get_cmap("plasma")
    for j, (label, h, kept, delta) in enumerate(curves):
        color = cmap(j / max(len(curves) - 1, 1) * 0.85)
        axes[0].plot(kept - h, delta, color=color, label=label)
        axes[1].plot(kept / h - 1, scaled_to_max(delta), color=color, label=label)
    axes[0].set_xlim(-max(h for _, h, _, _ in curves), 2 * max(h for _, h, _, _ in curves))
    axes[0].set_xlabel(rf"$n_\lambda - {scale}$")
    axes[0].set_ylabel(r"$\Delta$MSE")
    axes[0].set_title(f"raw (spread {measure['spread_before']:.3f})")
    axes[1].set_xlim(-1, 2)
    axes[1].set_xlabel(rf"$n_\lambda / {scale} - 1$")
    axes[1].set_ylabel(r"$\Delta$MSE / max $\Delta$MSE")
    axes[1].set_title(f"rescaled (spread {measure['spread_after']:.3f}, ratio {measure['ratio']:.2f})")
    for ax in axes:
        ax.axvline(0, ls="--", color="k", lw=1)
        ax.legend(fontsize=7)
    return fig


def paths(comparisons: dict[str, dict], teacher_label: str = "teacher"):
    """Sorted path products (left) and in-strength histograms (right): students vs the teacher."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    first = next(iter(comparisons.values()))
    tp = first["teacher_paths"]
    axes[0].plot(np.linspace(0, 1, len(tp)), tp, color="k", lw=2, label=teacher_label)
    bins = np.linspace(
        min(float(np.min(c["student_in"])) for c in comparisons.values()) - 0.1,
        max(float(np.max(c["student_in"])) for c in comparisons.values()) + 0.1, 30,
    )
    axes[1].hist(first["teacher_in"], bins=bins, color="k", alpha=0.35, label=teacher_label, density=True)
    for label, c in comparisons.items():
        color = COLORS.get(label.split()[0], None)
        axes[0].plot(np.linspace(0, 1, len(c["student_paths"])), c["student_paths"], color=color,
                     label=f"{label} (W1 {c['path_distance']:.3f})")
        axes[1].hist(c["student_in"], bins=bins, histtype="step", lw=2, color=color, density=True,
                     label=f"{label} (W1 {c['in_strength_distance']:.3f})")
    axes[0].set_xlabel("rank (fraction of paths)")
    axes[0].set_ylabel(r"path product $w^{(1)}_{ji} w^{(2)}_{kj}$")
    axes[0].set_title("sorted path products, pruned to h_T nodes")
    axes[1].set_xlabel("in-strength (sum of incoming weights)")
    axes[1].set_title("in-strength of first-layer nodes")
    for ax in axes:
        ax.legend(fontsize=8)
    return fig


def regularization_path(results: pd.DataFrame, table: pd.DataFrame, cfg):
    """Per teacher (rows): effective dimension and validation loss against the L2 multiplier."""
    teachers = sorted(results.teacher_index.unique())
    fig, axes = plt.subplots(len(teachers), 2, figsize=(11, 3.6 * len(teachers)), squeeze=False, layout="constrained")
    ok = results[results.status == "ok"]
    cmap = plt.get_cmap("viridis")
    for row, ti in enumerate(teachers):
        h_t = cfg.for_teacher(int(ti)).data.teacher.widths[0]
        sub, tab = ok[ok.teacher_index == ti], table[table.teacher_index == ti]
        combos = sorted({(m, w) for m, w in zip(sub.method, sub.width)})
        for j, (method, width) in enumerate(combos):
            color = cmap(j / max(len(combos) - 1, 1) * 0.9)
            ls = "-" if method == "spectral" else "--"
            g = sub[(sub.method == method) & (sub.width == width)].groupby("strength").effective_dim.agg(["mean", "std"])
            axes[row][0].errorbar(g.index, g["mean"], yerr=g["std"].fillna(0), color=color, ls=ls, marker="o", ms=3,
                                  capsize=2, label=f"{method} N={width}")
            t = tab[(tab.method == method) & (tab.width == width)]
            axes[row][1].errorbar(t.strength, t.val_mean, yerr=t.val_se.fillna(0), color=color, ls=ls, marker="o", ms=3, capsize=2)
            for flag, marker in (("selected_best", "o"), ("selected_1se", "*"), ("selected_stable", "s")):
                chosen = sub[(sub.method == method) & (sub.width == width) & sub[flag]]
                if len(chosen):
                    k = chosen.strength.iloc[0]
                    axes[row][1].plot([k], t[t.strength == k].val_mean, marker=marker, ms=13, mfc="none", mec=color, mew=2)
                    axes[row][0].plot([k], [chosen.effective_dim.mean()], marker=marker, ms=13, mfc="none", mec=color, mew=2)
        axes[row][0].axhline(h_t, color="k", ls=":", lw=1)
        axes[row][0].set_ylabel(f"effective dim (h_T = {h_t})")
        axes[row][1].set_ylabel("validation MSE")
        for ax in axes[row]:
            ax.set_xscale("log")
            ax.set_xlabel("L2 multiplier")
        axes[row][1].set_yscale("log")
        axes[row][0].legend(fontsize=7)
    return fig


def layer_curves(curves: pd.DataFrame, results: pd.DataFrame, teacher_widths: list[int], column: str = "delta_loss"):
    """Per hidden layer (columns) and method (rows): mean `column` against kept nodes of that layer alone."""
    ok = results[results.status == "ok"][["method", "width", "trial"]]
    cur = curves.merge(ok, on=["method", "width", "trial"])
    layers = sorted(cur.layer.unique())
    methods = [m for m in ("spectral", "direct") if m in set(cur.method)]
    fig, axes = plt.subplots(len(methods), len(layers), figsize=(5 * len(layers), 3.6 * len(methods)), squeeze=False, layout="constrained")
    cmap = plt.get_cmap("viridis")
    widths = sorted(cur.width.unique())
    for i, method in enumerate(methods):
        for j, layer in enumerate(layers):
            ax = axes[i][j]
            for n, w in enumerate(widths):
                g = cur[(cur.method == method) & (cur.width == w) & (cur.layer == layer)].groupby("kept")[column].mean()
                ax.plot(g.index, g.values, color=cmap(n / max(len(widths) - 1, 1)), label=f"N={w}")
            if layer < len(teacher_widths):
                ax.axvline(teacher_widths[layer], ls="--", color="k", lw=1, label=f"teacher {teacher_widths[layer]}")
            ax.set_xscale("log")
            if column == "delta_loss":
                ax.set_yscale("symlog", linthresh=1e-3)
            ax.set_title(f"{method}, hidden layer {layer + 1}", fontsize=9)
            ax.set_xlabel("kept nodes of this layer")
            ax.set_ylabel(column.replace("_", " "))
            ax.legend(fontsize=7)
    return fig


def png(fig) -> bytes:
    """`fig` as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    return buf.getvalue()


def save(fig, folder, rel: str) -> Path:
    """Write `fig` as the PNG `rel` of an eigenprune folder (`experiments.store.OwnedFolder`: atomic, recorded) and close it."""
    return folder.write(rel, png(fig))


def render(makers: list[Callable[[], object]]) -> list[bytes]:
    """The PNG bytes of the figure each `makers[i]()` draws, in order.

    matplotlib draws on one core; on Linux with two or more, a forked process draws figures meanwhile (it
    has the tables already: nothing is copied in). Each process takes the next figure no one has taken yet
    (a shared counter), so one heavy figure does not hold up the others. An error in either process is raised here.
    """
    if len(makers) < 2 or not sys.platform.startswith("linux") or (os.cpu_count() or 1) < 2:
        return [png(make()) for make in makers]
    ctx = mp.get_context("fork")
    taken = ctx.Value("i", 0)  # the index of the next figure to draw, shared by both processes
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_render_child, args=(makers, taken, send, os.getpid()), daemon=True)
    with signals_held():  # until the child has its own handlers
        child.start()
    send.close()
    drawn: dict[int, bytes] = {}
    try:
        for i in _take(taken, len(makers)):
            drawn[i] = png(makers[i]())
        try:
            status, theirs = recv.recv()
        except EOFError:
            raise RuntimeError(f"the process drawing figures ended without them (exit code {child.exitcode})") from None
    finally:
        recv.close()
        if child.is_alive():
            child.terminate()
        child.join()
    if status != "ok":
        raise RuntimeError(f"drawing a figure failed: {theirs}")
    drawn.update(theirs)
    return [drawn[i] for i in range(len(makers))]


def _take(taken, n: int):
    """The indices below n that this process takes from the shared counter `taken`, one at a time."""
    while True:
        with taken.get_lock():
            i = taken.value
            taken.value = i + 1
        if i >= n:
            return
        yield i


def _render_child(makers: list[Callable[[], object]], taken, conn, parent: int) -> None:
    child_signals()  # Ctrl-C is the parent's to handle; SIGTERM ends this process
    exit_with_parent(parent)
    try:
        conn.send(("ok", {i: png(makers[i]()) for i in _take(taken, len(makers))}))
    except Exception as err:  # noqa: BLE001 - sent to the parent, which raises it
        conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        conn.close()
