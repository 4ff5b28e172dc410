"""A diverging learning rate: students recorded as failed, everyone else unaffected, outputs still built."""

import json
import math

import pandas as pd
import yaml
from typer.testing import CliRunner

from conftest import TINY
from eigenprune.cli import app
from eigenprune.experiments.config import parse_config
from eigenprune.experiments.runner import run_experiment
from eigenprune.reporting.report import build_report

runner = CliRunner()


def test_a_diverging_method_fails_cleanly_and_leaves_the_other_identical(tmp_path):
    cfg = tmp_path / "bad-lr.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "workers": 1, "direct": {**TINY["direct"], "lr": 1e10}}))
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(cfg), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output

    res = pd.read_parquet(out / "results.parquet")
    bad = res[res.method == "direct"]
    assert len(bad) == 4 and (bad.status == "failed").all()
    assert (bad.failed_step >= 0).all() and (bad.effective_dim == -1).all()
    assert bad.fail_reason.str.match(r"loss became (nan|inf|-inf) at step \d+ \(epoch \d+\); frozen from the end of that epoch").all()
    assert all(f"at step {s} " in r for s, r in zip(bad.failed_step, bad.fail_reason))
    good = res[res.method == "spectral"].reset_index(drop=True)
    assert (good.status == "ok").all() and (good.failed_step == -1).all() and (good.fail_reason == "").all()

    alone = run_experiment(parse_config({**TINY, "workers": 1, "methods": ["spectral"]}), tmp_path / "alone", quiet=True)
    pd.testing.assert_frame_equal(good, pd.read_parquet(alone / "results.parquet"), check_exact=True)
    curves = pd.read_parquet(out / "curves.parquet")
    pd.testing.assert_frame_equal(curves[curves.method == "spectral"].reset_index(drop=True),
                                  pd.read_parquet(alone / "curves.parquet"), check_exact=True)

    groups = {(g["method"], g["width"]): g for g in json.loads((out / "summary.json").read_text())["groups"]}
    assert len(groups) == 4
    for w in (6, 12):
        assert groups[("direct", w)]["trials_failed"] == 2 and groups[("direct", w)]["trials_ok"] == 0
        assert groups[("direct", w)]["test_loss_mean"] is None
        assert groups[("spectral", w)]["trials_failed"] == 0 and math.isfinite(groups[("spectral", w)]["test_loss_mean"])
    page = (out / "report.html").read_text()
    assert "Failed students (4)" in page and "loss became" in page
    assert "direct: N=" not in page  # no means of failed students in the claims table


def test_a_run_where_every_student_diverges_still_writes_its_report(tmp_path):
    out = run_experiment(parse_config({**TINY, "workers": 1, "methods": ["spectral"], "spectral": {**TINY["spectral"], "lr": 1e10}}),
                         tmp_path / "run", quiet=True, finish=build_report)
    res = pd.read_parquet(out / "results.parquet")
    assert (res.status == "failed").all() and len(res) == 4
    assert all(g["trials_ok"] == 0 and g["trials_failed"] == 2 for g in json.loads((out / "summary.json").read_text())["groups"])
    for fig in ("importance_histograms", "effective_dimension", "pruning_curves", "losses"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000
    assert "Failed students (4)" in (out / "report.html").read_text()
