"""The tables derived from a run folder's stored results: mean pruning curves and their fits, the
collapse of one run's curves, teacher comparisons, per-layer and per-teacher views, the paper's claims."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from eigenprune.core.structure import linear_layers
from eigenprune.experiments.analysis import collapse_measure, fit_exponential, teacher_comparison
from eigenprune.experiments.builders import make_teacher
from eigenprune.experiments.config import Config
from eigenprune.experiments.regpath import RULES
from eigenprune.experiments.store import MARKER, STUDENT_KEYS, OwnedFolder, RunFolder, RunFolderError
from eigenprune.pruning.checkpoint import load_model


def finished_run(path: str | Path) -> RunFolder:
    """The run folder at `path`, refused in one line (`RunFolderError`) before its tables are read where it is
    missing, not a run folder eigenprune made (an empty folder, a compare folder) or still being written by a run."""
    folder = RunFolder(path)
    if not folder.path.is_dir():
        raise RunFolderError(f"run folder not found: {folder.path}")
    marker = folder.marker()
    if marker is None:
        raise RunFolderError(f"{folder.path} is not a run folder made by eigenprune (it has no {MARKER}): no results of "
                             "`eigenprune run` there")
    if marker.get("kind") != "run":
        raise RunFolderError(f"{folder.path} was made by `eigenprune {marker.get('kind')}`, not `eigenprune run`: it has no run results")
    if folder.in_use():
        raise RunFolderError(f"{folder.path} is in use by a running eigenprune (it holds the folder's .lock); wait for the run "
                             "to finish (it writes its report itself)")
    return folder


def mean_curves(curves: pd.DataFrame, results: pd.DataFrame, method: str) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(width, kept, mean delta over ok trials) for every width of `method`."""
    ok = results[(results.status == "ok") & (results.method == method)][["method", "width", "trial"]]
    cur = curves.merge(ok, on=["method", "width", "trial"])
    out = []
    for w, g in cur.groupby("width"):
        m = g.groupby("kept").delta_loss.mean()
        out.append((int(w), m.index.to_numpy(), m.to_numpy()))
    return out


def fits(curves: pd.DataFrame, results: pd.DataFrame, h_t: int) -> pd.DataFrame:
    """The exponential fit a*exp(-b*x)+c of the mean curve below the mean critical point, x = kept - h_T."""
    rows = []
    for method in sorted(results.method.unique()):
        for w, kept, delta in mean_curves(curves, results, method):
            sel = results[(results.method == method) & (results.width == w) & (results.status == "ok")]
            n_c = float(sel.critical_point.mean())
            below = kept < n_c
            rows.append({"method": method, "width": w, "n_c_mean": n_c, "n_c_std": float(sel.critical_point.std(ddof=0)),
                         "points": int(below.sum()), **fit_exponential(kept[below] - h_t, delta[below])})
    return pd.DataFrame(rows)


def run_collapse(curves: pd.DataFrame, results: pd.DataFrame, h_t: int) -> tuple[list, dict]:
    """Spectral mean curves of widths > h_T and their collapse measure (see `collapse_measure`)."""
    items = [(f"spectral N={w}", h_t, k, d) for w, k, d in mean_curves(curves, results, "spectral") if w > h_t]
    if len(items) < 2:
        return items, {"spread_before": np.nan, "spread_after": np.nan, "ratio": np.nan}
    return items, collapse_measure([(h, k, d) for _, h, k, d in items])


def path_comparisons(folder: OwnedFolder, cfg: Config, results: pd.DataFrame) -> dict[str, dict]:
    """Teacher comparison of trial 0's largest student of each method, from its checkpoint in the run `folder`."""
    t = cfg.data.teacher
    if cfg.data.source != "teacher" or t.kind != "mlp" or len(t.widths) < 2 or "checkpoint" not in results:
        return {}
    teacher = make_teacher(cfg.data.input_dim, list(t.widths), t.seed)
    out = {}
    ok = results[(results.status == "ok") & (results.checkpoint != "")]
    for method, g in ok.groupby("method"):
        row = g.sort_values(["width", "trial"], ascending=[False, True]).iloc[0]
        path = folder.entry(row.checkpoint)
        if path.is_file():
            student, _ = load_model(path)
            if len(linear_layers(student)) >= 3:
                out[f"{method} N={row.width}"] = teacher_comparison(student, teacher, min(t.widths[0], int(row.width)))
    return out


def teacher_width(cfg: Config) -> int | None:
    """h_T, the teacher's first hidden width, or None for real data and the linear teacher (no hidden layer)."""
    return cfg.data.teacher.widths[0] if cfg.data.source == "teacher" and cfg.data.teacher.kind != "linear" else None


def layer_table(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per (method, width, layer): recovered widths (effective dimension, critical point, joint search) vs the teacher's."""
    ok = tables["results"][tables["results"].status == "ok"]
    lay = tables["layers"].merge(ok[STUDENT_KEYS], on=STUDENT_KEYS)
    cols = [c for c in ("effective_dim", "critical_point", "search_width", "width_within_accuracy_tol") if c in lay]
    agg = lay.groupby(["method", "width", "layer"]).agg(
        layer_width=("layer_width", "first"), teacher_layer_width=("teacher_layer_width", "first"),
        **{f"{c}_mean": (c, "mean") for c in cols}, **{f"{c}_std": (c, lambda v: v.std(ddof=0)) for c in cols})
    agg = agg.reset_index()
    agg["layer"] += 1
    loss = ok.groupby(["method", "width"]).agg(test_loss=("test_loss", "mean"), search_test_loss=("search_test_loss", "mean"),
                                               **({"test_accuracy": ("test_accuracy", "mean"),
                                                   "search_test_accuracy": ("search_test_accuracy", "mean")}
                                                  if "test_accuracy" in ok else {}))
    return agg.merge(loss.reset_index(), on=["method", "width"])


def teacher_slices(cfg: Config, tables: dict[str, pd.DataFrame]) -> list[tuple[Config, dict[str, pd.DataFrame], str]]:
    """Per teacher: its config, the tables restricted to it (on a regularization path: to the selected
    strength of every method and width), and a file-name suffix (empty for a one-teacher run)."""
    res = tables["results"]
    multi = len(cfg.teacher_list()) > 1
    out = []
    for ti in sorted(res.teacher_index.unique()):
        r = res[res.teacher_index == ti]
        if cfg.regularization.mode == "path":
            r = r[r[f"selected_{cfg.regularization.rule}"]]
        keys = r[STUDENT_KEYS]
        sliced = {"results": r, **{n: tables[n].merge(keys, on=STUDENT_KEYS) for n in ("curves", "importance", "layers")}}
        sliced["layer_curves"], sliced["curves"] = sliced["curves"], sliced["curves"][sliced["curves"].layer == 0]
        tcfg = cfg.for_teacher(int(ti))
        out.append((tcfg, sliced, f"_t{ti}_hT{tcfg.data.teacher.widths[0]}" if multi else ""))
    return out


def claims(cfg: Config, groups: pd.DataFrame, collapse: dict | None = None) -> list[tuple[str, str]]:
    """(claim, what this run measured) pairs for the paper's claims, from summary groups of one teacher."""
    if "trials_ok" not in groups:
        return []
    groups = groups[groups.trials_ok > 0]
    h_t = cfg.data.teacher.widths[0]
    rows = []

    def per_width(method: str, col: str, fmt: str = "{:.1f}") -> str:
        g = groups[groups.method == method]
        return ", ".join(f"N={int(r.width)}: {fmt.format(r[col + '_mean'])} ± {fmt.format(r[col + '_std'])}"
                         if pd.notna(r[col + "_mean"]) else f"N={int(r.width)}: –" for _, r in g.iterrows())

    if "spectral" in set(groups.method):
        rows.append((f"Spectral effective dimension stays near h_T = {h_t} for every N", per_width("spectral", "effective_dim")))
    if "direct" in set(groups.method):
        rows.append(("Direct effective dimension grows with N", per_width("direct", "effective_dim")))
    rows.append(("Spectral and direct students fit comparably (test MSE)",
                 "; ".join(f"{m}: " + per_width(m, "test_loss", "{:.4f}") for m in groups.method.unique())))
    for k in cfg.analysis.probe_kept:
        col = f"delta_loss_at_{k}"
        if col + "_mean" in groups:
            rows.append((f"Keeping the top {k} nodes costs ~nothing for spectral, much more for direct (ΔMSE at kept = {k})",
                         "; ".join(f"{m}: " + per_width(m, col, "{:.4f}") for m in groups.method.unique())))
    rows.append((f"Pruning has a sharp transition at n_c ≈ h_T = {h_t} for spectral students (critical point per trial)",
                 "; ".join(f"{m}: " + per_width(m, "critical_point") for m in groups.method.unique())))
    if collapse is not None and not np.isnan(collapse["ratio"]):
        rows.append(("Spectral pruning curves of different N fall on one curve (spread = mean coefficient of variation "
                     "across N of ΔMSE and of ΔMSE / max; 0 = identical; across teachers: `eigenprune collapse`)",
                     f"before {collapse['spread_before']:.3f}, after {collapse['spread_after']:.3f} (ratio {collapse['ratio']:.2f})"))
    for col, what in (("path_distance", "path products"), ("in_strength_distance", "in-strengths")):
        if groups[f"{col}_mean"].notna().any():
            rows.append((f"The pruned spectral student's {what} resemble the teacher's more than the direct one's (Wasserstein-1)",
                         "; ".join(f"{m}: " + per_width(m, col, "{:.4f}") for m in groups.method.unique())))
    return rows


def path_selection_table(cfg: Config, results: pd.DataFrame) -> pd.DataFrame:
    """Per (teacher, method, width): the strengths chosen by both rules and what the student looks like there."""
    rows = []
    ok = results[results.status == "ok"]
    for (ti, method, width), g in ok.groupby(["teacher_index", "method", "width"]):
        row = {"h_T": cfg.for_teacher(int(ti)).data.teacher.widths[0], "method": method, "width": width}
        for rule in RULES:
            sel = g[g[f"selected_{rule}"]]
            row[f"{rule}_strength"] = sel.strength.iloc[0] if len(sel) else np.nan
            for col in ("effective_dim", "critical_point", "test_loss"):
                row[f"{rule}_{col}"] = f"{sel[col].mean():.3g} ± {sel[col].std(ddof=0):.2g}" if len(sel) else ""
        rows.append(row)
    return pd.DataFrame(rows)
