"""Per-layer k* of deep students: narrow deep networks trained from scratch on a grid of shapes.

    python scripts/deep_capacity.py CONFIG.yaml --k1 5,10,20 --k2 3,5,10 --out DIR

CONFIG is a run config with `student.deep: true` and one hidden layer after the first (e.g.
cpu-deep). The script trains (1) the config's wide spectral students (its first width),
measuring each layer's critical point n_c and the full test MSE eps, and (2) from scratch, networks
d -> k1 -> k2 -> sum for every (k1, k2) of the grid, with both layers spectral and with both direct
(each with the config's L2 on both layers and the same trials' data; both methods train for the
spectral students' epochs, with their own learning rate and batch size). It writes
students.parquet, shapes.parquet and summary.json (k*_1 and k*_2 at eps and 1.1 eps) into DIR (new or
empty) and prints them. Exits 2 on a bad config or folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from eigenprune.core.plans import LayerPlan
from eigenprune.experiments.builders import paper_student
from eigenprune.experiments.capacity import capacity_curve, k_star_per_layer
from eigenprune.experiments.config import ConfigError, load_config
from eigenprune.experiments.data import make_data
from eigenprune.experiments.experiment_seeds import student_seed
from eigenprune.experiments.grid import Chunk
from eigenprune.experiments.group import measure_group
from eigenprune.experiments.measure import chunk_group, run_chunk
from eigenprune.experiments.progress import Progress
from eigenprune.experiments.recovery import prepare_out
from eigenprune.experiments.store import RunFolderError, json_safe, parquet_writer


def _widths(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"--{name} must be comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"--{name} must be comma-separated positive integers, got {text!r}")
    return values


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--k1", required=True)
    ap.add_argument("--k2", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    try:
        cfg = load_config(args.config)
        if not cfg.student.deep or len(cfg.student.rest) != 1 or cfg.data.source != "teacher":
            raise ConfigError(f"{args.config}: needs teacher data, student.deep: true and one student.rest width, "
                              f"got deep={cfg.student.deep}, rest={cfg.student.rest}, source={cfg.data.source}")
        k1s, k2s = _widths(args.k1, "k1"), _widths(args.k2, "k2")
        out = prepare_out(args.out)
    except (ConfigError, RunFolderError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cfg = cfg.model_copy(update={"methods": ["spectral"], "save_students": False})
    device = torch.device("cpu")
    data = make_data(cfg)
    width = cfg.student.widths[0]
    chunk = Chunk("spectral", (width,), tuple(range(cfg.trials)))
    with Progress(quiet=True) as progress:
        tables = run_chunk(cfg, chunk, data, device, progress).tables
    lay = tables["layers"]
    res = tables["results"]
    print(f"wide students trained ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    wide = chunk_group(cfg, chunk, data, torch.device("cpu"))  # the training spec and shuffle seeds of the run
    rows = []
    for method in ("spectral", "direct"):
        m = cfg.method(method)
        keys = [(k1, k2, t) for k1 in k1s for k2 in k2s for t in range(cfg.trials)]
        plans = [paper_student(LayerPlan(k1, method, m.l2_phi, m.l2_lam), [k2], deep=True) for k1, k2, _ in keys]
        spec = replace(wide.spec, lr=m.lr, batch_size=m.batch_size)  # both methods get the spectral students' steps
        group = replace(wide, plans=plans, seeds=[student_seed(cfg.seed, t, k1 * 1000 + k2) for k1, k2, t in keys],
                        trials=[t for _, _, t in keys], spec=spec)
        result = measure_group(group, data, data.x_train.shape[1], device)
        loss = np.where(result.failures.mask(), np.nan, result.metrics["test_loss"].double().numpy())
        rows += [{"method": method, "k1": k1, "k2": k2, "trial": t, "test_loss": v} for (k1, k2, t), v in zip(keys, loss)]
        print(f"{method} shapes trained ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    runs = pd.DataFrame(rows)
    shapes = capacity_curve(runs.rename(columns={"k2": "width"}), ["k1"]).rename(columns={"width": "k2"})
    eps = float(res.test_loss.mean())
    summary = {"eps": eps, "wide_width": [width, *cfg.student.rest], "teacher_widths": list(cfg.data.teacher.widths),
               "n_c": {f"layer{int(k) + 1}": float(g.critical_point.mean()) for k, g in lay.groupby("layer")},
               "n_c_std": {f"layer{int(k) + 1}": float(g.critical_point.std()) for k, g in lay.groupby("layer")},
               "effective_dim": {f"layer{int(k) + 1}": float(g.effective_dim.mean()) for k, g in lay.groupby("layer")},
               "k_star": {}, "wall_seconds": round(time.perf_counter() - start, 1), "threads": args.threads,
               "failed": int(runs.test_loss.isna().sum())}
    for method in ("any", "spectral", "direct"):
        g = shapes[shapes.method == method]
        for f in (1.0, 1.1):
            summary["k_star"][f"{method} x{f:g}"] = k_star_per_layer(g, ["k1", "k2"], f * eps)
    out.write("students_from_scratch.parquet", parquet_writer(runs))
    out.write("shapes.parquet", parquet_writer(shapes))
    out.write("wide_layers.parquet", parquet_writer(lay))
    out.write_json("summary.json", summary)
    with pd.option_context("display.width", 200):
        print(shapes[shapes.method == "any"].pivot_table(index="k1", columns="k2", values="best").round(4).to_string())
    print(json.dumps(json_safe(summary), indent=1, allow_nan=False))
    if summary["failed"] or not np.isfinite(eps):
        print(f"error: {summary['failed']} networks diverged (or eps is not finite: {eps})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
