"""Inference time of a width-1500 student before and after physical pruning to 25 nodes (CPU).

    python benchmarks/bench_inference.py [--width 1500] [--keep 25] [--threads 0] [--out FILE.json]

Models (10 -> N -> 10 -> 1, the paper's student): the spectral student as trained (SpectralLinear,
which rebuilds w = (lam_in - lam_out) phi on every call), the same as plain nn.Linear layers, the
masked student (pruned nodes' weights zeroed, same size: what mask-based pruning gives you), and
the physically pruned one from `prune_nodes`. Prints the median time per forward pass and the
speedup over the plain unpruned model, and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from eigenprune.core.convert import despectralize
from eigenprune.core.plans import LayerPlan, make_student
from eigenprune.core.structure import layer_sizes
from eigenprune.pruning.chain import mask_nodes, select_nodes
from eigenprune.pruning.prune import prune_nodes


def median_seconds(model: torch.nn.Module, x: torch.Tensor, min_time: float = 0.3, repeats: int = 15) -> float:
    """Median wall time of one forward pass, each sample averaged over enough calls to last min_time / repeats."""
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        start, calls = time.perf_counter(), 0
        while time.perf_counter() - start < min_time / repeats or calls < 1:
            model(x)
            calls += 1
        samples = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(calls):
                model(x)
            samples.append((time.perf_counter() - t) / calls)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1500)
    parser.add_argument("--keep", type=int, default=25)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 1024, 8192, 65536])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_inference.json"))
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    student = make_student(10, [LayerPlan(args.width), LayerPlan(10, "direct"), LayerPlan(1, "fixed")], seed=0)
    kept = select_nodes(student, {0: args.keep})
    models = {
        "spectral (unpruned)": student,
        "nn.Linear (unpruned)": despectralize(copy.deepcopy(student)),
        "masked (zeroed, same size)": mask_nodes(student, kept),
        "pruned (prune_nodes)": prune_nodes(student, {0: args.keep}),
    }
    print(f"sizes: unpruned {layer_sizes(student)}, pruned {layer_sizes(models['pruned (prune_nodes)'])}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    rows = []
    header = f"{'batch':>7} | " + " | ".join(f"{name:>26}" for name in models) + " | speedup pruned vs nn.Linear"
    print(header)
    print("-" * len(header))
    for batch in args.batches:
        x = torch.randn(batch, 10, generator=torch.Generator().manual_seed(batch))
        times = {name: median_seconds(m, x) for name, m in models.items()}
        speedup = times["nn.Linear (unpruned)"] / times["pruned (prune_nodes)"]
        rows.append({"batch": batch, "seconds": times, "speedup_pruned_vs_linear": speedup})
        print(f"{batch:>7} | " + " | ".join(f"{t * 1e3:>23.4f} ms" for t in times.values()) + f" | {speedup:>8.1f}x")
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "processor": platform.processor(), "width": args.width, "keep": args.keep,
        "sizes_unpruned": layer_sizes(student), "sizes_pruned": layer_sizes(models["pruned (prune_nodes)"]), "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
