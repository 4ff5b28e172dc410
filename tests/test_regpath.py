"""Regularization path: selection rules, path-vs-plain equivalence, multi-teacher runs."""

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY
from eigenprune.experiments.config import ConfigError, parse_config
from eigenprune.experiments.regpath import best_rule, one_se_rule, select_strengths, stable_rule
from eigenprune.experiments.runner import run_experiment
from eigenprune.pruning.checkpoint import load_model
from eigenprune.reporting.report import build_report


def test_best_and_one_se_rules_on_known_curves():
    k = np.array([0.1, 0.3, 1.0, 3.0, 10.0])
    mean = np.array([0.50, 0.20, 0.21, 0.26, 0.90])
    se = np.array([0.02, 0.02, 0.02, 0.02, 0.02])
    assert best_rule(k, mean) == 0.3
    assert one_se_rule(k, mean, se) == 1.0  # 0.21 <= 0.20 + 0.02, 0.26 is not
    assert one_se_rule(k, mean, se * 4) == 3.0  # a noisier best admits a stronger penalty
    assert one_se_rule(k, mean, np.full(5, np.nan)) == 0.3  # one trial: no SE, the rule falls back to best
    assert best_rule(np.array([1.0, 2.0]), np.array([0.1, 0.1])) == 2.0  # ties go to the stronger penalty


def test_stability_rule_picks_inside_the_longest_plateau():
    k = np.array([0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0])
    dim = np.array([48.7, 35.3, 30.7, 25.7, 21.7, 22.3, 22.7, 16.0])  # measured shape: a plateau at ~22 for x0.5..x2
    val = np.array([0.0109, 0.0110, 0.0106, 0.0108, 0.0117, 0.0203, 0.0417, 0.0863])
    assert stable_rule(k, val, dim) == 0.5  # the plateau {0.5, 1, 2}; its lowest validation loss
    assert stable_rule(k[::-1], val[::-1], dim[::-1]) == 0.5  # order does not matter
    steep = np.array([87.3, 69.0, 57.7, 46.7, 33.3, 25.3, 20.7, 14.3])  # no two neighbours within 15%
    assert stable_rule(k, val, steep) is None
    assert stable_rule(k, val, steep, plateau_tol=0.2) == 0.1  # longest run within 20%: {0.05, 0.1, 0.2}


def test_select_strengths_flags_every_trial_of_the_choice():
    rows = []
    for method, losses in (("spectral", [0.3, 0.1, 0.12, 0.5]), ("direct", [0.1, 0.2, 0.3, 0.4])):
        for i, k in enumerate([0.5, 1.0, 2.0, 4.0]):
            for t, noise in enumerate((-0.03, 0.03)):  # SE of a mean = 0.03
                rows.append({"teacher_index": 0, "method": method, "width": 50, "strength": k, "trial": t,
                             "val_loss": losses[i] + noise, "status": "ok"})
    out = select_strengths(pd.DataFrame(rows))
    chosen = out[out.selected_best].groupby("method").strength.unique()
    assert chosen["spectral"].tolist() == [1.0] and chosen["direct"].tolist() == [0.5]
    one_se = out[out.selected_1se].groupby("method").strength.unique()
    assert one_se["spectral"].tolist() == [2.0] and one_se["direct"].tolist() == [0.5]
    assert out.selected_best.sum() == 4  # both trials of one strength per method


def test_validation_split_errors_name_the_value():
    cfg = parse_config({"data": {"n_train": 3}, "regularization": {"mode": "path", "validation_fraction": 0.1}})
    with pytest.raises(ConfigError, match="validation_fraction 0.1 leaves no training or no validation"):
        cfg.regularization.n_fit(cfg.data.n_train)
    assert parse_config({"regularization": {"mode": "path"}}).regularization.n_fit(100) == 80


def _cfg(**over):
    body = {**TINY, "methods": ["spectral"], "workers": 1, "save_students": True, **over}
    return parse_config(body)


def test_one_strength_of_a_path_equals_a_plain_run_with_that_strength(tmp_path):
    path = _cfg(regularization={"mode": "path", "multipliers": [0.5, 3.0], "validation_fraction": 0.25})
    run_experiment(path, tmp_path / "path", quiet=True, finish=build_report)
    # the path trains on the first 150 of 200 patterns; a plain run with n_train = 150 sees the same ones
    plain = _cfg(data={"n_train": 150, "n_test": 150}, spectral={"epochs": 3, "batch_size": 50, "l2_phi": 0.03, "l2_lam": 0.0015})
    run_experiment(plain, tmp_path / "plain", quiet=True, finish=build_report)
    rp = pd.read_parquet(tmp_path / "path" / "results.parquet")
    rq = pd.read_parquet(tmp_path / "plain" / "results.parquet")
    assert sorted(rp.strength.unique()) == [0.5, 3.0] and rp.val_loss.notna().all()
    assert rp.selected_best.any() and rp.selected_1se.any()
    for (w, t), q in rq.groupby(["width", "trial"]):
        p = rp[(rp.width == w) & (rp.trial == t) & (rp.strength == 3.0)].iloc[0]
        assert p.l2_phi == pytest.approx(0.03) and p.l2_lam == pytest.approx(0.0015)
        assert p.train_loss == pytest.approx(q.train_loss.iloc[0], rel=1e-5)
        a, _ = load_model(tmp_path / "path" / p.checkpoint)
        b, _ = load_model(tmp_path / "plain" / q.checkpoint.iloc[0])
        for x, y in zip(a.state_dict().values(), b.state_dict().values()):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_several_teachers_in_one_run(tmp_path):
    cfg = _cfg(teachers=[{"widths": [5, 4]}, {"widths": [9, 4]}], regularization={"mode": "path", "multipliers": [0.5, 2.0]})
    run_experiment(cfg, tmp_path / "run", quiet=True, finish=build_report)
    res = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert sorted(res.teacher_width.unique()) == [5, 9]
    assert len(res) == 2 * 2 * 2 * 2  # teachers x widths x trials x strengths
    assert res.groupby(["teacher_index", "width"]).selected_1se.sum().eq(2).all()  # the trials of one strength each
    figs = {p.name for p in (tmp_path / "run" / "figures").glob("*.png")}
    assert "regularization_path.png" in figs
    assert {"effective_dimension_t0_hT5.png", "effective_dimension_t1_hT9.png"} <= figs
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Regularization path" in page and "1se-selected strength" in page and "h_T = 9" in page
