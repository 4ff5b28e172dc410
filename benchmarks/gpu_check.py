"""One prepared GPU session (see docs/benchmarks.md): correctness, throughput, the paper grid, the floor.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py --out $OUT            # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --smoke --out /tmp/gc       # rehearsal of the script on a CPU

1. the floor of the paper config (paper.yaml) on this card (`floor.py`: counts and datasheet peaks, no timing);
   with --smoke, a tiny grid stands in for the paper's here and in step 4;
2. tests/test_cuda.py and tests/test_fused.py on the GPU;
3. a small grid through `run_experiment` on the CPU and on the device: float64 eager and with CUDA
   graphs (must agree to 1e-6), float32 with the fused kernels, eager and with graphs (to 1e-3);
4. the paper config's whole grid, training only, with fused+graph and then manual+graph, chunk by
   chunk until the time budget is spent; each chunk's time next to its floor;
5. batched throughput (students x steps / s and steady ms per step) for widths 60, 500, 1500 and 30
   students: manual, manual+graph, fused, fused+graph.
Every step's result is written to gpu_check.json under --out as soon as it is known; a step that fails
is recorded with its error and the script exits non-zero at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def tests(device: str) -> dict:
    files = [str(ROOT / "tests" / f) for f in ("test_cuda.py", "test_fused.py")]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", *files], capture_output=True, text=True, cwd=ROOT)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    if proc.returncode != 0:
        raise RuntimeError("CUDA tests failed:\n" + "\n".join(tail))
    return {"passed": True, "summary": tail[-1]}


def equivalence(device: str, smoke: bool) -> dict:
    from eigenprune.batched import fused
    from eigenprune.experiments.config import parse_config
    from eigenprune.experiments.runner import run_experiment

    epochs, n_train = (3, 300) if smoke else (20, 1000)
    body = {"name": "gpu-eq", "trials": 2, "data": {"n_train": n_train, "n_test": 500}, "student": {"widths": [20, 60]},
            "spectral": {"epochs": epochs}, "direct": {"epochs": epochs}, "save_students": False, "workers": 1}
    runs = {"cpu-float64": {"device": "cpu", "dtype": "float64"}, "float64": {"device": device, "dtype": "float64"},
            "float64+graph": {"device": device, "dtype": "float64", "cuda_graphs": True}}
    if not fused.unavailable(torch.device(device)):
        runs.update({"cpu-float32": {"device": "cpu"}, "fused": {"device": device, "backprop": "fused"},
                     "fused+graph": {"device": device, "backprop": "fused", "cuda_graphs": True}})
    frames = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in runs.items():
            folder = Path(tmp) / name.replace("+", "_")
            run_experiment(parse_config({**body, **extra}), folder, quiet=True)
            frames[name] = pd.read_parquet(folder / "results.parquet").sort_values(["method", "width", "trial"]).reset_index(drop=True)
    out, bad = {}, []
    for name, f in frames.items():
        if name.startswith("cpu"):
            continue
        ref, tol = (frames["cpu-float64"], 1e-6) if name.startswith("float64") else (frames["cpu-float32"], 1e-3)
        out[name] = {"max_rel_test_loss_diff": float(((ref.test_loss - f.test_loss).abs() / ref.test_loss).max()),
                     "effective_dim_equal": bool((ref.effective_dim == f.effective_dim).all()),
                     "failed_step_equal": bool((ref.failed_step == f.failed_step).all()), "tolerance": tol}
        if not (out[name]["max_rel_test_loss_diff"] < tol and out[name]["failed_step_equal"]):
            bad.append(name)
    if bad:
        raise RuntimeError(f"results differ from the CPU's for {bad}: {out}")
    return out


def throughput(device: str, smoke: bool, out: Path) -> dict:
    sizes = (["--widths", "20", "--trials", "2", "--steps", "40"] if smoke
             else ["--widths", "60", "500", "1500", "--trials", "30", "--steps", "500"])
    variants = ["manual", "manual+graph", "fused", "fused+graph"] if device.startswith("cuda") else ["manual"]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--device", device, *sizes, "--variants", *variants,
           "--out", str(out / "bench_train_gpu.json")]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads((out / "bench_train_gpu.json").read_text())


def card_of(device: str) -> str:
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else ""
    return "h200" if "H200" in name else "h100-pcie" if "PCIe" in name else "h100-sxm"


def paper_grid(device: str, variants: list[str], config: Path, budget_s: float, out: Path, floor: dict | None) -> dict:
    """Both variants in one process (data made once); rows come back even if the process failed midway."""
    target = out / "paper_grid.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--device", device, "--variants", "--paper-grid", *variants,
           "--grid-config", str(config), "--budget-s", str(max(budget_s, 0.0)), "--out", str(target)]
    code = subprocess.run(cmd, cwd=ROOT).returncode
    rows = json.loads(target.read_text())["paper_grid"] if target.is_file() else []
    floors = {c["chunk"]: c for c in floor["chunks"]} if floor and "chunks" in floor else {}
    for r in rows:
        key = "floor_s_fused_first" if r["variant"].startswith("fused") else "floor_s_eager"
        if "seconds" in r and r["chunk"] in floors:
            r.update({"floor_s": floors[r["chunk"]][key], "achieved_over_floor": r["seconds"] / floors[r["chunk"]][key]})
    totals = {v: {"training_s": sum(r.get("seconds", 0.0) for r in rows if r["variant"] == v),
                  "chunks_run": sum("seconds" in r for r in rows if r["variant"] == v)} for v in variants}
    if code != 0 or any("error" in r for r in rows):
        raise RuntimeError(f"bench_train exited with {code}; rows: {rows}")
    return {"totals": totals, "chunks": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and a tiny grid instead of the paper's: rehearse the script")
    ap.add_argument("--budget-s", type=float, default=420, help="wall-clock budget of the whole script; the paper grid gets the rest")
    args = ap.parse_args()
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    result: dict = {"device_name": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "failed": []}

    def step(key: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            result[key] = fn()
        except Exception as err:  # recorded, printed and turned into a non-zero exit below
            traceback.print_exc()
            result[key] = {"error": f"{type(err).__name__}: {err}"}
            result["failed"].append(key)
        result[key + "_seconds"] = time.perf_counter() - t0
        (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"== {key} ({time.perf_counter() - t0:.0f} s): {json.dumps(result[key])[:600]}", flush=True)

    from floor import grid_floor

    from eigenprune.experiments.config import SHIPPED_CONFIGS

    grid = SHIPPED_CONFIGS / "paper.yaml"
    if args.smoke:
        grid = out / "smoke-grid.yaml"
        grid.write_text(yaml.safe_dump({"name": "smoke", "trials": 2, "data": {"n_train": 300, "n_test": 100},
                                        "student": {"widths": [10, 40]}, "spectral": {"epochs": 3}, "direct": {"epochs": 3}}))
    cuda = args.device.startswith("cuda")
    step("floor", lambda: grid_floor(grid, card_of(args.device)))
    if cuda:
        step("tests", lambda: tests(args.device))
    step("equivalence", lambda: equivalence(args.device, args.smoke))
    # the paper grid gets what is left but ~150 s: the last chunk it starts (up to ~60 s) and the throughput step
    step("paper_grid", lambda: paper_grid(args.device, ["fused+graph", "manual+graph"] if cuda else ["manual"], grid,
                                          args.budget_s - (time.perf_counter() - start) - 150, out, result.get("floor")))
    step("throughput", lambda: throughput(args.device, args.smoke, out))
    print(f"wrote {out / 'gpu_check.json'} after {time.perf_counter() - start:.0f} s")
    if result["failed"]:
        sys.exit(f"failed steps: {', '.join(result['failed'])}")


if __name__ == "__main__":
    main()
