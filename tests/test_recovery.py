"""The capacity curve's k*, and the recovery diagram's tables, on synthetic inputs with known answers."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from eigenprune.experiments.builders import make_teacher
from eigenprune.experiments.capacity import (
    capacity_curve,
    capacity_widths,
    k_star,
    k_star_per_layer,
    k_star_table,
)
from eigenprune.experiments.config import SHIPPED_CONFIGS, ConfigError, parse_config
from eigenprune.experiments.grid import pack_widths
from eigenprune.experiments.recovery import (
    RecoveryConfig,
    analyse,
    best_split,
    collapse_table,
    explain,
    load_recovery_config,
    node_removal_mse,
    readings,
    run_recovery,
    summarize,
)

ROOT = Path(__file__).resolve().parents[1]


def test_k_star_is_the_smallest_width_reaching_eps():
    widths, mse = [8, 2, 6, 4], [0.05, 1.0, 0.1, 0.5]  # unsorted on purpose
    assert k_star(widths, mse, 0.1) == 6
    assert k_star(widths, mse, 0.5) == 4
    assert k_star(widths, mse, 0.11) == 6
    assert k_star(widths, mse, 2.0) == 2
    assert np.isnan(k_star(widths, mse, 0.01))
    assert np.isnan(k_star(widths, mse, float("nan")))
    assert k_star([2, 4, 6], [np.nan, 0.05, 0.01], 0.1) == 4  # a failed (NaN) network never counts
    assert k_star([2, 4, 6], [0.2, 0.05, 0.3], 0.1) == 4  # not monotone: still the smallest that reaches it
    with pytest.raises(ValueError, match="one shape"):
        k_star([1, 2], [0.1], 0.1)


def test_k_star_per_layer_takes_the_narrowest_width_of_each_layer_over_all_shapes():
    """MSE(k1, k2) = 1/k1 + 1/k2: eps 0.31 is reached by (10, 5) and (5, 10) but not (5, 5): k*_1 = k*_2 = 5."""
    shapes = pd.DataFrame([{"k1": a, "k2": b, "best": 1 / a + 1 / b} for a in (2, 5, 10) for b in (2, 5, 10)])
    assert k_star_per_layer(shapes, ["k1", "k2"], 0.31) == {"k1": 5, "k2": 5}
    assert k_star_per_layer(shapes, ["k1", "k2"], 0.2) == {"k1": 10, "k2": 10}
    assert k_star_per_layer(shapes, ["k1", "k2"], 0.6) == {"k1": 2, "k2": 2}  # 1/2 + 1/10
    assert all(np.isnan(v) for v in k_star_per_layer(shapes, ["k1", "k2"], 0.1).values())


def test_the_deep_script_refuses_a_shallow_config_and_bad_widths(tmp_path):
    env = {"PYTHONPATH": str(ROOT / "src"), "MPLCONFIGDIR": str(tmp_path / "mpl"), "PATH": "/usr/bin:/bin"}
    script = str(ROOT / "scripts" / "deep_capacity.py")
    r = subprocess.run([sys.executable, script, "cpu-paper", "--k1", "5", "--k2", "5", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "deep=False" in r.stderr and not (tmp_path / "o").exists()
    r = subprocess.run([sys.executable, script, "cpu-deep", "--k1", "5,x", "--k2", "5", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "--k1 must be comma-separated positive integers, got '5,x'" in r.stderr


def test_capacity_widths_and_packing():
    assert capacity_widths(20, [0.1, 0.5, 1.0, 1.4]) == [2, 10, 20, 28]
    assert capacity_widths(5, [0.01, 0.1, 0.2]) == [1]
    with pytest.raises(ValueError, match="positive numbers"):
        capacity_widths(5, [0.0])
    buckets = pack_widths([1, 2, 5, 10, 20, 28, 50, 70, 100, 140, 28], pack_factor=2.0, floor=10)  # as the recovery runs it
    assert buckets == [[1, 2, 5, 10], [20, 28, 50, 70, 100], [140]]  # 6 x 140 > 2 x (268 + 140): a new bucket
    assert all(len(b) * max(b) <= 2 * sum(b) for b in buckets[1:])


def _runs():
    """Teacher 0: spectral and direct at widths 2, 4, 8, two seeds each, with known losses."""
    rows = []
    loss = {("spectral", 2): (0.9, 1.1), ("spectral", 4): (0.2, 0.4), ("spectral", 8): (0.05, 0.07),
            ("direct", 2): (0.8, 1.0), ("direct", 4): (0.3, 0.5), ("direct", 8): (0.09, 0.2)}
    for (method, w), pair in loss.items():
        rows += [{"teacher": 0, "method": method, "width": w, "trial": t, "test_loss": v} for t, v in enumerate(pair)]
    return pd.DataFrame(rows)


def test_capacity_curve_and_k_star_table():
    curve = capacity_curve(_runs()).set_index(["method", "width"])
    assert curve.loc[("spectral", 4), "best"] == 0.2 and curve.loc[("spectral", 4), "mean"] == pytest.approx(0.3)
    assert curve.loc[("any", 2), "best"] == 0.8 and curve.loc[("any", 2), "mean"] == pytest.approx(0.9)  # direct's mean
    assert curve.loc[("any", 8), "mean"] == pytest.approx(0.06)
    ks = k_star_table(curve.reset_index(), pd.DataFrame({"teacher": [0], "eps": [0.2]})).set_index(["method", "stat", "factor"]).k_star
    assert ks[("spectral", "best", 1.0)] == 4
    assert ks[("spectral", "mean", 1.0)] == 8  # mean at 4 is 0.3 > 0.2
    assert ks[("direct", "best", 1.0)] == 8 and ks[("direct", "best", 1.1)] == 8  # 0.3 > 0.22
    assert ks[("any", "mean", 1.0)] == 8 and ks[("any", "best", 1.0)] == 4


def test_node_removal_mse_equals_zeroing_each_node():
    teacher = make_teacher(6, [7, 4], 3, torch.float64)
    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = node_removal_mse(teacher, x)
    full = teacher(x)
    for j in range(7):
        cut = make_teacher(6, [7, 4], 3, torch.float64)
        with torch.no_grad():
            cut[0].weight[j] = 0
        assert got[j] == pytest.approx(float(((cut(x) - full) ** 2).mean()), rel=1e-10)


def _synthetic(teachers, n_c, eps, signals):
    """Tables of `run_recovery`'s shape for teachers (h_T, d): two trials at strength 1 with critical
    points n_c[i] +- 1 and test loss eps[i]; capacity from `_runs()`-like curves; removal MSEs `signals[i]`."""
    students, capacity, sig = [], [], []
    for i, (h, d) in enumerate(teachers):
        base = {"teacher": i, "h_t": h, "input_dim": d, "teacher_seed": 0, "strength": 1.0, "status": "ok", "val_loss": 0.0,
                "effective_dim": h}
        students += [{**base, "trial": 0, "critical_point": n_c[i] - 1, "test_loss": eps[i]},
                     {**base, "trial": 1, "critical_point": n_c[i] + 1, "test_loss": eps[i]}]
        for w in (h // 2, h, 2 * h):  # the from-scratch loss halves as the width doubles; h reaches 0.1
            capacity += [{"teacher": i, "method": "direct", "width": w, "trial": t, "test_loss": 0.1 * h / w * (1 + t)} for t in (0, 1)]
        sig += [{"teacher": i, "node": j, "removal_mse": v} for j, v in enumerate(signals[i])]
    return pd.DataFrame(students), pd.DataFrame(capacity), pd.DataFrame(sig)


def test_summarize_gives_known_ratios_k_star_and_detectable_nodes():
    teachers = [(10, 5), (40, 5)]
    students, capacity, sig = _synthetic(teachers, n_c=[10, 20], eps=[0.1, 0.2], signals=[[0.5, 0.02, 0.005], [0.03, 0.01]])
    read = readings(students, "1se", "fixed")
    table = summarize(read, capacity, sig, critical_rel_tol=0.1).set_index("teacher")
    assert table.n_c.tolist() == [10, 20] and table.n_c_std.tolist() == pytest.approx([2**0.5] * 2)
    assert table.k_star.tolist() == [10, 20]  # teacher 1: width 20 reaches 0.2, width 40 reaches 0.1
    assert table.k_star_11.tolist() == [10, 20]
    assert table.nc_over_ht.tolist() == [1.0, 0.5] and table.nc_over_kstar.tolist() == [1.0, 1.0]
    assert table.n_detect.tolist() == [2, 1]  # removal MSE > 0.1 x eps: 0.5, 0.02 > 0.01; 0.03 > 0.02
    assert table.signal_median.tolist() == pytest.approx([0.2, 0.1]) and table.signal_max.tolist() == pytest.approx([5.0, 0.15])
    assert table.tracks.tolist() == [True, False]
    assert table.h_t_over_d.tolist() == [2.0, 8.0]


def test_readings_on_a_path_take_the_rules_strength():
    rows = []
    for k, val in ((0.5, 1.0), (1.0, 0.5), (2.0, 0.502)):  # means 1.005, 0.505 (se 0.005), 0.507
        rows += [{"teacher": 0, "trial": t, "strength": k, "val_loss": val + 0.01 * t, "effective_dim": 5, "status": "ok",
                  "critical_point": 5, "test_loss": val} for t in (0, 1)]
    read = readings(pd.DataFrame(rows), "best", "path")
    assert sorted(read[read.setting == "fixed"].strength.unique()) == [1.0]
    assert read[read.setting == "path"].strength.unique().tolist() == [1.0]
    read = readings(pd.DataFrame(rows), "1se", "path")  # 0.507 <= 0.505 + 0.005: the stronger 2.0
    assert read[read.setting == "path"].strength.unique().tolist() == [2.0] and len(read[read.setting == "path"]) == 2


def test_best_split_and_explain_know_a_perfect_predictor():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    label = np.array([False, False, False, True, True, True])
    assert best_split(x, label) == (3.5, 1.0)
    assert best_split(-x, label) == (-3.5, 1.0)  # either way round
    table = pd.DataFrame({"good": x, "noise": [3.0, 1.0, 6.0, 2.0, 5.0, 4.0], "nc_over_ht": x / 10, "tracks": label})
    e = explain(table, ["good", "noise"]).set_index("predictor")
    assert e.loc["good", "spearman"] == pytest.approx(1.0) and e.loc["good", "accuracy"] == 1.0
    assert e.loc["noise", "accuracy"] < 1.0 and e.loc["good", "majority_rate"] == 0.5


def test_collapse_table_is_perfect_for_the_right_scale_and_counts_teachers_left_out():
    """delta(k) = A_h max(0, 1 - k/h): an exact (piecewise-linear) master curve in k/h - 1 for h = h_T, none in raw k - h."""
    rows, summary = [], []
    for i, (h, amp, n_c) in enumerate(((10, 1.0, 7), (20, 3.0, 8), (40, 0.5, 30))):
        kept = np.arange(0, 61)
        rows.append(pd.DataFrame({"teacher": i, "setting": "fixed", "kept": kept, "delta": amp * np.clip(1 - kept / h, 0, None)}))
        summary.append({"teacher": i, "setting": "fixed", "h_t": h, "n_c": n_c, "k_star": np.nan if i == 2 else h})
    table = collapse_table(pd.concat(rows), pd.DataFrame(summary)).set_index("rescaled_by")
    assert table.loc["h_t", "spread_after"] == pytest.approx(0.0, abs=1e-9) and table.loc["h_t", "spread_before"] > 0.3
    assert table.loc["n_c", "spread_after"] > 0.1  # the wrong scale does not collapse
    assert table.loc["k_star", "teachers"] == 2 and table.loc["k_star", "left_out"] == 1
    assert table.loc["k_star", "spread_after"] == pytest.approx(0.0, abs=1e-9)


def test_the_shipped_recovery_config_is_the_documented_grid():
    cfg = load_recovery_config(SHIPPED_CONFIGS / "recovery" / "cpu-recovery.yaml")
    assert (cfg.teacher_widths, cfg.input_dims, cfg.teacher_seeds) == ([5, 10, 20, 50, 100], [5, 10, 20, 40], [1234, 1])
    assert cfg.regularization.strengths() == [0.05, 0.2, 1.0, 5.0] and cfg.student_width == 160
    assert cfg.regularization.n_fit(cfg.n_train) == 3200


def test_config_checks():
    with pytest.raises(ConfigError, match="student_width 50 must exceed the widest teacher"):
        parse_config({"student_width": 50}, model=RecoveryConfig)
    with pytest.raises(ConfigError, match="must include 1.0"):
        parse_config({"regularization": {"mode": "path", "multipliers": [0.5, 2.0]}}, model=RecoveryConfig)
    with pytest.raises(ConfigError, match="teacher_widths.0"):
        parse_config({"teacher_widths": [0]}, model=RecoveryConfig)


TINY = {"teacher_widths": [4, 8], "input_dims": [3], "teacher_seeds": [1], "n_train": 200, "n_test": 100, "student_width": 12,
        "spectral": {"epochs": 3}, "direct": {"epochs": 3}, "capacity_fractions": [0.5, 1.0]}


def test_a_tiny_diagram_runs_and_its_tables_agree():
    cfg = parse_config(TINY, model=RecoveryConfig)
    tables = run_recovery(cfg, log=lambda m: None)
    assert len(tables["students"]) == 2 * 2 * 4 and (tables["students"].status == "ok").all()
    assert sorted(tables["capacity"].groupby("teacher").width.unique().map(sorted).map(tuple)) == [(2, 4), (4, 8)]
    assert len(tables["curves"]) == 16 * 12 and len(tables["signals"]) == 4 + 8
    d = analyse(tables, cfg)
    s = d["summary"].set_index(["teacher", "setting"])
    st = tables["students"]
    fixed = st[(st.teacher == 1) & (st.strength == 1.0)]
    assert s.loc[(1, "fixed"), "n_c"] == fixed.critical_point.mean() and s.loc[(1, "fixed"), "eps"] == pytest.approx(fixed.test_loss.mean())
    # a curve's last point is the full student's test loss
    last = tables["curves"].groupby(["teacher", "trial", "strength"]).test_loss.last().reset_index()
    merged = last.merge(st, on=["teacher", "trial", "strength"])
    np.testing.assert_allclose(merged.test_loss_x, merged.test_loss_y, rtol=1e-5)
    assert set(d["collapse"].rescaled_by) == {"h_t", "n_c", "k_star"}


def test_the_script_refuses_a_bad_config_and_a_used_folder(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("student_width: 5\n")
    env = {"PYTHONPATH": str(ROOT / "src"), "MPLCONFIGDIR": str(tmp_path / "mpl"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "recovery.py"), str(bad), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "student_width 5" in r.stderr
    assert not (tmp_path / "o").exists()
    used = tmp_path / "used"
    used.mkdir()
    (used / "mine.txt").write_text("keep")
    good = tmp_path / "good.yaml"
    good.write_text("{}\n")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "recovery.py"), str(good), "--out", str(used)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "is not empty" in r.stderr and (used / "mine.txt").read_text() == "keep"


def test_the_recovery_script_writes_its_own_folder_and_refuses_a_users(tmp_path):
    import subprocess
    import sys

    import yaml

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({
        "teacher_widths": [3, 6], "input_dims": [4, 8], "teacher_seeds": [1234], "n_train": 300, "n_test": 200, "trials": 2,
        "student_width": 12, "spectral": {"epochs": 3}, "direct": {"epochs": 3},
        "regularization": {"mode": "path", "multipliers": [0.2, 1.0], "validation_fraction": 0.2, "rule": "1se"}}))
    script = Path(__file__).resolve().parents[1] / "scripts" / "recovery.py"
    run = subprocess.run([sys.executable, str(script), str(cfg), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    summary = pd.read_parquet(tmp_path / "out" / "summary.parquet")
    assert len(summary) == 2 * 2 * 2 and set(summary.setting) == {"fixed", "path"}  # 4 teachers x 2 settings
    assert (tmp_path / "out" / "figures" / "heatmaps.png").stat().st_size > 1000
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("mine\n")
    refused = subprocess.run([sys.executable, str(script), str(cfg), "--out", str(mine)], capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.startswith("error: ") and "not made by eigenprune" in refused.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.md"]
