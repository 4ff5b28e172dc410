"""Critical point, exponential fit, collapse measure, path statistics and the report builder."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import TINY
from eigenprune.cli import app
from eigenprune.core.convert import spectralize
from eigenprune.core.plans import LayerPlan, make_student
from eigenprune.experiments.analysis import collapse_measure, critical_point, fit_exponential, path_products, teacher_comparison
from eigenprune.experiments.builders import make_teacher
from eigenprune.experiments.config import config_description, load_config, parse_config, shipped_configs
from eigenprune.experiments.runner import run_experiment


def _transition(n_c, n, scale=1.0, rate=0.3, noise=0.0, seed=0):
    kept = np.arange(1, n + 1)
    delta = np.where(kept < n_c, scale * (np.exp(rate * (n_c - kept)) - 1 + 0.05), 0.0)
    delta = delta + noise * np.random.default_rng(seed).random(n) * scale * 0.001
    return kept, delta


@pytest.mark.parametrize("n_c", [5, 20, 37])
def test_critical_point_finds_the_transition(n_c):
    kept, delta = _transition(n_c, 80, noise=1.0)
    assert critical_point(kept, delta, tol=0.01) == n_c
    assert critical_point(kept, delta, tol=1e-9) == 80  # a tolerance below the noise floor: never free
    # a gradual curve (no transition) puts n_c far above
    gradual = 3 * np.exp(-0.02 * kept)
    assert critical_point(kept, gradual - gradual[-1], tol=0.01) > 60


def test_critical_point_edge_cases():
    assert critical_point(np.arange(1, 5), np.zeros(4), 0.1) == 1
    with pytest.raises(ValueError, match="non-empty and of one shape"):
        critical_point(np.arange(3), np.zeros(4), 0.1)


def test_exponential_fit_recovers_parameters():
    x = np.arange(-19, 0, dtype=float)
    y = 0.02 * np.exp(-0.25 * x) + 0.01
    fit = fit_exponential(x, y)
    assert fit["a"] == pytest.approx(0.02, rel=1e-3)
    assert fit["b"] == pytest.approx(0.25, rel=1e-3)
    assert fit["c"] == pytest.approx(0.01, abs=1e-4)
    assert fit["r2"] > 0.9999
    assert np.isnan(fit_exponential(x[:3], y[:3])["a"])


def test_collapse_measure_on_curves_of_one_universal_shape():
    """delta = A * f(n / h_T - 1): rescaled curves coincide, raw ones do not."""
    curves = []
    for h_t, amp in ((20, 1.0), (100, 0.2), (50, 3.0)):
        kept = np.arange(1, 3 * h_t + 1)
        x = kept / h_t - 1
        curves.append((h_t, kept, amp * np.where(x < 0, 1 - (1 + x) ** 2, 0.0)))
    m = collapse_measure(curves)
    assert m["spread_after"] < 0.01
    assert m["spread_before"] > 0.5
    assert m["ratio"] < 1e-2
    # curves of different shapes do not collapse
    other = [(20, np.arange(1, 61), np.where(np.arange(1, 61) < 20, np.arange(19, -41, -1).clip(0) ** 3, 0.0))] + curves[:1]
    assert collapse_measure(other)["spread_after"] > 0.1


def test_path_products_and_teacher_comparison():
    w1 = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    w2 = torch.tensor([[2.0, 0.5]])
    assert path_products(w1, w2).tolist() == [-0.5, 1.5, 2.0, 4.0]
    teacher = make_teacher(10, [20, 10], seed=3)
    # a student that *is* the teacher plus 30 dead nodes is at distance 0 after pruning to 20 nodes
    student = make_student(10, [LayerPlan(50), LayerPlan(10, "direct"), LayerPlan(1, "fixed")], seed=1)
    with torch.no_grad():
        student[0].phi.zero_()
        student[0].phi[:20] = -teacher[0].weight
        student[2].phi.zero_()
        student[2].phi[:, :20] = -teacher[2].weight
    cmp = teacher_comparison(student, teacher, 20)
    assert cmp["path_distance"] == pytest.approx(0.0, abs=1e-7)
    assert cmp["in_strength_distance"] == pytest.approx(0.0, abs=1e-6)
    far = teacher_comparison(spectralize(make_teacher(10, [20, 10], seed=4)), teacher, 20)
    assert far["path_distance"] > 1e-3


def test_shipped_configs_are_valid():
    names = shipped_configs()
    assert {"paper", "hard100", "linear", "hidden_manifold", "cpu-paper"} <= set(names)
    paper = load_config("paper")
    assert paper.trials == 30 and paper.student.widths == [10, 20, 40, 60, 200, 500, 800, 1000, 1500]
    assert (paper.spectral.lr, paper.spectral.batch_size, paper.spectral.epochs) == (0.005, 300, 2000)
    assert (paper.direct.lr, paper.direct.batch_size, paper.data.n_train) == (0.002, 500, 10000)
    for name, path in names.items():
        assert load_config(path).name == name and 0 < len(config_description(path)) <= 100


def test_report_rebuilds_from_a_stored_run(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "name": "tiny", "student": {"widths": [24, 30]}}))
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "eigenprune", "run", str(cfg), "--out", str(run), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for p in (run / "figures").iterdir():
        p.unlink()
    (run / "report.html").unlink()
    before = (run / "results.parquet").read_bytes()
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    figs = {p.stem for p in (run / "figures").glob("*.png")}
    assert {"importance_histograms", "effective_dimension", "losses", "pruning_curves", "collapse", "paths"} <= figs
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(figs)
    assert "src='http" not in page and 'src="http' not in page
    for text in ("Claims and what this run measured", "Spectral effective dimension", "critical point", "Wasserstein",
                 "Machine:", "wall time", "exponential fit"):
        assert text in page, text
    assert (run / "results.parquet").read_bytes() == before  # nothing retrained or rewritten
    # and a missing table is one clear line, exit 2
    (run / "curves.parquet").unlink()
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 2 and "curves.parquet is missing" in result.stderr


def test_collapse_command_across_runs(tmp_path):
    runs = []
    for h_t in (6, 12):
        body = {**TINY, "name": f"h{h_t}", "methods": ["spectral"], "student": {"widths": [2 * h_t, 3 * h_t]},
                "data": {"n_train": 200, "n_test": 150, "teacher": {"widths": [h_t, 4]}}}
        cfg = tmp_path / f"h{h_t}.yaml"
        cfg.write_text(yaml.safe_dump(body))
        result = CliRunner().invoke(app, ["run", str(cfg), "--out", str(tmp_path / f"h{h_t}"), "--quiet", "--set", "workers=1"])
        assert result.exit_code == 0, result.output
        runs.append(str(tmp_path / f"h{h_t}"))
    before = {p: p.read_bytes() for r in runs for p in Path(r).rglob("*") if p.is_file()}
    result = CliRunner().invoke(app, ["collapse", *runs, "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert {p: p.read_bytes() for r in runs for p in Path(r).rglob("*") if p.is_file()} == before  # inputs untouched
    data = json.loads((tmp_path / "c" / "collapse.json").read_text())
    assert len(data["curves"]) == 4 and data["spread_before"] > 0
    assert data["ratio"] == pytest.approx(data["spread_after"] / data["spread_before"])  # the reported ratio is the measured one
    nc = data["by_critical_point"]
    assert nc["ratio"] == pytest.approx(nc["spread_after"] / nc["spread_before"])
    assert (tmp_path / "c" / "collapse_nc.png").exists()
    assert (tmp_path / "c" / "collapse.png").stat().st_size > 1000


def test_a_tiny_run_shows_the_papers_effect(tmp_path):
    """The effect itself, on a run of a few seconds: spectral students concentrate their function in fewer nodes
    than direct students of the same width, and keeping only their top nodes costs them less."""
    body = {**TINY, "trials": 2, "workers": 1, "data": {"n_train": 500, "n_test": 500},  # 4,000 Adam steps: ~6 s
            "student": {"widths": [60]}, "spectral": {"epochs": 200, "batch_size": 25}, "direct": {"epochs": 200, "batch_size": 25}}
    run = run_experiment(parse_config(body), tmp_path / "run", quiet=True)
    res = pd.read_parquet(run / "results.parquet")
    assert (res.status == "ok").all()
    eff = res.groupby("method").effective_dim.mean()
    assert eff["spectral"] < 0.8 * eff["direct"], eff.to_dict()  # measured: 39 vs 60
    curves = pd.read_parquet(run / "curves.parquet")
    at = curves[(curves.layer == 0) & (curves.kept == 25)].groupby("method").delta_loss.mean()
    assert at["spectral"] < 0.5 * at["direct"], at.to_dict()  # measured: 0.057 vs 0.25


def test_the_full_scale_run_rebuilds_from_its_stored_tables(tmp_path):
    """results/paper-full (the real full-scale run, issue #25) is complete enough for `eigenprune report` to rebuild
    every figure, the path figure included, and its summary holds the 540 trainings docs/reproduction.md reports."""
    stored = Path(__file__).resolve().parents[1] / "results" / "paper-full"
    summary = json.loads((stored / "summary.json").read_text())
    groups = pd.DataFrame(summary["groups"])
    assert len(groups) == 18 and (groups.trials_ok == 30).all() and (groups.trials_failed == 0).all()
    spectral = groups[(groups.method == "spectral") & (groups.width >= 40)]
    assert spectral.effective_dim_mean.between(20, 30).all()  # the headline claim, as docs/reproduction.md states it
    copy = tmp_path / "paper-full"
    shutil.copytree(stored, copy)
    result = CliRunner().invoke(app, ["report", str(copy)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (copy / "figures").iterdir()) == [
        "collapse.png", "effective_dimension.png", "importance_histograms.png", "losses.png", "paths.png", "pruning_curves.png"]
    assert (copy / "report.html").is_file()
