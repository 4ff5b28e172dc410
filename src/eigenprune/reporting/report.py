"""Figures and a self-contained HTML report, rebuilt from a run folder's stored tables."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from eigenprune.core.structure import linear_layers
from eigenprune.experiments.analysis import collapse_measure, fit_exponential, teacher_comparison
from eigenprune.experiments.builders import make_teacher
from eigenprune.experiments.config import Config
from eigenprune.experiments.regpath import RULES, path_table, select_strengths
from eigenprune.experiments.store import GROUP_KEYS, STUDENT_KEYS, OwnedFolder, RunFolder, RunFolderError
from eigenprune.pruning.checkpoint import load_model
from eigenprune.reporting import plots

FIGURES = {
    "importance_histograms": "Normalised node importance: spectral L (a spike at 0 plus a few large nodes) vs direct M.",
    "effective_dimension": "Effective dimension against student width, teacher width dashed.",
    "losses": "Train (dotted) and test (solid) MSE against student width.",
    "pruning_curves": "Test ΔMSE when keeping the n most important nodes, against n − h_T; dotted: mean critical point n_c.",
    "collapse": "Spectral pruning curves of every N before and after the paper's rescaling (one teacher: only ΔMSE is rescaled).",
    "paths": "Trial 0, largest N, pruned to h_T nodes: sorted path products and first-layer in-strengths vs the teacher's.",
    "layer_curves": "Every hidden layer pruned alone: test ΔMSE / Δloss against the nodes kept in that layer (teacher's width dashed).",
    "accuracy_curves": "Test accuracy against the nodes kept in each hidden layer (top nodes by importance).",
}


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


def path_comparisons(run_dir: Path, cfg: Config, results: pd.DataFrame) -> dict[str, dict]:
    """Teacher comparison of trial 0's largest student of each method, from its checkpoint."""
    t = cfg.data.teacher
    if cfg.data.source != "teacher" or t.kind != "mlp" or len(t.widths) < 2 or "checkpoint" not in results:
        return {}
    teacher = make_teacher(cfg.data.input_dim, list(t.widths), t.seed)
    out = {}
    ok = results[(results.status == "ok") & (results.checkpoint != "")]
    for method, g in ok.groupby("method"):
        row = g.sort_values(["width", "trial"], ascending=[False, True]).iloc[0]
        path = run_dir / row.checkpoint
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


def _save(fig, folder: OwnedFolder, stem: str) -> Path:
    """Write a figure as figures/<stem>.png of `folder` (atomically, recorded as eigenprune's) and close it."""
    try:
        return folder.write(f"figures/{stem}.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def make_figures(folder: RunFolder, cfg: Config, tables: dict[str, pd.DataFrame], suffix: str = "") -> list[tuple[Path, str]]:
    """Write one teacher's figures as PNG under figures/; returns (path, caption) pairs."""
    res, h_t = tables["results"], teacher_width(cfg)
    figs = {
        "importance_histograms": plots.importance_histograms(tables["importance"], res),
        "effective_dimension": plots.effective_dimension(res, h_t, cfg.analysis.threshold),
        "losses": plots.losses(res),
        "pruning_curves": plots.pruning_curves(tables["curves"], res, h_t),
    }
    t_widths = list(cfg.data.teacher.widths) if h_t else []
    if tables["layer_curves"].layer.nunique() > 1 and (cfg.student.deep or not h_t):
        figs["layer_curves"] = plots.layer_curves(tables["layer_curves"], res, t_widths)
    if "test_accuracy" in tables["layer_curves"]:
        figs["accuracy_curves"] = plots.layer_curves(tables["layer_curves"], res, t_widths, "test_accuracy")
    if h_t:
        items, measure = run_collapse(tables["curves"], res, h_t)
        if len(items) >= 2:
            figs["collapse"] = plots.collapse(items, measure)
    comparisons = path_comparisons(folder.path, cfg, res)
    if comparisons:
        figs["paths"] = plots.paths(comparisons)
    return [(_save(fig, folder, name + suffix), FIGURES[name]) for name, fig in figs.items()]


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


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0, classes="t")


def _img(path: Path, caption: str) -> str:
    return (f"<figure><img src='data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def build_report(run: str | Path | RunFolder, quiet: bool = True) -> Path:
    """(Re)build figures/ and report.html of a run folder from its stored results (no training).

    `run` is a run folder's path, or a `RunFolder` already open for writing (as inside `run_experiment`).
    Every stored file is read and checked before anything is written; a missing or damaged one, or a
    folder eigenprune did not make, is a one-line `RunFolderError` and leaves the folder as it was.
    """
    if isinstance(run, RunFolder):
        return _build_report(run)
    folder = RunFolder(run)
    if not folder.path.is_dir():
        raise RunFolderError(f"run folder not found: {folder.path}")
    if folder.marker() is None:
        raise RunFolderError(f"{folder.path} is not a run folder made by eigenprune (no results of `eigenprune run` there)")
    folder.check_ours()
    tables = folder.load()  # read and check before taking the folder
    folder.open()
    try:
        return _build_report(folder, tables)
    finally:
        folder.release()


def _build_report(folder: RunFolder, tables: dict[str, pd.DataFrame] | None = None) -> Path:
    tables = tables or folder.load()
    run_dir = folder.path
    cfg = folder.read_config()
    manifest = folder.read_json("manifest.json") if (run_dir / "manifest.json").exists() else {}
    summary = folder.read_json("summary.json")
    if not isinstance(summary.get("groups"), list):
        raise RunFolderError(f"{run_dir / 'summary.json'} has no list of groups; rerun `eigenprune run` to rebuild it")
    missing = [c for c in (*STUDENT_KEYS, "status", "fail_reason", "failed_step") if c not in tables["results"].columns]
    if missing:
        raise RunFolderError(f"{run_dir / 'results.parquet'} lacks columns {missing}; it was not written by this eigenprune")
    failed = tables["results"][tables["results"].status != "ok"]
    groups = pd.DataFrame(summary["groups"])
    if cfg.regularization.mode == "path":  # the rules are cheap and deterministic: apply the current ones
        tables["results"] = select_strengths(tables["results"])
    sections = []
    if cfg.regularization.mode == "path":
        fig = plots.regularization_path(tables["results"], path_table(tables["results"]), cfg)
        figure = _img(_save(fig, folder, "regularization_path"), REGPATH_CAPTION)
        sections.append("<h2>Regularization path</h2>" + figure + _table(path_selection_table(cfg, tables["results"])))
    for tcfg, sliced, suffix in teacher_slices(cfg, tables):
        h_t = teacher_width(tcfg)
        figures = make_figures(folder, tcfg, sliced, suffix)
        layers = f"""<h3>Per hidden layer: recovered width vs the teacher's</h3>
<p>search_width: joint minimal architecture (every hidden layer pruned by importance, in order, keeping the training loss
within {1 + cfg.analysis.search_rel_tol:g} × the full model's); search_test_*: the jointly pruned student on the test set.</p>
{_table(layer_table(sliced))}"""
        if h_t is None:
            sections.append(f"<h2>Data: {html.escape(cfg.data.source)}</h2>{layers}<h3>Figures</h3>"
                            + "".join(_img(p, c) for p, c in figures))
            continue
        _, measure = run_collapse(sliced["curves"], sliced["results"], h_t)
        mine = groups.merge(sliced["results"][GROUP_KEYS].drop_duplicates(), on=GROUP_KEYS)
        claim_rows = "".join(f"<tr><td>{html.escape(c)}</td><td>{html.escape(m)}</td></tr>" for c, m in claims(tcfg, mine, measure))
        chosen = f" at the {cfg.regularization.rule}-selected strength" if cfg.regularization.mode == "path" else ""
        arch = "→".join(map(str, [tcfg.data.input_dim, *tcfg.data.teacher.widths, 1]))
        sections.append(f"""<h2>Teacher {html.escape(tcfg.data.teacher.kind)} {arch}{chosen}</h2>
<h3>Claims and what this run measured</h3>
<table class="c"><tr><th>claim</th><th>measured (mean ± std over trials)</th></tr>{claim_rows}</table>
<h3>Figures</h3>{''.join(_img(p, c) for p, c in figures)}
<h3>Critical point and exponential fit below it</h3>
<p>n_c per trial: the smallest kept count from which ΔMSE stays below {cfg.analysis.critical_rel_tol:g} × the full model's test MSE.
Fit: ΔMSE ≈ a·exp(−b·x) + c on the trial-mean curve for kept &lt; mean n_c, x = kept − h_T.</p>
{_table(fits(sliced["curves"], sliced["results"], h_t))}{layers}""")
    machine = ", ".join(f"{k}: {manifest.get(k)}" for k in ("device", "device_name", "cpu_count", "torch", "platform") if k in manifest)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>eigenprune run {html.escape(cfg.name)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table.t,table.c{{border-collapse:collapse;font-size:13px}} td,th{{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left}}
figure{{margin:1.5em 0}} img{{max-width:100%}} pre{{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}}</style></head><body>
<h1>eigenprune run “{html.escape(cfg.name)}”</h1>
<p>Students N ∈ {list(cfg.student.widths)}; methods {', '.join(cfg.methods)}; {cfg.trials} trials; {len(cfg.teacher_list())} teacher(s);
L2 {cfg.regularization.mode}{' × ' + str(cfg.strengths()) if cfg.regularization.mode == 'path' else ''};
wall time {manifest.get('wall_seconds', '?')} s.</p>
<p>Machine: {html.escape(machine)}</p>
{''.join(sections)}
<h2>Summary per teacher, method, width and strength</h2>{_table(groups)}
<h2>Failed students ({len(failed)})</h2>
<p>A student whose loss became NaN or infinite was frozen at that step; it is left out of every figure and mean above.</p>
{_table(failed[[*STUDENT_KEYS, "lr", "failed_step", "fail_reason"]]) if len(failed) else "<p>none</p>"}
<h2>Config</h2><pre>{html.escape(cfg.to_yaml())}</pre>
<h2>Manifest</h2><pre>{html.escape(json.dumps(manifest, indent=2))}</pre>
</body></html>"""
    return folder.write("report.html", page)


REGPATH_CAPTION = ("Left: effective dimension against the L2 multiplier (teacher width dashed). Right: validation loss "
                   "(mean ± standard error over trials); circles: best, stars: 1-SE rule, squares: stability rule.")


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


def collapse_runs(run_dirs: list[str | Path], out: str | Path) -> dict:
    """Collapse of spectral pruning curves across runs and teachers (e.g. h_T = 20 and 100).

    Two rescalings: the paper's, by the teacher's width h_T (kept / h_T - 1), and by each curve's
    measured critical point n_c (mean over trials): with a fixed L2 strength the transition sits at
    n_c, which need not be h_T. Writes `collapse.png`, `collapse_nc.png` and `collapse.json` under `out`.
    """
    folder = OwnedFolder(out, "collapse")
    folder.check_ours()  # before any work: refuse an output folder that is not ours
    resolved = [Path(run).resolve() for run in run_dirs]
    for i, path in enumerate(resolved):
        if path in resolved[:i]:
            raise RunFolderError(f"collapse got the run folder {path} twice (as {run_dirs[resolved.index(path)]} and "
                                 f"{run_dirs[i]}); give each run once")
    items, by_nc = [], []
    for run in run_dirs:
        source = RunFolder(run)
        tables = source.load()
        for tcfg, sliced, _ in teacher_slices(source.read_config(), tables):
            h_t = teacher_width(tcfg)
            if h_t is None:
                raise RunFolderError(f"{source.path} has no teacher with a hidden layer (data {tcfg.data.source}, "
                                     f"teacher {tcfg.data.teacher.kind}): its curves have no h_T to rescale by")
            res = sliced["results"]
            for w, k, d in mean_curves(sliced["curves"], res, "spectral"):
                if w > h_t:
                    n_c = float(res[(res.method == "spectral") & (res.width == w) & (res.status == "ok")].critical_point.mean())
                    items.append((f"h_T={h_t} N={w}", h_t, k, d))
                    by_nc.append((f"h_T={h_t} N={w} (n_c={n_c:.0f})", max(round(n_c), 1), k, d))
    if len(items) < 2:
        raise RunFolderError("collapse needs at least two spectral curves with N > h_T across the given runs")
    widths = sorted({h for _, h, _, _ in items})
    if len(widths) < 2:
        raise RunFolderError(f"collapse needs runs with at least two different teacher widths h_T, got only h_T={widths[0]}: "
                             "rescaling by one h_T leaves the spread unchanged (a ratio of 1 by construction)")
    measure = collapse_measure([(h, k, d) for _, h, k, d in items])
    measure_nc = collapse_measure([(h, k, d) for _, h, k, d in by_nc])
    result = {"runs": [str(r) for r in run_dirs], "curves": [label for label, *_ in by_nc], **measure,
              "by_critical_point": measure_nc}
    folder.open(create=True)
    try:
        for name, curves, m, scale in (("collapse", items, measure, "h_T"), ("collapse_nc", by_nc, measure_nc, "n_c")):
            fig = plots.collapse(curves, m, scale)
            try:
                folder.write(f"{name}.png", lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=110))
            finally:
                plt.close(fig)
        folder.write("collapse.json", json.dumps(result, indent=2) + "\n")
    finally:
        folder.release()
    return result
