"""Training throughput: batched ensemble vs an ordinary per-model PyTorch loop.

Both train the paper's student (10 -> N spectral -> 10 dense -> sum) with Adam on mini-batches of
100 from the same data, same dtype, same number of steps; the per-model loop is `train_alone`
(the oracle the batched path is tested against). Prints a table and writes JSON.

    python benchmarks/bench_train.py                      # CPU, widths 20/60/200, 10 and 30 students
    python benchmarks/bench_train.py --device cuda --widths 60 500 1500 --trials 30 --graphs   # + CUDA graphs
    python benchmarks/bench_train.py --paper-grid --device cuda --graphs   # + wall time of configs/paper.yaml's grid

"ms/step" is the steady state: the median epoch after the first two (a CUDA graph is captured in
epoch 1), divided by the steps per epoch.
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
from eigenprune.experiment import make_data, student_plans, student_seed
from eigenprune.nets import make_student
from eigenprune.train import TrainSpec, train_alone, train_ensemble

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_batched(ens: Ensemble, data, index: torch.Tensor, spec: TrainSpec, trials: int, device: torch.device) -> tuple[float, float]:
    """(total seconds, median seconds of one epoch after the first two: the steady state a CUDA graph reaches)."""
    stamps: list[float] = []
    _sync(device)
    t0 = time.perf_counter()
    train_ensemble(ens, data.x_train, data.y_train, index, spec, list(range(trials)), lambda e, loss: stamps.append(time.perf_counter()))
    _sync(device)
    total = time.perf_counter() - t0
    laps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    return total, statistics.median(laps) if laps else total / spec.epochs


def bench(width: int, trials: int, steps: int, epochs: int, device: torch.device, per_model: bool, graphs: bool) -> dict:
    per_epoch = max(1, steps // epochs)
    cfg = load_config(None, {"trials": trials, "data": {"n_train": 100 * per_epoch, "n_test": 10}, "save_students": False})
    data = make_data(cfg).to(device)
    students = [make_student(10, student_plans(cfg, "spectral", width), student_seed(cfg, t, width)).to(device) for t in range(trials)]
    spec = TrainSpec(lr=0.005, batch_size=100, epochs=epochs)
    steps = per_epoch * epochs
    index = torch.arange(trials, device=device)
    warm = Ensemble(copy.deepcopy(students[:2])).to(device)
    train_ensemble(warm, data.x_train[:2], data.y_train[:2], index[:2], TrainSpec(0.005, 100, 1), [0, 1])
    total, epoch_s = _time_batched(Ensemble(copy.deepcopy(students)).to(device), data, index, spec, trials, device)
    row = {"width": width, "students": trials, "steps": steps, "batched_s": total,
           "batched_student_steps_per_s": trials * steps / total, "batched_step_ms": 1e3 * epoch_s / per_epoch}
    if graphs:
        spec = TrainSpec(lr=0.005, batch_size=100, epochs=epochs, cuda_graph=True)
        total, epoch_s = _time_batched(Ensemble(copy.deepcopy(students)).to(device), data, index, spec, trials, device)
        row.update({"graph_s": total, "graph_student_steps_per_s": trials * steps / total,
                    "graph_step_ms": 1e3 * epoch_s / per_epoch})
    if per_model:
        t0 = time.perf_counter()
        for t, student in enumerate(students):
            train_alone(student, data.x_train[t], data.y_train[t], spec, t)
        _sync(device)
        alone = time.perf_counter() - t0
        row.update({"per_model_s": alone, "per_model_student_steps_per_s": trials * steps / alone, "speedup": alone / total})
    return row


def paper_grid(device: torch.device, graphs: bool, budget_s: float, config: Path) -> dict:
    """Training wall time of every chunk of `config` (configs/paper.yaml; no analysis), in this process;
    chunks that would start after `budget_s` seconds are listed as not run."""
    from eigenprune.experiment import plan_chunks, prepare_chunk

    cfg = load_config(config, {"device": str(device), "save_students": False, "cuda_graphs": graphs})
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
        print(f"  {chunk.id}: {per_chunk[-1]['seconds']:.1f} s", flush=True)
    return {"cuda_graphs": graphs, "training_s": sum(c["seconds"] for c in per_chunk), "chunks": per_chunk, "not_run": skipped}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--widths", type=int, nargs="+", default=[20, 60, 200])
    ap.add_argument("--trials", type=int, nargs="+", default=[10, 30])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=10, help="the steps are split into this many epochs")
    ap.add_argument("--graphs", action="store_true", help="also time the batched path with CUDA graphs (CUDA only)")
    ap.add_argument("--no-per-model", action="store_true", help="skip the (slow) per-model loop")
    ap.add_argument("--paper-grid", action="store_true", help="also time configs/paper.yaml's training (GPU-sized)")
    ap.add_argument("--grid-config", default=str(ROOT / "configs" / "paper.yaml"), help="the grid --paper-grid times")
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="paper grid: start no chunk after this many seconds")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--out", default="benchmarks/results/bench_train.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.graphs and device.type != "cuda":
        ap.error(f"--graphs needs a CUDA device, got --device {args.device}")
    rows = [bench(w, t, args.steps, args.epochs, device, not args.no_per_model, args.graphs) for w in args.widths for t in args.trials]
    nan = float("nan")
    print(f"{'width':>6} {'students':>8} {'batched st*steps/s':>19} {'ms/step':>8} {'graph st*steps/s':>17} {'ms/step':>8} "
          f"{'per-model st*steps/s':>21} {'speedup':>8}")
    for r in rows:
        print(f"{r['width']:>6} {r['students']:>8} {r['batched_student_steps_per_s']:>19.0f} {r['batched_step_ms']:>8.3f} "
              f"{r.get('graph_student_steps_per_s', nan):>17.0f} {r.get('graph_step_ms', nan):>8.3f} "
              f"{r.get('per_model_student_steps_per_s', nan):>21.0f} {r.get('speedup', nan):>8.1f}")
    result = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if args.paper_grid:
        grid = result["paper_grid"] = paper_grid(device, args.graphs, args.budget_s, Path(args.grid_config))
        skipped = f"; not run: {', '.join(grid['not_run'])}" if grid["not_run"] else ""
        print(f"paper grid: {grid['training_s']:.1f} s of training{skipped}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
