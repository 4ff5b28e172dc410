"""One prepared GPU session (see docs/benchmarks.md): equivalence with the CPU path, throughput, paper grid.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py --out $OUT

1. a small grid on CPU and on CUDA (float64): every student's losses and effective dimension agree;
2. batched throughput on the GPU (students x steps / s) for widths 60, 500, 1500 and 30 students;
3. configs/paper.yaml's whole grid (540 trainings), timed (skip with --no-paper).
Writes gpu_check.json under --out and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]


def equivalence(tmp: Path) -> dict:
    from eigenprune.config import parse_config
    from eigenprune.experiment import run_experiment

    body = {"name": "gpu-eq", "trials": 2, "dtype": "float64", "data": {"n_train": 1000, "n_test": 500},
            "student": {"widths": [20, 60]}, "spectral": {"epochs": 20}, "direct": {"epochs": 20}, "save_students": False}
    frames = {}
    for device in ("cpu", "cuda"):
        run_experiment(parse_config({**body, "device": device, "workers": 1}), tmp / device, quiet=True)
        frames[device] = pd.read_parquet(tmp / device / "results.parquet").sort_values(["method", "width", "trial"])
    a, b = frames["cpu"].reset_index(drop=True), frames["cuda"].reset_index(drop=True)
    rel = ((a.test_loss - b.test_loss).abs() / a.test_loss).max()
    return {"max_rel_test_loss_diff": float(rel), "effective_dim_equal": bool((a.effective_dim == b.effective_dim).all())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--no-paper", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device_name": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        result["equivalence"] = equivalence(Path(tmp))
    print("equivalence:", result["equivalence"], flush=True)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--device", "cuda", "--widths", "60", "500", "1500",
           "--trials", "30", "--steps", "1000", "--no-per-model", "--out", str(out / "bench_train_gpu.json")]
    if not args.no_paper:
        cmd.append("--paper-grid")
    subprocess.run(cmd, check=True)
    result["bench_train"] = json.loads((out / "bench_train_gpu.json").read_text())
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
