import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from eigenprune.cli import app
from eigenprune.experiments.compare import CompareConfig, load_compare_config
from eigenprune.experiments.config import ConfigError
from eigenprune.pruning.criteria import CRITERIA

runner = CliRunner()

TINY_COMPARE = {"trials": 2, "widths": [6, 24], "data": {"n_train": 300, "n_test": 200}, "train": {"epochs": 4, "batch_size": 50},
                "critical_tol": 0.05}


def test_compare_writes_one_row_per_student_and_criterion_and_a_markdown_table(tmp_path):
    cfg = tmp_path / "cmp.yaml"
    cfg.write_text(yaml.safe_dump(TINY_COMPARE))
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(cfg), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.stderr
    rows = pd.read_parquet(out / "compare.parquet")
    assert len(rows) == len(CRITERIA) * 2 * 2
    assert set(rows.criterion) == set(CRITERIA) and (rows.status == "ok").all()
    curves = pd.read_parquet(out / "compare_curves.parquet")
    for r in rows.itertuples():  # n_c recomputed from the stored curve: the smallest k from which every delta <= tol
        c = curves[(curves.criterion == r.criterion) & (curves.width == r.width) & (curves.trial == r.trial)].sort_values("kept")
        above = c.kept[c.delta_loss > TINY_COMPARE["critical_tol"]]
        want = 1 if above.empty else min(int(above.max()) + 1, r.width)
        assert r.critical_point == want, (r.criterion, r.width, r.trial)
    assert rows[rows.width == 6].delta_at_teacher.isna().all()  # N < h_T: no ΔMSE at kept = h_T
    assert rows[rows.width == 24].delta_at_teacher.notna().all()
    # criteria that train alike share their students: same test loss, different rankings
    shared = rows[rows.criterion.isin(["feature_norm", "random", "taylor"])].groupby(["width", "trial"]).test_loss.nunique()
    assert (shared == 1).all()
    assert not rows[rows.criterion == "eigenvalue"].test_loss.equals(rows[rows.criterion == "feature_norm"].test_loss)
    assert len(curves) == len(CRITERIA) * 2 * (6 + 24)
    assert (curves[curves.kept == curves.width].delta_loss == 0).all()
    summary = pd.read_parquet(out / "compare_summary.parquet")
    assert len(summary) == len(CRITERIA) * 2 and (summary.trials == 2).all()
    md = (out / "compare.md").read_text()
    assert md.count("\n| ") == 1 + len(CRITERIA) * 2  # header + one line per (criterion, N)
    assert "| eigenvalue | 24 |" in md and "h_T = 20" in md
    assert "| eigenvalue | 24 |" in result.stdout
    assert CompareConfig.model_validate(yaml.safe_load((out / "config.yaml").read_text())).widths == [6, 24]


@pytest.mark.parametrize("body, message", [
    ({"criteria": ["eigenvalue", "l0"]}, "unknown criterion 'l0'"),
    ({"params": {"slimming": {"gamma": 1.0}}}, "params.slimming: unknown parameter in ['gamma']"),
    ({"widths": [0]}, "widths.0: Input should be greater than 0"),
    ({"bogus": 1}, "bogus: unknown key"),
])
def test_compare_config_errors_name_the_field(tmp_path, body, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(body))
    with pytest.raises(ConfigError) as err:
        load_compare_config(cfg)
    assert message in str(err.value)
    result = runner.invoke(app, ["compare", str(cfg), "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and message in result.stderr
    assert not (tmp_path / "o").exists()


def test_compare_defaults_are_the_documented_run():
    cfg = load_compare_config(None)
    assert cfg.widths == [40, 100, 200] and cfg.trials == 3 and cfg.train.epochs == 500
    assert cfg.data.n_train == 4000 and cfg.criteria == list(CRITERIA)
    assert load_compare_config(None, {"trials": 5}).trials == 5
