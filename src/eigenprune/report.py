"""Figures and a self-contained HTML report, rebuilt from a run folder's stored tables."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from eigenprune import plots
from eigenprune.config import Config
from eigenprune.store import KEYS, RunFolder, RunFolderError, write_text_atomic

FIGURES = {
    "importance_histograms": "Normalised node importance: spectral L (a spike at 0 plus a few large nodes) vs direct M.",
    "effective_dimension": "Effective dimension against student width, teacher width dashed.",
    "losses": "Train (dotted) and test (solid) MSE against student width.",
    "pruning_curves": "Test ΔMSE when keeping the n most important nodes, against n − h_T.",
}


def make_figures(run_dir: Path, cfg: Config, tables: dict[str, pd.DataFrame]) -> dict[str, Path]:
    """Write every figure of the run as PNG under figures/; returns name -> path."""
    res, h_t = tables["results"], cfg.data.teacher.widths[0]
    figs = {
        "importance_histograms": plots.importance_histograms(tables["importance"], res),
        "effective_dimension": plots.effective_dimension(res, h_t, cfg.analysis.threshold),
        "losses": plots.losses(res),
        "pruning_curves": plots.pruning_curves(tables["curves"], res, h_t),
    }
    out = run_dir / "figures"
    out.mkdir(exist_ok=True)
    paths = {}
    for name, fig in figs.items():
        paths[name] = out / f"{name}.png"
        tmp = out / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(paths[name])
    return paths


def claims(cfg: Config, summary: dict) -> list[tuple[str, str]]:
    """(claim, what this run measured) pairs for the paper's central claims."""
    groups = pd.DataFrame(summary["groups"])
    if "trials_ok" not in groups:
        return []
    groups = groups[groups.trials_ok > 0]
    h_t = cfg.data.teacher.widths[0]
    rows = []

    def per_width(method: str, col: str, fmt: str = "{:.1f}") -> str:
        g = groups[groups.method == method]
        return ", ".join(f"N={int(r.width)}: {fmt.format(r[col + '_mean'])} ± {fmt.format(r[col + '_std'])}" for _, r in g.iterrows())

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
    return rows


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0, classes="t")


def build_report(run_dir: str | Path, quiet: bool = True) -> Path:
    """(Re)build figures/ and report.html of a run folder from its stored results (no training).

    Every stored file is read and checked before anything is written; a missing or damaged one is a
    one-line `RunFolderError` and leaves the folder as it was.
    """
    folder = RunFolder(run_dir)
    tables = folder.load()
    run_dir = folder.path
    cfg = folder.read_config()
    manifest = folder.read_json("manifest.json") if (run_dir / "manifest.json").exists() else {}
    summary = folder.read_json("summary.json")
    if not isinstance(summary.get("groups"), list):
        raise RunFolderError(f"{run_dir / 'summary.json'} has no list of groups; rerun `eigenprune run` to rebuild it")
    missing = [c for c in (*KEYS, "status", "fail_reason", "failed_step") if c not in tables["results"].columns]
    if missing:
        raise RunFolderError(f"{run_dir / 'results.parquet'} lacks columns {missing}; it was not written by this eigenprune")
    failed = tables["results"][tables["results"].status != "ok"]
    paths = make_figures(run_dir, cfg, tables)
    imgs = "".join(
        f"<figure><img src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'>"
        f"<figcaption>{html.escape(FIGURES[name])}</figcaption></figure>"
        for name, p in paths.items()
    )
    claim_rows = "".join(f"<tr><td>{html.escape(c)}</td><td>{html.escape(m)}</td></tr>" for c, m in claims(cfg, summary))
    machine = ", ".join(f"{k}: {manifest.get(k)}" for k in ("device", "device_name", "cpu_count", "torch", "platform") if k in manifest)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>eigenprune run {html.escape(cfg.name)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table.t,table.c{{border-collapse:collapse;font-size:13px}} td,th{{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left}}
figure{{margin:1.5em 0}} img{{max-width:100%}} pre{{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}}</style></head><body>
<h1>eigenprune run “{html.escape(cfg.name)}”</h1>
<p>Teacher {html.escape(cfg.data.teacher.kind)} {cfg.data.input_dim}→{'→'.join(map(str, cfg.data.teacher.widths))}→1;
students N ∈ {list(cfg.student.widths)}; {cfg.trials} trials; wall time {manifest.get('wall_seconds', '?')} s.</p>
<p>Machine: {html.escape(machine)}</p>
<h2>Claims and what this run measured</h2>
<table class="c"><tr><th>claim</th><th>measured (mean ± std over trials)</th></tr>{claim_rows}</table>
<h2>Figures</h2>{imgs}
<h2>Summary per method and width</h2>{_table(pd.DataFrame(summary['groups']))}
<h2>Failed students ({len(failed)})</h2>
<p>A student whose loss became NaN or infinite was frozen at that step; it is left out of every figure and mean above.</p>
{_table(failed[[*KEYS, "lr", "failed_step", "fail_reason"]]) if len(failed) else "<p>none</p>"}
<h2>Config</h2><pre>{html.escape(cfg.to_yaml())}</pre>
<h2>Manifest</h2><pre>{html.escape(json.dumps(manifest, indent=2))}</pre>
</body></html>"""
    write_text_atomic(run_dir / "report.html", page)
    return run_dir / "report.html"
