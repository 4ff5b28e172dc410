"""Training throughput: batched ensemble (each backprop variant) vs an ordinary per-model PyTorch loop.

All variants train the paper's student (10 -> N spectral -> 10 dense -> sum) with Adam on mini-batches
of 100 from the same data, same dtype, same number of steps. Variants:

  per-model      `train_alone` over the students one after another (autograd; the tests' oracle)
  manual         `train_ensemble`: the stacked students, hand-written batched backprop (the default)
  fused          the same with the first layer in the Triton kernels of `eigenprune.fused` (CUDA)
  +graph         either of the two with the epoch captured in a CUDA graph and replayed (CUDA)

    python benchmarks/bench_train.py                      # CPU: manual vs per-model, widths 20/60/200, 10 and 30 students
    python benchmarks/bench_train.py --device cuda --widths 60 500 1500 --trials 30 --variants manual manual+graph fused fused+graph
    python benchmarks/bench_train.py --device cuda --paper-grid fused+graph   # + training time of configs/paper.yaml's grid

"ms/step" is the steady state: the median epoch after the first two (a CUDA graph is captured in
epoch 1), divided by the steps per epoch. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from eigenprune.config import load_config
from eigenprune.ensemble import Ensemble
from eigenprune.experiment import make_data, plan_chunks, prepare_chunk, student_plans, student_seed
from eigenprune.nets import make_student
from eigenprune.train import TrainSpec, train_alone, train_ensemble

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("per-model", "manual", "manual+graph", "fused", "fused+graph")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _spec(variant: str, epochs: int) -> TrainSpec:
    return TrainSpec(lr=0.005, batch_size=100, epochs=epochs, backprop=variant.split("+")[0], cuda_graph=variant.endswith("+graph"))


def bench(width: int, trials: int, steps: int, epochs: int, device: torch.device, variants: list[str]) -> list[dict]:
    per_epoch = max(1, steps // epochs)
    steps = per_epoch * epochs
    cfg = load_config(None, {"trials": trials, "data": {"n_train": 100 * per_epoch, "n_test": 10}, "save_students": False})
    data = make_data(cfg).to(device)
    students = [make_student(10, student_plans(cfg, "spectral", width), student_seed(cfg, t, width)).to(device) for t in range(trials)]
    index = torch.arange(trials, device=device)
    rows = []
    for variant in variants:
        if variant == "per-model":
            train_alone(copy.deepcopy(students[0]), data.x_train[0], data.y_train[0], _spec("manual", 1), 0)  # first-call costs
            models = copy.deepcopy(students)
            _sync(device)
            t0 = time.perf_counter()
            for t, student in enumerate(models):
                train_alone(student, data.x_train[t], data.y_train[t], _spec("manual", epochs), t)
            _sync(device)
            total = time.perf_counter() - t0
            step_s = total / steps  # advancing every student by one step, one after another
        else:
            spec = _spec(variant, epochs)
            warm = Ensemble(copy.deepcopy(students[:2])).to(device)  # first-call costs (allocator, kernel compilation)
            train_ensemble(warm, data.x_train[:2], data.y_train[:2], index[:2], TrainSpec(0.005, 100, 1, backprop=spec.backprop), [0, 1])
            stamps: list[float] = []
            ens = Ensemble(copy.deepcopy(students)).to(device)
            _sync(device)
            t0 = time.perf_counter()
            train_ensemble(ens, data.x_train, data.y_train, index, spec, list(range(trials)),
                           lambda e, loss, laps=stamps: laps.append(time.perf_counter()))
            _sync(device)
            total = time.perf_counter() - t0
            laps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
            step_s = (statistics.median(laps) if laps else total / epochs) / per_epoch
        rows.append({"width": width, "students": trials, "steps": steps, "variant": variant, "seconds": total,
                     "student_steps_per_s": trials * steps / total, "step_ms": 1e3 * step_s})
    base = next((r["seconds"] for r in rows if r["variant"] == "per-model"), None)
    for r in rows:
        r["speedup_vs_per_model"] = base / r["seconds"] if base else None
    return rows


def paper_grid(device: torch.device, variant: str, budget_s: float, config: Path) -> dict:
    """Training wall time of every chunk of `config` (configs/paper.yaml; no analysis), in this process;
    chunks that would start after `budget_s` seconds are listed as not run."""
    cfg = load_config(config, {"device": str(device), "save_students": False, "backprop": variant.split("+")[0],
                               "cuda_graphs": variant.endswith("+graph")})
    data = make_data(cfg).to(device)
    t0 = time.perf_counter()
    per_chunk, skipped = [], []
    for chunk in plan_chunks(cfg):
        if time.perf_counter() - t0 > budget_s:
            skipped.append(chunk.id)
            continue
        prep = prepare_chunk(cfg, chunk, data, device)
        _sync(device)
        c0 = time.perf_counter()
        train_ensemble(prep.ens, data.x_train[:, :prep.n_fit], data.y_train[:, :prep.n_fit], prep.trial_index, prep.spec, prep.shuffle)
        _sync(device)
        per_chunk.append({"chunk": chunk.id, "students": len(chunk.keys()), "seconds": time.perf_counter() - c0})
        print(f"  {variant} {chunk.id}: {per_chunk[-1]['seconds']:.1f} s", flush=True)
    return {"variant": variant, "training_s": sum(c["seconds"] for c in per_chunk), "chunks": per_chunk, "not_run": skipped}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--widths", type=int, nargs="+", default=[20, 60, 200])
    ap.add_argument("--trials", type=int, nargs="+", default=[10, 30])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=10, help="the steps are split into this many epochs")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=["per-model", "manual"])
    ap.add_argument("--paper-grid", choices=VARIANTS[1:], help="also time configs/paper.yaml's training with this variant")
    ap.add_argument("--grid-config", default=str(ROOT / "configs" / "paper.yaml"), help="the grid --paper-grid times")
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="paper grid: start no chunk after this many seconds")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--out", default="benchmarks/results/bench_train.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for v in [*args.variants, args.paper_grid or ""]:
        if (v.startswith("fused") or v.endswith("+graph")) and device.type != "cuda":
            ap.error(f"variant {v} needs a CUDA device, got --device {args.device}")
    rows = [r for w in args.widths for t in args.trials for r in bench(w, t, args.steps, args.epochs, device, args.variants)]
    print(f"{'width':>6} {'students':>8} {'variant':<13} {'students*steps/s':>17} {'ms/step':>8} {'vs per-model':>12}")
    for r in rows:
        speedup = f"{r['speedup_vs_per_model']:.1f}x" if r["speedup_vs_per_model"] else "-"
        print(f"{r['width']:>6} {r['students']:>8} {r['variant']:<13} {r['student_steps_per_s']:>17.0f} {r['step_ms']:>8.3f} {speedup:>12}")
    result = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if args.paper_grid:
        grid = result["paper_grid"] = paper_grid(device, args.paper_grid, args.budget_s, Path(args.grid_config))
        skipped = f"; not run: {', '.join(grid['not_run'])}" if grid["not_run"] else ""
        print(f"paper grid ({args.paper_grid}): {grid['training_s']:.1f} s of training{skipped}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
