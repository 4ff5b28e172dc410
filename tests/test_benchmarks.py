"""The benchmark scripts (the prepared GPU script, the floor model, the before/after runner), exercised on the CPU."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_gpu_check_rehearses_every_step_on_the_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["failed"] == []
    eq = result["equivalence"]
    assert eq["float64+graph"]["max_rel_test_loss_diff"] == 0.0  # on the CPU, the graph option changes nothing
    if importlib.util.find_spec("triton") and os.environ.get("TRITON_INTERPRET") == "1":  # set by conftest without a GPU
        assert eq["fused"]["max_rel_test_loss_diff"] < 1e-3  # the fused kernels, in Triton's interpreter
    assert result["throughput"]["rows"][0]["student_steps_per_s"] > 0
    grid = result["paper_grid"]
    assert [c["chunk"] for c in grid["chunks"]] == [c["chunk"] for c in result["floor"]["chunks"]]
    assert all(c["seconds"] > 0 and c["achieved_over_floor"] > 0 for c in grid["chunks"])
    assert grid["totals"]["manual"]["chunks_run"] == len(grid["chunks"])


def test_floor_counts_flops_and_orders_the_designs(tmp_path):
    from floor import grid_floor

    config = tmp_path / "g.yaml"
    config.write_text(yaml.safe_dump({"trials": 3, "data": {"n_train": 1000}, "student": {"widths": [40, 200]},
                                      "spectral": {"epochs": 2, "batch_size": 250}, "methods": ["spectral"]}))
    floor = grid_floor(config, "h100-sxm", pack=1.0)
    first = floor["chunks"][1]  # width 200 alone (padding 40 to it would add more than grid.STEP_OVERHEAD): 3 students, 4 steps per epoch
    assert (first["students"], first["padded_width"], first["steps"], first["padding_waste"]) == (3, 200, 8, 1.0)
    d, n = 10, 200
    assert first["gflop_per_step"] * 1e9 == pytest.approx(3 * 250 * (6 * (d * n + n * 10 + 10 * 1) - 2 * d * n))
    assert 20 < first["kernels_per_step"] < 200
    assert first["floor_s_fused"] <= first["floor_s_fused_first"] <= first["floor_s_eager"]
    assert first["floor_s_unfused"] <= first["floor_s_eager"]
    assert first["mb_per_step_fused"] < first["mb_per_step_fused_first"] < first["mb_per_step_eager"]
    assert first["mb_per_step_unfused"] < first["mb_per_step_eager"]


def test_real_models_benchmark_runs_in_tiny_form(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "real.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_real_models.py"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    pairs = {(r["model"], r["training"], r["criterion"]) for r in result["rows"]}
    assert len(pairs) == 15 and ("cnn-digits", "spectral", "eigenprune") in pairs and ("resmlp-csv", "direct", "tp-taylor") in pairs
    for r in result["rows"]:
        assert r["params_ft"] is None or r["params_ft"] <= r["params_full"]
        assert r["latency_full_b1_ms"] > 0 and r["latency_full_b256_ms"] > 0
    assert "| cnn-digits | spectral + eigenprune |" in proc.stdout


def test_alternate_runs_both_versions_in_turn(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text("name: tiny\ntrials: 1\ndata: {n_train: 200, n_test: 100}\nstudent: {widths: [10]}\n"
                      "spectral: {epochs: 2}\ndirect: {epochs: 2}\nsave_students: false\n")
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "alternate.py"), "--before", "HEAD", "--config", str(config),
                           "--rounds", "1", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["version"] for r in rows] == ["before", "after"]
    assert all(r["wall_s"] > 0 and set(r["chunk_seconds"]) == {"spectral-w10", "direct-w10"} for r in rows)
    worktrees = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    assert "eigenprune-alternate-" not in worktrees  # its worktree is removed
