"""One training step of a chunk's shape, several ways of running it, alternated round by round.

    python benchmarks/bench_step.py                                          # the paper's wide chunks and a narrow one
    python benchmarks/bench_step.py --shapes spectral:1500:30:300 --variants eager tiled compile --rounds 6 --steps 40

A shape is method:width:students:batch (students of the paper config's method, padded to `width`).
Variants: eager (the hand-written step, the default), compile (`compile_step: true`), tiled (the first
layer in tiles of `batched.tiled.TILE` activations; tiled:N for N), tiled+compile. Each variant of a
shape is built and warmed up once (compiling where asked: its seconds are reported), then the rounds
run every variant in turn for `--steps` steps (whole epochs of random data) each, so that all see the
same machine: a shared VM's speed drifts by tens of percent within minutes. ms/step includes Adam and
the epoch's bookkeeping (`batched.train._Epoch`). Prints min and median per variant and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from eigenprune.batched import tiled
from eigenprune.batched.memory import reuse_freed_memory, step_flops
from eigenprune.batched.train import _Epoch
from eigenprune.core.training import adam
from eigenprune.experiments.config import load_config
from eigenprune.experiments.data import TrialData
from eigenprune.experiments.grid import Chunk
from eigenprune.experiments.measure import prepare_chunk

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ["spectral:1500:30:300", "spectral:1000:30:300", "direct:500:30:500", "spectral:60:60:300"]


def build(cfg, shape: str, variant: str, batches: int) -> tuple[_Epoch, float]:
    """The epoch runner of `variant` for `shape`, warmed up (two epochs); and the warm-up's seconds."""
    method, width, students, batch = shape.split(":")
    width, students, batch = int(width), int(students), int(batch)
    trials = min(students, cfg.trials)  # students = trials x widths, all padded to `width`
    chunk = Chunk(method, tuple(range(width - students // trials + 1, width + 1)), tuple(range(trials)))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(trials, batches * batch, 10, generator=gen), torch.randn(trials, batches * batch, generator=gen)
    prep = prepare_chunk(cfg, chunk, TrialData(x, y, x[:, :1], y[:, :1], "regression", 1), torch.device("cpu"))
    kind, _, size = variant.partition(":")
    spec = replace(prep.spec, batch_size=batch, compile_step="compile" in kind,
                   tile=(int(size) if size else tiled.TILE) if kind.startswith("tiled") else 0)
    params = [p for p in prep.ens.parameters() if p.requires_grad]
    run = _Epoch(prep.ens, x, y, prep.trial_index, spec, adam(params, spec.lr, kind=spec.optimizer))
    run.perm.copy_(torch.stack([torch.randperm(x.shape[1], generator=gen) for _ in range(trials)]))
    start = time.perf_counter()
    run()
    run()
    return run, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="method:width:students:batch")
    ap.add_argument("--variants", nargs="+", default=["eager", "tiled", "compile"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="steps per variant and round (whole epochs of 4 batches)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reuse_freed_memory()
    cfg = load_config(ROOT / "configs" / "paper.yaml", {"save_students": False})
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads, "torch": torch.__version__, "rows": []}
    for shape in args.shapes:
        runs, warm = {}, {}
        for v in args.variants:
            runs[v], warm[v] = build(cfg, shape, v, 4)
        times: dict[str, list[float]] = {v: [] for v in args.variants}
        epochs = max(1, args.steps // 4)
        for _ in range(args.rounds):
            for v, run in runs.items():
                start = time.perf_counter()
                for _ in range(epochs):
                    run()
                times[v].append(1e3 * (time.perf_counter() - start) / (4 * epochs))
        method, width, students, batch = shape.split(":")
        flops = int(students) * int(batch) * step_flops([10, int(width), 10, 1])
        base = statistics.median(times[args.variants[0]])
        for v in args.variants:
            row = {"shape": shape, "variant": v, "ms_min": min(times[v]), "ms_median": statistics.median(times[v]),
                   "speedup_median": base / statistics.median(times[v]), "warmup_s": warm[v], "ms": times[v],
                   "gflops_min": flops / min(times[v]) / 1e6}
            result["rows"].append(row)
            print(f"{shape:22s} {v:16s} min {row['ms_min']:8.2f}  median {row['ms_median']:8.2f} ms/step  "
                  f"x{row['speedup_median']:.2f}  {row['gflops_min']:5.1f} GFLOP/s  (warm-up {warm[v]:.1f} s)", flush=True)
        del runs
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
