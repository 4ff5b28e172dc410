"""Training throughput: batched ensemble vs an ordinary per-model PyTorch loop.

Both train the paper's student (10 -> N spectral -> 10 dense -> sum) with Adam on mini-batches of
100 from the same data, same dtype, same number of steps; the per-model loop is `train_alone`
(the oracle the batched path is tested against). Prints a table and writes JSON.

    python benchmarks/bench_train.py                      # CPU, widths 20/60/200, 10 and 30 students
    python benchmarks/bench_train.py --device cuda --widths 60 500 1500 --trials 30
    python benchmarks/bench_train.py --paper-grid --device cuda   # + wall time of configs/paper.yaml's training
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
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


def bench(width: int, trials: int, steps: int, device: torch.device, per_model: bool) -> dict:
    cfg = load_config(None, {"trials": trials, "data": {"n_train": 100 * steps, "n_test": 10}, "save_students": False})
    data = make_data(cfg).to(device)
    students = [make_student(10, student_plans(cfg, "spectral", width), student_seed(cfg, t, width)).to(device) for t in range(trials)]
    spec = TrainSpec(lr=0.005, batch_size=100, epochs=1)
    index = torch.arange(trials, device=device)
    warm = Ensemble(copy.deepcopy(students[:2])).to(device)
    train_ensemble(warm, data.x_train[:2, :1000], data.y_train[:2, :1000], index[:2], spec, [0, 1])
    ens = Ensemble(copy.deepcopy(students)).to(device)
    _sync(device)
    t0 = time.perf_counter()
    train_ensemble(ens, data.x_train, data.y_train, index, spec, list(range(trials)))
    _sync(device)
    batched = time.perf_counter() - t0
    row = {"width": width, "students": trials, "steps": steps, "batched_s": batched,
           "batched_student_steps_per_s": trials * steps / batched}
    if per_model:
        t0 = time.perf_counter()
        for t, student in enumerate(students):
            train_alone(student, data.x_train[t], data.y_train[t], spec, t)
        _sync(device)
        alone = time.perf_counter() - t0
        row.update({"per_model_s": alone, "per_model_student_steps_per_s": trials * steps / alone, "speedup": alone / batched})
    return row


def paper_grid(device: torch.device) -> dict:
    """Wall time of the training (and analysis) of configs/paper.yaml, in this process."""
    from eigenprune.experiment import plan_chunks, run_chunk
    from eigenprune.progress import Progress

    cfg = load_config(ROOT / "configs" / "paper.yaml", {"device": str(device), "save_students": False})
    data = make_data(cfg).to(device)
    t0 = time.perf_counter()
    per_chunk = []
    for chunk in plan_chunks(cfg):
        c0 = time.perf_counter()
        tables, _, _ = run_chunk(cfg, chunk, data, device, Progress(quiet=True))
        _sync(device)
        per_chunk.append({"chunk": chunk.id, "seconds": time.perf_counter() - c0,
                          "train_seconds": float(tables["results"].chunk_train_seconds.iloc[0])})
    return {"paper_grid_wall_s": time.perf_counter() - t0, "chunks": per_chunk,
            "train_seconds_total": sum(c["train_seconds"] for c in per_chunk)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--widths", type=int, nargs="+", default=[20, 60, 200])
    ap.add_argument("--trials", type=int, nargs="+", default=[10, 30])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--no-per-model", action="store_true", help="skip the (slow) per-model loop")
    ap.add_argument("--paper-grid", action="store_true", help="also time configs/paper.yaml (GPU-sized)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--out", default="benchmarks/results/bench_train.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [bench(w, t, args.steps, device, not args.no_per_model) for w in args.widths for t in args.trials]
    head = f"{'width':>6} {'students':>8} {'batched st*steps/s':>19} {'per-model st*steps/s':>21} {'speedup':>8}"
    print(head)
    for r in rows:
        print(f"{r['width']:>6} {r['students']:>8} {r['batched_student_steps_per_s']:>19.0f} "
              f"{r.get('per_model_student_steps_per_s', float('nan')):>21.0f} {r.get('speedup', float('nan')):>8.1f}")
    result = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if args.paper_grid:
        result["paper_grid"] = paper_grid(device)
        print(f"paper grid: {result['paper_grid']['paper_grid_wall_s']:.1f} s wall "
              f"({result['paper_grid']['train_seconds_total']:.1f} s training)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
