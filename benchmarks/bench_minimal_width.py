"""Minimal-width search on the paper's teacher (10 -> 20 -> 10 -> 1, h_T = 20): where does forgetting stop?

    python benchmarks/bench_minimal_width.py [--width 200] [--trials 3] [--epochs 500] [--threads 1] [--out FILE.json]

Trains spectral and direct students of width N (CPU-sized: P = 4000, batch 100, lr 0.005, the
paper's L2 terms; both methods get the same schedule), then for every student:
  * one-shot `prune_nodes(keep="auto")`: the smallest width whose test loss stays within
    rtol of the full model's, with no retraining;
  * `minimal_width`: prune in steps, fine-tune briefly (Adam lr 1e-3, 2 epochs) after each step,
    stop when the fine-tuned test loss exceeds the full model's by more than rtol.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from eigenprune.batched.ensemble import Ensemble
from eigenprune.batched.train import train_ensemble
from eigenprune.core.losses import task_loss
from eigenprune.core.plans import LayerPlan, make_student
from eigenprune.core.seeds import derive_seed
from eigenprune.core.structure import layer_sizes
from eigenprune.core.training import TrainSpec
from eigenprune.experiments.data import teacher_data
from eigenprune.pruning.prune import prune_nodes
from eigenprune.pruning.search import minimal_width


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=200)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=500)
    parser.add_argument("--rtol", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/minimal_width.json"))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = teacher_data("mlp", 10, [20, 10], 1234, derive_seed("data", 0, 0), args.trials, 4000, 2000)
    spec = TrainSpec(lr=0.005, batch_size=100, epochs=args.epochs)
    finetune = TrainSpec(lr=1e-3, batch_size=100, epochs=2)
    rows = []
    for method, plan in (("spectral", LayerPlan(args.width, "spectral")), ("direct", LayerPlan(args.width, "direct", 0.01, 0.0))):
        students = [make_student(10, [plan, LayerPlan(10, "direct", 0.0, 0.0), LayerPlan(1, "fixed", 0.0, 0.0)],
                                 derive_seed("student", 0, t, args.width)) for t in range(args.trials)]
        ens = Ensemble(students)
        start = time.perf_counter()
        train_ensemble(ens, data.x_train, data.y_train, torch.arange(args.trials), spec,
                       [derive_seed("shuffle", 0, t) for t in range(args.trials)])
        train_seconds = time.perf_counter() - start
        for t in range(args.trials):
            student = ens.student(t)
            x_tr, y_tr, x_te, y_te = data.x_train[t], data.y_train[t], data.x_test[t], data.y_test[t]
            one_shot = prune_nodes(student, "auto", layers=[0], x_val=x_te, y_val=y_te, rtol=args.rtol)
            start = time.perf_counter()
            result = minimal_width(student, x_tr, y_tr, x_te, y_te, rtol=args.rtol, finetune=finetune, seed=t)
            with torch.no_grad():
                one_shot_loss = float(task_loss(one_shot(x_te), y_te, "regression"))
                final_loss = float(task_loss(result.model(x_te), y_te, "regression"))
            rows.append({
                "method": method, "trial": t, "width": args.width, "full_test_loss": result.full_loss,
                "one_shot_auto_width": layer_sizes(one_shot)[1], "one_shot_auto_loss": one_shot_loss,
                "search_width": result.width, "search_loss": final_loss, "search_steps": len(result.curve),
                "search_seconds": time.perf_counter() - start, "train_seconds": train_seconds,
                "curve": result.curve.to_dict(orient="list"),
            })
            r = rows[-1]
            print(f"{method:>8} t{t}: full test MSE {r['full_test_loss']:.4f} | one-shot auto width {r['one_shot_auto_width']:>3} "
                  f"(MSE {one_shot_loss:.4f}) | search width {r['search_width']:>3} (MSE {final_loss:.4f}, "
                  f"{r['search_steps']} steps, {r['search_seconds']:.1f} s) | training {train_seconds:.0f} s")
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "rtol": args.rtol, "epochs": args.epochs, "steps": args.epochs * 40,
              "finetune": {"lr": finetune.lr, "batch_size": finetune.batch_size, "epochs": finetune.epochs}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
