"""The floor under a grid's training time on a GPU: FLOPs, bytes and kernel launches per step.

    python benchmarks/floor.py                                   # the paper config on an H100 SXM
    python benchmarks/floor.py paper --card h100-pcie --pack 1.5 --out floor.json

Nothing here is timed on a GPU: the counts come from the grid's shapes, the kernel count per step is
measured by counting the ATen operations one training step dispatches (on this CPU; a CUDA step
launches about one kernel per operation), and the card's peaks are its datasheet numbers. The floors
are lower bounds for four ways of running a step (per chunk, steps x the largest of the bounds):

  eager           the default step (`ManualStep`, backprop: manual, + fused Adam): every
                  hidden activation [S, B, N] goes through memory 10 times in float32 (z written by
                  the matmul; read and written back by the in-place ReLU; read by the next layer and
                  by its weight gradient; the propagated gradient written, read with h by ReLU's
                  backward, the result written and read by the weight gradient) = 40 bytes per
                  student, pattern and node; the weights' element-wise work (w = lam_diff * phi, the
                  chain rule, Adam) ~25 passes over each weight;
  unfused         a hypothetical minimum with one kernel per matmul, ReLU and its mask fused in: h
                  written once and read three times, the hidden gradient written and read once = 24
                  bytes; 10 passes over each weight;
  fused_first     backprop: fused as built (`eigenprune.batched.fused`): the first layer's activations never
                  leave the chip; its two kernels re-read the weights once per block of 64 rows and
                  the inputs and output gradients once per block of 64 nodes; everything else as eager
                  (the 7 first-layer kernels of the eager step become 2);
  fused           the whole step in ~3 kernels, only inputs and parameters move (8 passes per weight).
Launch bound: with CUDA graphs a kernel still costs about a microsecond end to end (`--node-us`), so a
step of K kernels costs >= K us however small; without graphs each kernel also costs host time
(PAPER.md section 4 measured 1.3-2.2 ms per eager step on an H100, whatever the width).
Arithmetic: matmuls in float32 on CUDA cores (PyTorch does not use TF32 for matmuls by default).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from eigenprune.batched.ensemble import Ensemble
from eigenprune.batched.memory import step_flops
from eigenprune.batched.train import train_ensemble
from eigenprune.core.plans import make_student
from eigenprune.core.training import TrainSpec
from eigenprune.experiments.builders import student_plans
from eigenprune.experiments.config import load_config
from eigenprune.experiments.grid import plan_chunks
from eigenprune.experiments.plan import adam_steps

ROOT = Path(__file__).resolve().parents[1]
# datasheet peaks: float32 (non-tensor) FLOP/s, memory bytes/s
CARDS = {"h100-sxm": (67e12, 3.35e12), "h100-pcie": (51e12, 2.0e12), "h200": (67e12, 4.8e12)}
MODES = ("eager", "unfused", "fused_first", "fused")
BLOCK = 64  # rows and nodes per program in eigenprune.batched.fused


NO_KERNEL = {"detach", "empty", "empty_strided", "scalar_tensor", "lift_fresh"}  # metadata or allocation only


class _Count(TorchDispatchMode):
    """Counts the ATen operations that launch a kernel (not views, allocations or profiler markers)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aten" and not func.is_view and func.overloadpacket.__name__ not in NO_KERNEL:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(cfg, method: str, width: int) -> int:
    """Kernels one training step launches (two-batch epoch minus one-batch epoch)."""
    counts = []
    for batches in (1, 2):
        ens = Ensemble([make_student(cfg.data.input_dim, student_plans(cfg, method, width), 0)])
        x, y = torch.randn(1, 4 * batches, cfg.data.input_dim), torch.randn(1, 4 * batches)
        with _Count() as c:
            train_ensemble(ens, x, y, torch.zeros(1, dtype=torch.long), TrainSpec(0.01, 4, 1), [0])
        counts.append(c.ops)
    return counts[1] - counts[0]


def chunk_floor(cfg, chunk, card: str, node_us: float, kernels: int) -> dict:
    flops_peak, bandwidth = CARDS[card]
    keys = chunk.keys()
    s, n_pad = len(keys), max(chunk.widths)
    d, rest = cfg.data.input_dim, [*cfg.student.rest, 1]
    p = cfg.regularization.n_fit(cfg.data.n_train)
    b, steps = adam_steps(cfg, chunk.method, p)

    def flops(n: int) -> int:  # per student and pattern: forward, weight gradients, hidden gradients
        return step_flops([d, n, *rest])

    weights = sum(i * o for i, o in zip([d, n_pad, *rest][:-1], [n_pad, *rest]))
    first = d * n_pad + n_pad * rest[0]  # W1 and W2: what the fused kernels read
    later = sum(rest[:-1])  # hidden nodes after the first layer
    row = {"chunk": chunk.id, "students": s, "padded_width": n_pad, "steps": steps, "batch": b,
           "gflop_per_step": s * b * flops(n_pad) / 1e9,
           "padding_waste": flops(n_pad) * len(keys) / sum(flops(w) for w, _, _ in keys), "kernels_per_step": kernels}
    compute = row["gflop_per_step"] * 1e9 / flops_peak
    per_student = {  # bytes per student and step
        "eager": b * (40 * (n_pad + later) + 4 * 6 * d) + 4 * 25 * weights,
        "unfused": b * (24 * (n_pad + later) + 4 * 2 * d) + 4 * 10 * weights,
        "fused_first": (b * (40 * later + 4 * 6 * d) + 4 * 25 * weights
                        + 4 * (math.ceil(b / BLOCK) * first + math.ceil(n_pad / BLOCK) * b * (d + rest[0]) + b * rest[0])),
        "fused": b * 4 * d + 4 * 8 * weights,
    }
    launches = {"eager": kernels, "unfused": kernels, "fused_first": kernels - 5, "fused": 3}
    recompute = s * b * 2 * d * n_pad / flops_peak  # fused_first's backward kernel recomputes the first layer
    for mode in MODES:
        arithmetic = compute + (recompute if mode == "fused_first" else 0.0)
        row[f"mb_per_step_{mode}"] = s * per_student[mode] / 1e6
        row[f"floor_s_{mode}"] = steps * max(arithmetic, s * per_student[mode] / bandwidth, launches[mode] * node_us * 1e-6)
    row["compute_s"], row["launch_s"] = steps * compute, steps * kernels * node_us * 1e-6
    return row


def grid_floor(config: Path, card: str = "h100-sxm", pack: float = 1.5, node_us: float = 1.0) -> dict:
    cfg = load_config(config, {"save_students": False})
    counted: dict[str, int] = {}
    rows = []
    # the pack factor without PAD_LIMIT (a GPU study; PAD_LIMIT is the CPU's), and STEP_OVERHEAD's merges as in a run
    for chunk in plan_chunks(cfg, pack, pad_limit=float("inf")):
        if chunk.method not in counted:
            counted[chunk.method] = ops_per_step(cfg, chunk.method, chunk.widths[0])
        rows.append(chunk_floor(cfg, chunk, card, node_us, counted[chunk.method]))
    totals = {k: sum(r[k] for r in rows) for k in ("compute_s", "launch_s", *(f"floor_s_{m}" for m in MODES))}
    return {"config": str(config), "card": card, "peaks": dict(zip(("fp32_flops", "bytes_per_s"), CARDS[card])),
            "pack_factor": pack, "node_us": node_us, "chunks": rows, "totals": totals}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default="paper", help="a config file or a shipped config's name")
    ap.add_argument("--card", choices=sorted(CARDS), default="h100-sxm")
    ap.add_argument("--pack", type=float, default=1.5, help="plan_chunks pack factor (padding allowed per bucket)")
    ap.add_argument("--node-us", type=float, default=1.0, help="assumed cost of one kernel inside a CUDA graph, microseconds")
    ap.add_argument("--out", help="also write the result as JSON here")
    args = ap.parse_args()
    result = grid_floor(Path(args.config), args.card, args.pack, args.node_us)
    print(f"{result['config']} on {args.card} (pack factor {args.pack}, {args.node_us} us per graph kernel)")
    print(f"{'chunk':<24} {'S':>4} {'N':>5} {'steps':>6} {'GFLOP/st':>9} {'pad':>5} {'kern':>5} | MB/step: "
          + " ".join(f"{m:>11}" for m in MODES) + " | floor s: " + " ".join(f"{m:>11}" for m in MODES))
    for r in result["chunks"]:
        print(f"{r['chunk']:<24} {r['students']:>4} {r['padded_width']:>5} {r['steps']:>6} {r['gflop_per_step']:>9.2f} "
              f"{r['padding_waste']:>5.2f} {r['kernels_per_step']:>5} |          "
              + " ".join(f"{r[f'mb_per_step_{m}']:>11.1f}" for m in MODES) + " |          "
              + " ".join(f"{r[f'floor_s_{m}']:>11.1f}" for m in MODES))
    t = result["totals"]
    print(f"{'total':<24} {'':>40} | {'':>56} |          " + " ".join(f"{t[f'floor_s_{m}']:>11.1f}" for m in MODES))
    print(f"arithmetic alone: {t['compute_s']:.1f} s; launches of the eager step at {args.node_us} us each: {t['launch_s']:.1f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
