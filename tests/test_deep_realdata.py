"""Deep students, joint minimal-architecture search, digits and CSV data."""

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import TINY
from eigenprune.batched.curves import joint_search, pruning_curves
from eigenprune.batched.ensemble import Ensemble
from eigenprune.batched.train import evaluate
from eigenprune.cli import app
from eigenprune.core.plans import LayerPlan, make_student
from eigenprune.experiments.builders import student_plans
from eigenprune.experiments.config import parse_config
from eigenprune.experiments.data import DataError, csv_data
from eigenprune.experiments.runner import run_experiment
from eigenprune.pruning.importance import node_importance
from eigenprune.reporting.report import build_report

runner = CliRunner()


def _sparse_deep_student():
    """3 inputs -> 8 nodes (3 used) -> 6 nodes (2 used) -> sum; unused nodes have zero weights."""
    s = make_student(3, [LayerPlan(8), LayerPlan(6), LayerPlan(1, "fixed")], seed=0, dtype=torch.float64)
    with torch.no_grad():
        s[0].phi.zero_()
        s[0].phi[:3] = -torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, -1.0], [0.3, 0.0, 1.0]], dtype=torch.float64)
        s[2].phi.zero_()
        s[2].phi[:2, :3] = -torch.tensor([[1.0, -0.5, 0.8], [0.2, 1.0, 0.4]], dtype=torch.float64)
    return s


def test_joint_search_recovers_the_used_widths_of_every_layer():
    ens = Ensemble([_sparse_deep_student(), _sparse_deep_student()])
    x = torch.randn(1, 400, 3, dtype=torch.float64)
    y = ens(x[[0, 0]])[0].squeeze(-1).unsqueeze(0) * 1.0
    y = y + 0.01 * torch.randn_like(y)  # full loss > 0, so there is a tolerance to spend
    ti = torch.tensor([0, 0])
    scores = [node_importance(ens.layers[0]), node_importance(ens.layers[1])]
    widths, keep = joint_search(ens, scores, x, y, ti, "regression", rel_tol=1e-6)
    assert [w.tolist() for w in widths] == [[3, 3], [2, 2]]
    full = evaluate(ens, x, y, ti, "regression")
    torch.testing.assert_close(evaluate(ens, x, y, ti, "regression", kept=keep), full)
    # an unbounded tolerance prunes every layer to one node
    widths, _ = joint_search(ens, scores, x, y, ti, "regression", rel_tol=1e12)
    assert [w.tolist() for w in widths] == [[1, 1], [1, 1]]


def test_deep_plans_regularize_every_hidden_layer():
    cfg = parse_config({"student": {"widths": [40], "rest": [30, 20], "deep": True}})
    plans = student_plans(cfg, "spectral", 40, strength=2.0)
    assert [(p.width, p.kind, p.l2_phi) for p in plans] == [(40, "spectral", 0.02), (30, "spectral", 0.02), (20, "spectral", 0.02),
                                                            (1, "fixed", 0.0)]
    shallow = student_plans(parse_config({}), "spectral", 40)
    assert [(p.kind, p.l2_phi) for p in shallow[1:]] == [("direct", 0.0), ("fixed", 0.0)]
    head = student_plans(parse_config({"student": {"head": "linear"}}), "direct", 8, n_outputs=10)[-1]
    assert (head.width, head.kind, head.bias) == (10, "direct", True)


def test_deep_run_reports_every_layer(tmp_path):
    cfg = parse_config({**TINY, "workers": 1, "student": {"widths": [12], "rest": [8], "deep": True}})
    run_experiment(cfg, tmp_path / "run", quiet=True, finish=build_report)
    layers = pd.read_parquet(tmp_path / "run" / "layers.parquet")
    assert sorted(layers.layer.unique()) == [0, 1]
    assert (layers.search_width <= layers.layer_width).all() and (layers.search_width >= 1).all()
    assert set(layers.teacher_layer_width) == {20, 10}
    res = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert res.search_widths.str.count(",").eq(1).all()
    curves = pd.read_parquet(tmp_path / "run" / "curves.parquet")
    assert len(curves[curves.layer == 1]) == len(res) * 8
    assert (tmp_path / "run" / "figures" / "layer_curves.png").exists()
    assert "Per hidden layer" in (tmp_path / "run" / "report.html").read_text()


def test_accuracy_curves_match_masked_predictions():
    ens = Ensemble([make_student(5, [LayerPlan(7), LayerPlan(3, "direct", bias=True)], seed=s) for s in (1, 2)])
    x, y = torch.randn(1, 50, 5), torch.randint(0, 3, (1, 50))
    ti = torch.tensor([0, 0])
    scores = node_importance(ens.layers[0])
    acc = pruning_curves(ens, 0, scores, x, y, ti, "classification", metric="accuracy")
    from eigenprune.pruning.keep import top_k_mask
    for k in (1, 4, 7):
        pred = ens(x[ti], kept={0: top_k_mask(scores, k)}).argmax(-1)
        torch.testing.assert_close(acc[:, k - 1], (pred == y[ti]).float().mean(-1))


def test_digits_run_end_to_end(tmp_path):
    body = {"trials": 2, "workers": 1, "data": {"source": "digits"}, "student": {"widths": [16], "rest": [], "head": "linear"},
            "spectral": {"epochs": 4, "batch_size": 64}, "direct": {"epochs": 4, "batch_size": 64}}
    run_experiment(parse_config(body), tmp_path / "run", quiet=True, finish=build_report)
    res = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert res.test_accuracy.between(0.5, 1.0).all()  # 4 epochs on digits already beat chance (0.1) by far
    assert res.teacher_kind.eq("digits").all()
    layers = pd.read_parquet(tmp_path / "run" / "layers.parquet")
    assert layers.width_within_accuracy_tol.between(1, 16).all()
    curves = pd.read_parquet(tmp_path / "run" / "curves.parquet")
    full = curves[curves.kept == 16].merge(res, on=["method", "width", "trial"])
    np.testing.assert_allclose(full.test_accuracy_x, full.test_accuracy_y, atol=1e-6)
    assert (tmp_path / "run" / "figures" / "accuracy_curves.png").exists()


def _csv(tmp_path, df):
    path = tmp_path / "data.csv"
    df.to_csv(path, index=False)
    return str(path)


def test_csv_errors_name_the_column(tmp_path):
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"a": rng.normal(size=20), "b": rng.normal(size=20), "y": rng.normal(size=20)})
    path = _csv(tmp_path, df)
    with pytest.raises(DataError, match=r"no column 'target' in .*columns are \['a', 'b', 'y'\]"):
        csv_data(path, "target", None, "regression", 2, 0, 0.25)
    with pytest.raises(DataError, match="data.csv.features: no column"):
        csv_data(path, "y", ["a", "zz"], "regression", 2, 0, 0.25)
    with pytest.raises(DataError, match=r"non-integer values \(e.g. -1.259\d*\); task classification needs class labels"):
        csv_data(path, "y", None, "classification", 2, 0, 0.25)
    df.loc[3, "b"] = np.nan
    with pytest.raises(DataError, match="column 'b' has 1 missing"):
        csv_data(_csv(tmp_path, df), "y", None, "regression", 2, 0, 0.25)
    df = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "label": ["cat", "dog", "cat", "dog"]})
    with pytest.raises(DataError, match="is not numeric .*use task: classification"):
        csv_data(_csv(tmp_path, df), "label", None, "regression", 2, 0, 0.25)
    data = csv_data(_csv(tmp_path, df), "label", None, "classification", 2, 0, 0.25)
    assert data.n_outputs == 2 and data.y_train.dtype == torch.long and data.x_test.shape == (2, 1, 1)


def test_csv_through_the_cli(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 3))
    df = pd.DataFrame(x, columns=["f1", "f2", "f3"]).assign(y=np.maximum(x[:, 0], 0) - 0.5 * x[:, 1])
    cfg = tmp_path / "csv.yaml"
    cfg.write_text(yaml.safe_dump({"trials": 2, "workers": 1, "data": {"source": "csv", "csv": {"path": _csv(tmp_path, df), "target": "y"}},
                                   "student": {"widths": [8], "rest": [], "head": "linear"},
                                   "spectral": {"epochs": 3, "batch_size": 50}, "direct": {"epochs": 3, "batch_size": 50}}))
    result = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert len(pd.read_parquet(tmp_path / "run" / "results.parquet")) == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": {"source": "csv", "csv": {"path": _csv(tmp_path, df), "target": "nope"}},
                                   "student": {"head": "linear"}}))
    result = runner.invoke(app, ["run", str(bad), "--out", str(tmp_path / "bad"), "--quiet"])
    assert result.exit_code == 2 and "no column 'nope'" in result.stderr and result.stderr.count("\n") == 1
    result = runner.invoke(app, ["run", "--set", "data.source=digits", "--out", str(tmp_path / "bad2")])
    assert result.exit_code == 2 and "needs student.head: linear" in result.stderr
