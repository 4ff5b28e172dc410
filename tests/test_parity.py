"""Options that reproduce the authors' Keras code: Keras-form Adam, their importance normalisation, float32 L2."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY
from eigenprune.batched.ensemble import Ensemble
from eigenprune.batched.train import train_ensemble
from eigenprune.core.plans import LayerPlan, make_student
from eigenprune.core.training import FusedAdam, KerasAdam, TrainSpec, adam, train_alone
from eigenprune.experiments.analysis import effective_dim, normalized_importance
from eigenprune.experiments.builders import make_teacher, student_plans
from eigenprune.experiments.config import Config, parse_config
from eigenprune.experiments.runner import run_experiment


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_step_from_zero_moves_keras_adam_by_0_2403_and_torch_adam_by_0_9091(dtype):
    """p = 0, gradient 1e-6, lr 1, eps 1e-7 (the number measured against Keras, ORACLE.md)."""
    moves = {}
    for name, make in {"keras": lambda p: KerasAdam([p], lr=1.0, eps=1e-7),
                       "torch": lambda p: torch.optim.Adam([p], lr=1.0, eps=1e-7)}.items():
        p = torch.zeros(1, dtype=dtype, requires_grad=True)
        opt = make(p)
        p.grad = torch.full_like(p, 1e-6)
        opt.step()
        moves[name] = -float(p.detach())
    assert moves["keras"] == pytest.approx(0.2403, abs=5e-5)
    assert moves["torch"] == pytest.approx(0.9091, abs=5e-5)


def test_keras_adam_follows_the_keras_formula_over_many_steps():
    """Ten float64 steps against the formula written out in numpy (float32 beta and lr in beta^t, alpha)."""
    g = np.random.default_rng(0).normal(size=(10, 4)) * np.logspace(-7, 0, 4)
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = KerasAdam([p], lr=0.005)
    ref, m, v = np.zeros(4), np.zeros(4), np.zeros(4)
    b1, b2, lr = (float(np.float32(x)) for x in (0.9, 0.999, 0.005))
    for t in range(1, 11):
        p.grad = torch.from_numpy(g[t - 1].copy())
        opt.step()
        m += (g[t - 1] - m) * (1 - 0.9)
        v += (g[t - 1] ** 2 - v) * (1 - 0.999)
        ref -= m * (lr * np.sqrt(1 - b2**t) / (1 - b1**t)) / (np.sqrt(v) + 1e-7)
    np.testing.assert_allclose(p.detach().numpy(), ref, rtol=1e-13, atol=0)
    torch_p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    torch_opt = torch.optim.Adam([torch_p], lr=0.005, eps=1e-7)
    for t in range(10):
        torch_p.grad = torch.from_numpy(g[t].copy())
        torch_opt.step()
    assert not np.allclose(torch_p.detach().numpy(), ref, rtol=1e-3)  # the smallest gradients move differently


def test_the_optimizer_option_is_checked_and_adam_stays_torch_fused_adam():
    p = [torch.zeros(2, requires_grad=True)]
    opt = adam(p, 0.01)
    assert isinstance(opt, FusedAdam) and opt.eps == 1e-8 and opt.betas == (0.9, 0.999)
    assert isinstance(adam(p, 0.01, kind="keras_adam"), KerasAdam)
    with pytest.raises(ValueError, match="keras_adam, got 'sgd'"):
        adam(p, 0.01, kind="sgd")


@pytest.mark.parametrize("reference", ["torch fused Adam", "keras_adam through .grad"])
def test_step_with_gradients_equals_the_reference_optimizer(reference):
    """`FusedAdam` equals torch.optim.Adam(fused=True) bit for bit, through `.grad` and through `step_with(grads)`
    (the trainer's path); `KerasAdam.step_with` equals its `step()`. A parameter without a gradient stays put."""
    g = torch.Generator().manual_seed(3)
    shapes = [(3, 5, 4), (3, 5), (3, 2, 5)]
    start = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) * 10.0 ** (t % 3 - 1) for s in shapes] for t in range(7)]
    ref, via_grad, direct = ([t.clone().requires_grad_() for t in start] for _ in range(3))
    if reference == "torch fused Adam":
        opt_ref, opt_grad, opt_direct = torch.optim.Adam(ref, lr=0.01, fused=True), adam(via_grad, 0.01), adam(direct, 0.01)
    else:
        opt_ref, opt_grad, opt_direct = (adam(ps, 0.01, kind="keras_adam") for ps in (ref, via_grad, direct))
    for t, step in enumerate(grads):
        for ps in (ref, via_grad):
            for i, (p, grad) in enumerate(zip(ps, step)):
                p.grad = None if (t == 3 and i == 1) else grad  # one step without a gradient for the second parameter
        opt_ref.step()
        opt_grad.step()
        opt_direct.step_with(step)
    for a, b in zip(ref, via_grad):
        assert torch.equal(a, b)
    assert not torch.equal(ref[1], direct[1]) and all(torch.equal(a, b) for a, b in zip(ref[::2], direct[::2]))


def test_batched_keras_adam_training_equals_training_each_student_alone():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 120, 10, generator=g)
    y = make_teacher(10, [20, 10], 3)(x).squeeze(-1)
    plans = [LayerPlan(9, "spectral"), LayerPlan(10, "direct", 0.0, 0.0), LayerPlan(1, "fixed", 0.0, 0.0)]
    students = [make_student(10, plans, seed=s) for s in (1, 2)]
    spec = TrainSpec(lr=0.01, batch_size=24, epochs=6, optimizer="keras_adam")
    ens = Ensemble([copy.deepcopy(s) for s in students])
    train_ensemble(ens, x, y, torch.tensor([0, 1]), spec, [11, 12])
    plain = Ensemble([copy.deepcopy(s) for s in students])
    train_ensemble(plain, x, y, torch.tensor([0, 1]), TrainSpec(lr=0.01, batch_size=24, epochs=6), [11, 12])
    for s, student in enumerate(students):
        train_alone(student, x[s], y[s], spec, [11, 12][s])
        for alone, batched, torch_adam in zip(student.parameters(), ens.student(s).parameters(), plain.student(s).parameters()):
            if alone.requires_grad:
                torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)
                assert not torch.allclose(batched, torch_adam, rtol=1e-6, atol=0)


def test_effective_dim_per_trial_and_the_authors_normalisation_on_known_scores():
    """Two trials of one width. Ours: each by its own max, > 0.05 -> 2 and 1. The authors': by the
    max over both trials (2), >= 0.05 -> 2 and 3."""
    scores = torch.tensor([[1.0, 0.5, 0.04, 0.05], [2.0, 0.1, 0.1, 0.0]], dtype=torch.float64)
    assert effective_dim(scores).tolist() == [2, 1]
    groups = torch.tensor([7, 7])
    torch.testing.assert_close(normalized_importance(scores, groups), scores / 2)
    assert effective_dim(scores, groups=groups, at_least=True).tolist() == [2, 3]
    assert effective_dim(scores, at_least=True).tolist() == [3, 3]  # the inclusive count alone: 0.05 and 0.1 / 2 count
    # two widths: each group has its own max; padding beyond a row's width never counts
    two = torch.tensor([[1.0, 0.5, 0.0], [4.0, 0.1, 0.0], [0.3, 0.2, 0.1]], dtype=torch.float64)
    assert effective_dim(two, groups=torch.tensor([0, 0, 1]), widths=torch.tensor([2, 2, 3]), at_least=True).tolist() == [2, 1, 3]
    with pytest.raises(ValueError, match="threshold must be > 0, got 0"):
        effective_dim(scores, 0.0)


def test_l2_float32_rounds_the_coefficients_and_defaults_keep_the_digest():
    cfg = parse_config({"dtype": "float64", "parity": {"l2_float32": True}})
    first = student_plans(cfg, "spectral", 20, 0.5)[0]
    assert first.l2_phi == float(np.float32(0.005)) != 0.005 and first.l2_lam == float(np.float32(2.5e-4))
    assert student_plans(Config(), "spectral", 20, 0.5)[0].l2_phi == 0.005
    assert Config().digest() == parse_config({"parity": {}}).digest() != cfg.digest()
    assert "parity" not in Config().model_dump(exclude={"parity"})


def test_run_with_the_authors_normalisation_and_sqrt_n_scale(tmp_path):
    base = {**TINY, "workers": 1, "save_students": False, "methods": ["spectral"]}
    ours = run_experiment(parse_config(base), tmp_path / "ours", quiet=True)
    theirs = run_experiment(parse_config({**base, "parity": {"effective_dim": "authors", "importance_scale": "sqrt_n"}}),
                            tmp_path / "theirs", quiet=True)
    a, b = (pd.read_parquet(p / "importance.parquet") for p in (ours, theirs))
    np.testing.assert_allclose(b.importance, a.importance * np.sqrt(a.width), rtol=1e-6)
    for (w, s), g in a.groupby(["width", "strength"]):  # theirs: normalised by the max over the trials of a width
        h = b[(b.width == w) & (b.strength == s)]
        np.testing.assert_allclose(h.normalized, g.importance / g.importance.max(), rtol=1e-6)
    res = pd.read_parquet(theirs / "results.parquet")
    for (w, t), g in b.groupby(["width", "trial"]):
        assert int(res[(res.width == w) & (res.trial == t)].effective_dim.iloc[0]) == int((g.normalized >= 0.05).sum())
