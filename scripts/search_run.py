"""Minimal-width search (prune in steps, fine-tune after each) on every student of a finished run.

    python scripts/search_run.py RUN_DIR [--layer 0] [--rtol 0.1] [--epochs 2] [--out FILE.csv]

Rebuilds each trial's data from the run's stored config (seeded, hence identical), loads every
student checkpoint and runs `eigenprune.pruning.search.minimal_width` on it. Classification runs accept a
step while test accuracy stays within `analysis.accuracy_tol` of the unpruned student's; regression
runs while test loss stays within `rtol`. Prints a table per (method, width) and writes a CSV.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from eigenprune.core.training import TrainSpec
from eigenprune.experiments.data import make_data
from eigenprune.experiments.store import RunFolder
from eigenprune.pruning.checkpoint import load_model
from eigenprune.pruning.search import minimal_width


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--rtol", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs after each step")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    folder = RunFolder(args.run_dir)
    cfg = folder.read_config()
    results = folder.load()["results"]
    rows = []
    for ti, group in results[results.status == "ok"].groupby("teacher_index"):
        tcfg = cfg.for_teacher(int(ti))
        data = make_data(tcfg)
        n_fit = tcfg.regularization.n_fit(data.x_train.shape[1])
        for _, r in group.iterrows():
            model, _ = load_model(folder.path / r.checkpoint)
            t = int(r.trial)
            spec = TrainSpec(lr=1e-3, batch_size=cfg.method(r.method).batch_size, epochs=args.epochs, task=data.task)
            res = minimal_width(
                model, data.x_train[t, :n_fit], data.y_train[t, :n_fit], data.x_test[t], data.y_test[t], layer=args.layer,
                rtol=args.rtol, finetune=spec, task=data.task, seed=t,
                accuracy_tol=cfg.analysis.accuracy_tol if data.task == "classification" else None,
            )
            row = {"teacher_index": ti, "method": r.method, "width": r.width, "strength": r.strength, "trial": t,
                   "search_width": res.width, "full_test_loss": res.full_loss, "steps": len(res.curve)}
            with torch.no_grad():
                out = res.model(data.x_test[t])
                if data.task == "classification":
                    row["full_test_accuracy"] = float((model(data.x_test[t]).argmax(-1) == data.y_test[t]).float().mean())
                    row["search_test_accuracy"] = float((out.argmax(-1) == data.y_test[t]).float().mean())
            rows.append(row)
            print(row, flush=True)
    df = pd.DataFrame(rows)
    out = args.out or folder.path / f"search_layer{args.layer}.csv"
    df.to_csv(out, index=False)
    cols = [c for c in ("search_width", "search_test_accuracy", "full_test_accuracy", "full_test_loss") if c in df]
    print(df.groupby(["teacher_index", "method", "width"])[cols].agg(["mean", "std"]).round(4).to_string())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
