"""Collapse of spectral pruning curves across runs (`eigenprune collapse`)."""

from __future__ import annotations

from pathlib import Path

from eigenprune.experiments.analysis import collapse_measure
from eigenprune.experiments.store import OwnedFolder, RunFolderError
from eigenprune.reporting import plots
from eigenprune.reporting.tables import finished_run, mean_curves, teacher_slices, teacher_width


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
        source = finished_run(run)
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
            plots.save(plots.collapse(curves, m, scale), folder, f"{name}.png")
        folder.write_json("collapse.json", result)
    finally:
        folder.release()
    return result
