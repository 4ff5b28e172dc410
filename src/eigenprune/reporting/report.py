"""Figures and a self-contained HTML report, rebuilt from a run folder's stored tables."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import pandas as pd

from eigenprune.experiments.config import Config
from eigenprune.experiments.regpath import path_table, select_strengths
from eigenprune.experiments.store import GROUP_KEYS, STUDENT_KEYS, RunFolder, RunFolderError
from eigenprune.reporting import plots
from eigenprune.reporting.tables import (
    claims,
    finished_run,
    fits,
    layer_table,
    path_comparisons,
    path_selection_table,
    run_collapse,
    teacher_slices,
    teacher_width,
)

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


def make_figures(folder: RunFolder, cfg: Config, tables: dict[str, pd.DataFrame], suffix: str = "") -> list[tuple[bytes, str]]:
    """Write one teacher's figures as PNG under figures/; returns (PNG bytes, caption) pairs (the report embeds the bytes
    it wrote, never reading figures/ back: it may have been removed, or replaced by a link, meanwhile)."""
    res, h_t = tables["results"], teacher_width(cfg)
    figs = {  # what draws each figure; `plots.render` draws them, two at a time where it can
        "importance_histograms": lambda: plots.importance_histograms(tables["importance"], res),
        "effective_dimension": lambda: plots.effective_dimension(res, h_t, cfg.analysis.threshold),
        "losses": lambda: plots.losses(res),
        "pruning_curves": lambda: plots.pruning_curves(tables["curves"], res, h_t),
    }
    t_widths = list(cfg.data.teacher.widths) if h_t else []
    if tables["layer_curves"].layer.nunique() > 1 and (cfg.student.deep or not h_t):
        figs["layer_curves"] = lambda: plots.layer_curves(tables["layer_curves"], res, t_widths)
    if "test_accuracy" in tables["layer_curves"]:
        figs["accuracy_curves"] = lambda: plots.layer_curves(tables["layer_curves"], res, t_widths, "test_accuracy")
    if h_t:
        items, measure = run_collapse(tables["curves"], res, h_t)
        if len(items) >= 2:
            figs["collapse"] = lambda: plots.collapse(items, measure)
    comparisons = path_comparisons(folder, cfg, res)
    if comparisons:
        figs["paths"] = lambda: plots.paths(comparisons)
    pngs = plots.render(list(figs.values()))
    for name, data in zip(figs, pngs):
        folder.write(f"figures/{name + suffix}.png", data)
    return [(data, FIGURES[name]) for name, data in zip(figs, pngs)]


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0, classes="t")


def _img(data: bytes, caption: str) -> str:
    return (f"<figure><img src='data:image/png;base64,{base64.b64encode(data).decode()}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def build_report(run: str | Path | RunFolder, quiet: bool = True) -> Path:
    """(Re)build figures/ and report.html of a run folder from its stored results (no training).

    `run` is a run folder's path, or a `RunFolder` already open for writing (as inside `run_experiment`).
    The stored tables, config and summary are read and checked before anything is written; a missing or
    damaged one, or a folder eigenprune did not make, is a one-line `RunFolderError` and leaves the folder
    as it was. (Student checkpoints, read for the path figure, are read as each figure is drawn: a damaged
    one stops the report after the figures before it, each of which was written whole.)
    """
    if isinstance(run, RunFolder):
        return _build_report(run)
    folder = finished_run(run)
    tables = folder.load()  # read and check before taking the folder
    folder.open()
    try:
        return _build_report(folder, tables)
    finally:
        folder.release()


def _build_report(folder: RunFolder, tables: dict[str, pd.DataFrame] | None = None) -> Path:
    """Write the figures and report.html of an open run folder. (Longer than 60 lines: the page is assembled in
    reading order, one section after another, and reads best as one piece of HTML.)"""
    tables = tables or folder.load()
    run_dir = folder.path
    cfg = folder.read_config()
    manifest = folder.read_json("manifest.json") if folder.entry("manifest.json").exists() else {}
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
        data = plots.png(fig)
        folder.write("figures/regularization_path.png", data)
        figure = _img(data, REGPATH_CAPTION)
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
L2 {cfg.regularization.mode}{' × ' + str(cfg.regularization.strengths()) if cfg.regularization.mode == 'path' else ''};
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
