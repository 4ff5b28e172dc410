"""Training throughput: batched ensemble (each backprop variant) vs an ordinary per-model PyTorch loop.

All variants train the paper's student (10 -> N spectral -> 10 dense -> sum) with Adam on mini-batches
of 100 from the same data, same dtype, same number of steps. Variants:

  per-model      `train_alone` over the students one after another (autograd; the tests' oracle)
  manual         `train_ensemble`: the stacked students, hand-written batched backprop (the default)
  autograd       the same stacked students, batched forward differentiated by torch.autograd
  compile        autograd of the batched forward compiled by torch.compile (`backprop: autograd_compiled`)
  manual+compile the hand-written step under torch.compile (`compile_step: true`)
  fused          the same with the first layer in the Triton kernels of `eigenprune.batched.fused` (CUDA)
  +graph         either of the two with the epoch captured in a CUDA graph and replayed (CUDA)

    python benchmarks/bench_train.py                      # CPU: manual vs per-model, widths 20/60/200, 10 and 30 students
    python benchmarks/bench_train.py --device cuda --widths 60 500 1500 --trials 30 --variants manual manual+graph fused fused+graph
    python benchmarks/bench_train.py --device cuda --variants manual --paper-grid fused+graph manual+graph   # + the paper config

"ms/step" is the steady state: the median epoch after the first two (a CUDA graph is captured in
epoch 1), divided by the steps per epoch. "GFLOP/s" is the arithmetic of a step (`batched.memory.step_flops`:
matrix products only) over that time, printed next to the CPU's fp32 peak: cores x SIMD lanes (16 with
AVX-512, 8 with AVX2) x 2 FMA units (assumed: lscpu does not say) x 2 FLOP per FMA x the clock of
/proc/cpuinfo. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from eigenprune.batched.ensemble import Ensemble
from eigenprune.batched.memory import reuse_freed_memory, step_flops
from eigenprune.batched.train import train_ensemble
from eigenprune.core.plans import make_student
from eigenprune.core.training import TrainSpec, train_alone
from eigenprune.experiments.builders import student_plans
from eigenprune.experiments.config import load_config
from eigenprune.experiments.data import make_data
from eigenprune.experiments.experiment_seeds import student_seed
from eigenprune.experiments.grid import plan_chunks
from eigenprune.experiments.measure import prepare_chunk
from eigenprune.experiments.plan import adam_steps

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("per-model", "manual", "autograd", "compile", "manual+compile", "manual+graph", "fused", "fused+graph")


def cpu_peak_gflops() -> dict:
    """The CPU's fp32 peak from /proc/cpuinfo (see the module docstring); {} where it cannot be read."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    mhz = [float(line.split(":", 1)[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    cores = os.cpu_count() or 1
    ghz = max(mhz) / 1e3 if mhz else float("nan")
    per_core = lanes * 2 * 2 * ghz
    return {"cores": cores, "fp32_lanes": lanes, "fma_units_assumed": 2, "ghz": ghz, "peak_gflops": cores * per_core,
            "peak_gflops_threads": min(cores, torch.get_num_threads()) * per_core}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _spec(variant: str, epochs: int) -> TrainSpec:
    backprop, *extra = variant.split("+")
    backprop = "autograd_compiled" if backprop == "compile" else backprop  # the variant keeps its name in stored results
    return TrainSpec(lr=0.005, batch_size=100, epochs=epochs, backprop=backprop, cuda_graph="graph" in extra,
                     compile_step="compile" in extra)


def bench(width: int, trials: int, steps: int, epochs: int, device: torch.device, variants: list[str], record) -> None:
    """Time every variant on one (width, trials); `record(row)` gets each row as soon as it is measured
    (a variant that raises is recorded with its error, and the others still run)."""
    per_epoch = max(1, steps // epochs)
    steps = per_epoch * epochs
    cfg = load_config(None, {"trials": trials, "data": {"n_train": 100 * per_epoch, "n_test": 10}, "save_students": False})
    data = make_data(cfg).to(device)
    students = [make_student(10, student_plans(cfg, "spectral", width), student_seed(cfg.seed, t, width)).to(device) for t in range(trials)]
    index = torch.arange(trials, device=device)
    base = None
    for variant in variants:
        row = {"width": width, "students": trials, "steps": steps, "variant": variant}
        try:
            total, step_s = _time_variant(variant, students, data, index, epochs, per_epoch, device)
        except Exception as err:  # recorded in the results and printed; main() exits non-zero
            traceback.print_exc()
            record({**row, "error": f"{type(err).__name__}: {err}"})
            continue
        base = total if variant == "per-model" else base
        flops = trials * 100 * step_flops([10, width, *cfg.student.rest, 1])  # batches of 100 patterns
        record({**row, "seconds": total, "student_steps_per_s": trials * steps / total, "step_ms": 1e3 * step_s,
                "gflops": flops / step_s / 1e9, "speedup_vs_per_model": base / total if base else None})


def _warm(students, data, spec: TrainSpec, device: torch.device) -> None:
    """Pay the first-call costs (allocator, kernel compilation, graph capture) on two students, 3 epochs."""
    warm = Ensemble(copy.deepcopy(students[:2])).to(device)
    index = torch.arange(2, device=device)
    x, y = data.x_train[:2, : 3 * spec.batch_size], data.y_train[:2, : 3 * spec.batch_size]
    train_ensemble(warm, x, y, index, replace(spec, epochs=3), [0, 1])


def _time_variant(variant: str, students, data, index, epochs: int, per_epoch: int, device: torch.device) -> tuple[float, float]:
    """(total seconds, seconds per step: the steady state for the batched variants)."""
    trials = len(students)
    if variant == "per-model":
        train_alone(copy.deepcopy(students[0]), data.x_train[0], data.y_train[0], _spec("manual", 1), 0)  # first-call costs
        models = copy.deepcopy(students)
        _sync(device)
        t0 = time.perf_counter()
        for t, student in enumerate(models):
            train_alone(student, data.x_train[t], data.y_train[t], _spec("manual", epochs), t)
        _sync(device)
        total = time.perf_counter() - t0
        return total, total / (per_epoch * epochs)  # advancing every student by one step, one after another
    spec = _spec(variant, epochs)
    _warm(students, data, spec, device)
    stamps: list[float] = []
    ens = Ensemble(copy.deepcopy(students)).to(device)
    _sync(device)
    t0 = time.perf_counter()
    train_ensemble(ens, data.x_train, data.y_train, index, spec, list(range(trials)), lambda e, loss: stamps.append(time.perf_counter()))
    _sync(device)
    total = time.perf_counter() - t0
    laps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    return total, (statistics.median(laps) if laps else total / epochs) / per_epoch


def paper_grid(device: torch.device, variants: list[str], budget_s: float, config: Path | None, record) -> None:
    """Training wall time and achieved GFLOP/s of every chunk of `config` (paper.yaml; None: the
    quick run; no analysis) for each variant in turn, in this process; `record(row)` gets each chunk's row
    as soon as it is timed. Nothing starts after `budget_s` seconds (those chunks are recorded as not run)."""
    t0 = time.perf_counter()
    data = None
    for variant in variants:
        spec = _spec(variant, 1)
        cfg = load_config(config, {"device": str(device), "save_students": False, "backprop": spec.backprop,
                                   "cuda_graphs": spec.cuda_graph, "compile_step": spec.compile_step})
        data = make_data(cfg).to(device) if data is None else data  # the variants change no data
        failed, warmed = None, False
        for chunk in plan_chunks(cfg):
            row = {"variant": variant, "chunk": chunk.id, "students": len(chunk.keys())}
            if failed or time.perf_counter() - t0 > budget_s:
                record({**row, "not_run": failed or "time budget spent"})
                continue
            try:
                prep = prepare_chunk(cfg, chunk, data, device)
                if not warmed:
                    _warm([prep.ens.student(0), prep.ens.student(prep.ens.n_students - 1)], data, prep.spec, device)
                    warmed = True
                _sync(device)
                c0 = time.perf_counter()
                train_ensemble(prep.ens, data.x_train[:, :prep.n_fit], data.y_train[:, :prep.n_fit], prep.trial_index, prep.spec,
                               prep.shuffle)
                _sync(device)
            except Exception as err:  # recorded; this variant's remaining chunks are skipped, the next variant runs
                traceback.print_exc()
                failed = f"{type(err).__name__}: {err}"
                record({**row, "error": failed})
                continue
            seconds = time.perf_counter() - c0
            widths = [data.x_train.shape[-1], max(chunk.widths), *cfg.student.rest, data.n_outputs]
            batch, steps = adam_steps(cfg, chunk.method, prep.n_fit)
            gflops = steps * len(chunk.keys()) * batch * step_flops(widths) / seconds / 1e9
            record({**row, "seconds": seconds, "steps": steps, "gflops": gflops})
            print(f"  {variant} {chunk.id}: {seconds:.1f} s, {gflops:.1f} GFLOP/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--widths", type=int, nargs="+", default=[20, 60, 200])
    ap.add_argument("--trials", type=int, nargs="+", default=[10, 30])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=10, help="the steps are split into this many epochs")
    ap.add_argument("--variants", nargs="*", choices=VARIANTS, default=["per-model", "manual"], help="none: only --paper-grid")
    ap.add_argument("--paper-grid", nargs="+", choices=VARIANTS[1:],
                    help="also time the paper config's training with these variants, in turn")
    ap.add_argument("--grid-config", default="paper",
                    help="the grid --paper-grid times (a config file, a shipped config's name, or quick: the embedded quick run)")
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="paper grid: start no chunk after this many seconds")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--out", default="benchmarks/results/bench_train.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reuse_freed_memory()  # as every process that trains in a run does (experiments.measure.prepare_chunk)
    device = torch.device(args.device)
    for v in [*args.variants, *(args.paper_grid or [])]:
        if (v.startswith("fused") or v.endswith("+graph")) and device.type != "cuda":
            ap.error(f"variant {v} needs a CUDA device, got --device {args.device}")
    peak = cpu_peak_gflops() if device.type == "cpu" else {}
    result = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "cpu_peak": peak,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "rows": [],
              "paper_grid": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(key: str, row: dict) -> None:  # the JSON is rewritten after every row: a killed run keeps what it measured
        result[key].append(row)
        out.write_text(json.dumps(result, indent=2) + "\n")

    if peak:
        print(f"CPU fp32 peak {peak['peak_gflops']:.0f} GFLOP/s = {peak['cores']} cores x {peak['fp32_lanes']} lanes x "
              f"{peak['fma_units_assumed']} FMA units (assumed) x 2 x {peak['ghz']:.2f} GHz; "
              f"{peak['peak_gflops_threads']:.0f} GFLOP/s on the {torch.get_num_threads()} thread(s) used")
    if args.variants:
        print(f"{'width':>6} {'students':>8} {'variant':<13} {'students*steps/s':>17} {'ms/step':>8} {'GFLOP/s':>8} {'vs per-model':>12}")

    def show(row: dict) -> None:
        record("rows", row)
        if "error" in row:
            print(f"{row['width']:>6} {row['students']:>8} {row['variant']:<13} failed: {row['error']}")
            return
        speedup = f"{row['speedup_vs_per_model']:.1f}x" if row["speedup_vs_per_model"] else "-"
        print(f"{row['width']:>6} {row['students']:>8} {row['variant']:<13} {row['student_steps_per_s']:>17.0f} "
              f"{row['step_ms']:>8.3f} {row['gflops']:>8.2f} {speedup:>12}", flush=True)

    for w in args.widths if args.variants else []:
        for t in args.trials:
            bench(w, t, args.steps, args.epochs, device, args.variants, show)
    if args.paper_grid:
        grid = None if args.grid_config == "quick" else Path(args.grid_config)
        paper_grid(device, args.paper_grid, args.budget_s, grid, lambda row: record("paper_grid", row))
        for variant in args.paper_grid:
            rows = [r for r in result["paper_grid"] if r["variant"] == variant]
            skipped = [r["chunk"] for r in rows if r.get("not_run")]
            print(f"{args.grid_config} ({variant}): {sum(r.get('seconds', 0) for r in rows):.1f} s of training"
                  + (f"; not run: {', '.join(skipped)}" if skipped else ""))
    print(f"wrote {out}")
    if any("error" in r for r in result["rows"]):
        sys.exit("some variants failed (see the table and the JSON)")


if __name__ == "__main__":
    main()
