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


def test_real_models_benchmark_quick_form(tmp_path):
    """The --quick form of benchmarks/bench_real_models.py: every model and pipeline, the table, equal sizes."""
    pytest.importorskip("sklearn")
    out = tmp_path / "real.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_real_models.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    models = {"cnn-bn", "cnn-plain", "resnet", "mobilenet", "transformer-ff", "mlp"}
    assert set(result["models"]) == models and result["seeds"] == [0] and result["quick"]
    assert result["epochs_scale"] == 1.0 and result["epochs"]["mlp"] == 2  # --quick trains 2 epochs
    assert result["machine"]["cpu"] and result["date"]
    pipelines = {(r["model"], r["pipeline"]) for r in result["rows"]}
    assert len(pipelines) == len(result["rows"]) == 3 * 9 + 3 * 8  # slimming only where there is BatchNorm (3 models)
    for name in ("standard + tp-l1", "standard + tp-taylor", "standard + tp-lamp", "group-norm + group-l2",
                 "growing-reg + group-l2", "spectral + eigenprune (ours)", "spectral + tp-l1 (diagnostic)"):
        assert all((m, name) in pipelines for m in models)
    assert ("cnn-bn", "slimming + bn-scale") in pipelines and ("mlp", "slimming + bn-scale") not in pipelines
    for r in result["rows"]:
        assert 0 < r["fraction_no_ft"] <= 1 and 0 < r["fraction_ft"] <= r["ft_model_fraction_no_ft"] <= 1
        assert 0 <= r["unpruned_test_accuracy"] <= 100 and r["target"] == r["standard_test_accuracy"] - 1.0
        if r["training"] != "standard":
            assert len(r["sweep"]) == 2 and {r["strength"], r["strength_no_ft"]} <= {s["strength"] for s in r["sweep"]}
    # every pipeline's pruned model at a kept fraction has exactly the parameter count of every other's
    for name, info in result["models"].items():
        sizes = {f: {p} for f, p in info["params_at"].items()}
        for r in (r for r in result["rows"] if r["model"] == name):
            for f, p in r["params_by_fraction"].items():
                sizes.setdefault(f, set()).add(p)
        assert sizes["1.0"] == {info["params_full"]}
        assert all(len(v) == 1 for v in sizes.values()), (name, sizes)
        assert len(sizes) >= 2  # at least one pruned size was compared
    # ours went through the library: prune_nodes gives the same model (on the groups it prunes)
    checks = {r["model"]: r["prune_nodes_check"] for r in result["rows"] if r["criterion"] == "eigenprune"}
    assert all(c["ok"] for c in checks.values()), checks
    assert not checks["mobilenet"]["left_alone"]  # its depthwise groups too (left alone before issue #24)
    assert "| cnn-bn | spectral + eigenprune (ours) |" in proc.stdout


@pytest.mark.parametrize("scale", ["0", "-1", "nan", "inf"])
def test_real_models_benchmark_refuses_a_bad_epochs_scale(tmp_path, scale):
    out = tmp_path / "real.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_real_models.py"), "--quick", "--epochs-scale", scale,
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and f"--epochs-scale must be a finite number > 0, got {float(scale)}" in proc.stderr
    assert not out.exists()


def test_prune_speed_benchmark_quick_form(tmp_path):
    """The --quick form of benchmarks/bench_prune_speed.py: every model, the five timings, the table (no time limit here)."""
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_prune_speed.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["quick"] and result["torch_pruning"] and result["date"]
    assert [r["model"] for r in result["rows"]] == ["resnet18", "resnet50", "mobilenetv2"]
    for r in result["rows"]:
        assert set(r["seconds"]) == {"tp", "tp+copy", "tp eigen", "ours", "ours inplace"}
        assert all(len(v) == 1 and v[0] > 0 for v in r["seconds"].values())
        assert r["ratio"] == pytest.approx(r["median"]["ours"] / r["median"]["tp+copy"])
        assert all(0 < k < r["params"] for k in r["kept_params"].values())
        if r["model"].startswith("resnet"):  # no depthwise groups: both prune the same channels' worth
            assert abs(r["kept_params"]["ours"] - r["kept_params"]["tp"]) <= 0.02 * r["params"]
    assert "| resnet50 |" in proc.stdout and "target ratio <= 1.2:" in proc.stdout


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


def test_real_models_benchmark_round4_variants(monkeypatch):
    """Round 4's variants of ours: a group-L1-ranked variant is trained and ranked by its own criterion (not dropped
    as the TP L1 diagnostic), and the per-layer penalty gives every spectral layer the same coefficient x phi size."""
    pytest.importorskip("sklearn")
    import bench_real_models as bench
    import torch

    for name in ("GRID", "FT_EPOCHS"):  # run_one's quick form sets them; put them back afterwards
        monkeypatch.setattr(bench, name, getattr(bench, name))
    threads = torch.get_num_threads()  # and it runs on one thread
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    part = bench.run_one("mlp", 0, True, [0, 2], ours=["wide-l1", "pruned-norm"], kinds=["spectral"])
    by = {r["pipeline"]: r for r in part["rows"]}
    assert by["spectral + eigenprune (ours)"]["training"] == "spectral/wide-l1"
    assert by["spectral + eigenprune (ours)"]["criterion"] == "group-l1"
    assert [s["strength"] for s in by["spectral + eigenprune (ours)"]["sweep"]] == [0.01, 1.0]
    assert by["spectral[pruned-norm] + eigenprune"]["training"] == "spectral/pruned-norm"

    builder, load, _, _ = bench.prune_zoo.models(True)["mlp"]
    model = bench.trained(builder, "spectral/norm", 1.0, load(), 1, 0)
    layers = [m for m in model.modules() if isinstance(m, bench.SpectralModule)]
    assert len(layers) == 3 and len({m.phi.numel() for m in layers}) > 1  # sizes differ, so the scaling shows
    mean = sum(m.phi.numel() for m in layers) / len(layers)
    for m in layers:
        assert m.l2_phi * m.phi.numel() == pytest.approx(0.01 * mean) and m.l2_lam * m.phi.numel() == pytest.approx(5e-4 * mean)
    assert torch.get_num_threads() == threads
