"""Check the memory planner: estimated vs measured peak memory of one chunk, on the CPU (Linux).

Each case runs in a fresh process: import torch, reset the resident-set high-water mark
(/proc/self/clear_refs), build the data and train + measure one chunk (1 epoch: the peak is
reached in the first epoch and in the evaluation that follows), then read VmHWM.
Prints a table and writes benchmarks/memory_estimate.json.

    PYTHONPATH=src python benchmarks/memory_estimate.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CASES = [
    {"name": "quick N=200", "trials": 3, "student": {"widths": [200]}, "data": {"n_train": 8000, "n_test": 4000}},
    {"name": "10 trials N=60,100", "trials": 10, "student": {"widths": [60, 100]}, "data": {"n_train": 4000, "n_test": 2000}},
    {"name": "paper chunk N=1000", "trials": 30, "student": {"widths": [1000]}, "data": {"n_train": 10000, "n_test": 10000}},
    {"name": "float64 N=500", "trials": 10, "dtype": "float64", "student": {"widths": [500]}, "data": {"n_train": 4000, "n_test": 4000}},
]

CHILD = """
import json, sys, torch
from eigenprune.experiments.config import parse_config
from eigenprune.experiments.data import make_data
from eigenprune.experiments.grid import plan_chunks
from eigenprune.experiments.measure import train_chunk
from eigenprune.experiments.plan import chunk_memory
from eigenprune.experiments.progress import Progress

def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

torch.set_num_threads(1)
cfg = parse_config(json.loads(sys.argv[1]))
chunk = plan_chunks(cfg)[0]
base = rss("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
train_chunk(cfg, chunk, make_data(cfg), torch.device("cpu"), Progress(quiet=True))
print(json.dumps({"chunk": chunk.id, "estimate": chunk_memory(cfg, chunk), "peak": rss("VmHWM:"), "baseline": base}))
"""


def main() -> None:
    rows = []
    for case in CASES:
        body = {k: v for k, v in case.items() if k != "name"}
        body |= {"methods": ["spectral"], "spectral": {"epochs": 1, "batch_size": 100}, "save_students": False}
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(body)], capture_output=True, text=True, check=True)
        row = {"case": case["name"], **json.loads(out.stdout)}
        row["ratio"] = row["estimate"] / row["peak"]
        rows.append(row)
        print(f"{row['case']:<22} {row['chunk']:<18} estimate {row['estimate'] / 1e9:6.3f} GB  "
              f"measured peak {row['peak'] / 1e9:6.3f} GB (process at start {row['baseline'] / 1e9:5.3f} GB)  "
              f"estimate/peak {row['ratio']:.2f}", flush=True)
    Path(__file__).with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
