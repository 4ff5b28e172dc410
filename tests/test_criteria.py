import copy

import numpy as np
import pytest
import torch
from torch import nn

from eigenprune.batched.ensemble import Ensemble
from eigenprune.batched.train import train_ensemble
from eigenprune.core.plans import LayerPlan, make_student
from eigenprune.core.training import TrainSpec, train_alone
from eigenprune.experiments.analysis import critical_point
from eigenprune.experiments.builders import make_teacher
from eigenprune.pruning.criteria import CRITERIA, Criterion, get_criterion, register
from eigenprune.pruning.prune import prune_nodes


def _student(width, criterion="eigenvalue", seed=0, dtype=torch.float64):
    plan = get_criterion(criterion).layer_plan(width)
    return make_student(5, [plan, LayerPlan(4, "direct", 0.0, 0.0), LayerPlan(1, "fixed", 0.0, 0.0)], seed=seed, dtype=dtype)


def test_the_registry_holds_the_six_criteria_and_rejects_unknown_names():
    assert list(CRITERIA) == ["eigenvalue", "feature_norm", "random", "slimming", "group_lasso", "taylor"]
    assert get_criterion("slimming", l1=0.5).l1 == 0.5
    with pytest.raises(ValueError, match="unknown criterion 'l0'; known: eigenvalue, feature_norm"):
        get_criterion("l0")
    with pytest.raises(ValueError, match="criterion 'taylor' needs data"):
        get_criterion("taylor")(_student(3), 0)


def test_layer_plans_say_how_each_criterion_trains():
    plans = {name: get_criterion(name).layer_plan(7) for name in CRITERIA}
    assert plans["eigenvalue"] == LayerPlan(7, "spectral", 0.01, 5e-4)
    assert plans["feature_norm"] == plans["random"] == plans["taylor"] == LayerPlan(7, "direct", 0.01, 0.0)
    assert plans["slimming"] == LayerPlan(7, "spectral", 0.01, 0.0, l1_lam=1e-3)
    assert plans["group_lasso"].kind == "direct" and plans["group_lasso"].l2_phi == 0
    assert plans["group_lasso"].group_lasso == pytest.approx(2 * (0.01 * 5e-4) ** 0.5)


def test_weight_based_scores_on_hand_made_weights():
    student = _student(3)
    with torch.no_grad():
        student[0].phi.copy_(torch.tensor([[3.0, 4.0, 0, 0, 0], [1.0, 0, 0, 0, 0], [0, 0, 0, 0, 2.0]]))
        student[0].lam_out.copy_(torch.tensor([-2.0, 0.5, 0.25]))
    torch.testing.assert_close(get_criterion("eigenvalue")(student, 0), torch.tensor([10.0, 0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(get_criterion("feature_norm")(student, 0), torch.tensor([10.0, 0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(get_criterion("slimming")(student, 0), torch.tensor([2.0, 0.5, 0.25], dtype=torch.float64))
    r1, r2 = get_criterion("random", seed=1)(student, 0), get_criterion("random", seed=1)(student, 0)
    assert torch.equal(r1, r2) and r1.shape == (3,) and bool((r1 > 0).all() and (r1 <= 1).all())
    assert not torch.equal(r1, get_criterion("random", seed=2)(student, 0))
    with pytest.raises(TypeError, match="slimming' needs a gated layer"):
        get_criterion("slimming")(nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 1)), 0)


def test_taylor_is_the_mean_absolute_first_order_loss_change():
    student = _student(6, "taylor")
    x = torch.randn(50, 5, dtype=torch.float64)
    y = torch.randn(50, dtype=torch.float64)
    got = get_criterion("taylor")(student, 0, x, y)
    want = torch.zeros(6, dtype=torch.float64)
    for p in range(50):  # brute force: one pattern at a time, gradient of its own squared error
        a = torch.relu(student[0](x[p : p + 1])).detach().requires_grad_(True)
        loss = (student[2:](a).squeeze() - y[p]).square()
        (g,) = torch.autograd.grad(loss, a)
        want += (a * g).abs().squeeze(0).detach() / 50
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", list(CRITERIA))
def test_ensemble_scores_equal_each_students_own_and_padding_scores_zero(name):
    students = [_student(w, name, seed=w) for w in (4, 9)]
    ens = Ensemble([copy.deepcopy(s) for s in students])
    x = torch.randn(2, 40, 5, dtype=torch.float64)
    y = torch.randn(2, 40, dtype=torch.float64)
    crit = get_criterion(name)
    batched = crit(ens, 0, x, y)
    assert batched.shape == (2, 9)
    assert torch.all(batched[0, 4:] == 0)
    if name != "random":  # random draws one table for the whole batch
        for s, student in enumerate(students):
            w = student[0].out_features
            torch.testing.assert_close(batched[s, :w], crit(student, 0, x[s], y[s]))


@pytest.mark.parametrize("name", ["slimming", "group_lasso"])
def test_batched_training_with_sparsity_terms_equals_training_alone(name):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 120, 5, generator=g)
    y = make_teacher(5, [6, 4], 3)(x).squeeze(-1)
    crit = get_criterion(name, **({"l1": 0.05} if name == "slimming" else {"strength": 0.05}))
    students = [make_student(5, [crit.layer_plan(w), LayerPlan(4, "direct", 0.0, 0.0), LayerPlan(1, "fixed", 0.0, 0.0)], seed=w)
                for w in (5, 17)]
    spec = TrainSpec(lr=0.01, batch_size=24, epochs=6)
    ens = Ensemble([copy.deepcopy(s) for s in students])
    train_ensemble(ens, x, y, torch.tensor([0, 1]), spec, [101, 202])
    for s, student in enumerate(students):
        assert student[0].penalty().item() > 0
        train_alone(student, x[s], y[s], spec, [101, 202][s])
        for (pname, alone), (_, other) in zip(student.named_parameters(), ens.student(s).named_parameters()):
            err = (alone - other).norm() / alone.norm().clamp_min(1e-12)
            assert err <= 1e-5, f"student {s} {pname}: rel. error {err:.2e}"


def test_group_lasso_and_slimming_penalties_have_their_formulas():
    layer = _student(2, "group_lasso")[0]
    with torch.no_grad():
        layer.phi.copy_(torch.tensor([[3.0, 4.0, 0, 0, 0], [0, 0, 0, 0, 1.0]]))
    assert layer.penalty().item() == pytest.approx(get_criterion("group_lasso").strength * (5.0 + 1.0))
    gate = _student(2, "slimming")[0]
    with torch.no_grad():
        gate.phi.fill_(1.0)
        gate.lam_out.copy_(torch.tensor([2.0, -3.0]))
    assert gate.penalty().item() == pytest.approx(0.01 * 10 + 1e-3 * 5.0)


def test_a_new_criterion_registers_and_drives_prune_nodes():
    @register
    class LastNodes(Criterion):
        name = "last_nodes_test"

        def scores(self, model, layer, x=None, y=None, task="regression"):
            w = model[0].weight if layer == 0 else model[2].weight
            return torch.arange(w.shape[0], dtype=w.dtype)

    try:
        student = _student(6)
        small = prune_nodes(student, {0: 2}, criterion=get_criterion("last_nodes_test"))
        torch.testing.assert_close(small[0].weight, student[0].weight[4:].detach())
    finally:
        del CRITERIA["last_nodes_test"]


def test_critical_point_is_where_the_curve_last_rises_above_tolerance():
    kept = np.arange(1, 9)
    delta = np.array([2.0, 1.0, 0.005, 0.3, 0.02, 0.001, 0.0, 0.0])  # a lucky dip at 3 does not count
    assert critical_point(kept, delta, 0.01) == 6
    assert critical_point(kept, delta, 0.05) == 5
    assert critical_point(kept, delta, 5.0) == 1
    assert critical_point(kept, torch.tensor(delta).numpy(), 0.01) == 6
    with pytest.raises(ValueError, match="one shape"):
        critical_point(kept, delta[:3], 0.1)
