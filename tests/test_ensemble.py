import copy
import platform
import sys

import pytest
import torch

from eigenprune.batched.ensemble import Ensemble, ManualStep, bmm
from eigenprune.batched.memory import reuse_freed_memory
from eigenprune.batched.train import train_ensemble
from eigenprune.core.plans import LayerPlan, make_student
from eigenprune.core.training import TrainSpec, train_alone
from eigenprune.experiments.builders import make_teacher


def _plans(width, kind):
    return [LayerPlan(width, kind), LayerPlan(10, "direct", 0.0, 0.0), LayerPlan(1, "fixed", 0.0, 0.0)]


def _data(trials=2, n=120, dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(trials, n, 10, generator=g, dtype=dtype)
    y = make_teacher(10, [20, 10], 3, dtype)(x).squeeze(-1)
    return x, y


@pytest.mark.parametrize("kind,backprop,compiled", [("spectral", "manual", False), ("direct", "manual", False),
                                                   ("spectral", "manual", True), ("spectral", "autograd", False),
                                                   ("spectral", "autograd_compiled", False)])
def test_batched_training_equals_training_each_student_alone(kind, backprop, compiled):
    """3 students of different widths, 50 Adam steps: batched == one by one (rel. error <= 1e-5); also with the
    hand-written step under torch.compile, batched autograd, and batched autograd of a compiled forward."""
    x, y = _data()
    students = [make_student(10, _plans(w, kind), seed=w) for w in (5, 17, 40)]
    trial_index = torch.tensor([0, 1, 0])
    shuffle = [101, 202]
    spec = TrainSpec(lr=0.01, batch_size=24, epochs=10, backprop=backprop, compile_step=compiled)  # 5 batches x 10 epochs = 50 steps
    ens = Ensemble([copy.deepcopy(s) for s in students])
    log = train_ensemble(ens, x, y, trial_index, spec, shuffle)
    assert log.steps == 50
    for s, student in enumerate(students):
        start = copy.deepcopy(student)
        train_alone(student, x[trial_index[s]], y[trial_index[s]], spec, shuffle[trial_index[s]])
        batched = ens.student(s)
        for (name, alone), (_, other), (_, before) in zip(
            student.named_parameters(), batched.named_parameters(), start.named_parameters()
        ):
            if alone.requires_grad:
                assert not torch.equal(alone, before), f"{name} did not train"
            err = (alone - other).norm() / alone.norm().clamp_min(1e-12)
            assert err <= 1e-5, f"student {s} {name}: rel. error {err:.2e}"


def test_padding_stays_zero_and_students_extract_exactly():
    x, y = _data()
    ens = Ensemble([make_student(10, _plans(w, "spectral"), seed=w) for w in (3, 8)])
    train_ensemble(ens, x, y, torch.tensor([0, 1]), TrainSpec(0.01, 40, 2), [1, 2])
    first = ens.layers[0]
    assert torch.all(first.phi[0, 3:] == 0) and torch.all(first.lam_out[0, 3:] == 0)
    assert torch.all(ens.layers[1].phi[0, :, 3:] == 0)
    xs = x[:, :7]
    out = ens(xs)
    for s in range(2):
        torch.testing.assert_close(ens.student(s)(xs[s]), out[s])


def test_diverging_student_is_stopped_and_others_are_unaffected():
    x, y = _data()
    students = [make_student(10, _plans(w, "spectral"), seed=w) for w in (6, 9, 12)]
    with torch.no_grad():  # student 1 starts with huge eigenvalues -> its loss overflows to inf
        students[1][0].lam_out.fill_(1e30)
    spec = TrainSpec(0.01, 40, 3)
    ens = Ensemble([copy.deepcopy(s) for s in students])
    log = train_ensemble(ens, x, y, torch.tensor([0, 0, 1]), spec, [1, 2])
    assert log.failed_step.tolist() == [-1, 0, -1]
    assert not torch.isfinite(log.failed_loss[1]) and log.failed_loss[[0, 2]].tolist() == [0.0, 0.0]
    ref = Ensemble([copy.deepcopy(students[0]), copy.deepcopy(students[2])])
    train_ensemble(ref, x, y, torch.tensor([0, 1]), spec, [1, 2])
    for got, want in ((0, 0), (2, 1)):
        for a, b in zip(ens.student(got).parameters(), ref.student(want).parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_mixed_flags_are_refused():
    with pytest.raises(ValueError, match="same parts"):
        Ensemble([make_student(10, _plans(4, "spectral"), 1), make_student(10, _plans(4, "direct"), 1)])


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_hand_written_backprop_equals_autograd(task):
    """Deep students with biases and a trainable lam_in: manual gradients == autograd, step by step."""
    from eigenprune.core.layers import SpectralLinear

    def student(seed):
        torch.manual_seed(seed)
        n_out = 4 if task == "classification" else 1
        layers = [SpectralLinear(10, 9, bias=True, train_lam_in=True, dtype=torch.float64), torch.nn.ReLU(),
                  SpectralLinear(9, 7, bias=True, dtype=torch.float64), torch.nn.ReLU(),
                  SpectralLinear(7, n_out, bias=True, train_lam_out=False, l2_phi=0.0, dtype=torch.float64)]
        with torch.no_grad():
            layers[0].lam_in.uniform_(-0.5, 0.5)
            layers[2].bias.uniform_(-0.2, 0.2)
        return torch.nn.Sequential(*layers)

    x = torch.randn(2, 60, 10, dtype=torch.float64)
    y = torch.randint(0, 4, (2, 60)) if task == "classification" else torch.randn(2, 60, dtype=torch.float64)
    runs = {}
    for backprop in ("manual", "autograd"):
        ens = Ensemble([student(1), student(2)])
        train_ensemble(ens, x, y, torch.tensor([0, 1]), TrainSpec(0.01, 20, 4, task, backprop), [5, 6])
        runs[backprop] = ens
    for (name, a), (_, b) in zip(runs["manual"].named_parameters(), runs["autograd"].named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


def test_a_failed_student_stays_frozen_after_its_epoch():
    x, y = _data()
    y = y.clone()
    y[1, 5] = float("inf")  # trial 1's data holds an infinite target: its student fails in epoch 0
    students = [make_student(10, _plans(w, "spectral"), seed=w) for w in (6, 9)]
    runs = {}
    for epochs in (1, 4):
        ens = Ensemble([copy.deepcopy(s) for s in students])
        log = train_ensemble(ens, x, y, torch.tensor([0, 1]), TrainSpec(0.01, 40, epochs), [1, 2])
        runs[epochs] = (ens, log)
    assert runs[4][1].failed_step[0] == -1 and 0 <= runs[4][1].failed_step[1] < 3
    for a, b in zip(runs[1][0].student(1).parameters(), runs[4][0].student(1).parameters()):
        assert torch.equal(a, b)  # nothing moved after the failing epoch
    moved = [not torch.equal(a, b) for a, b in zip(runs[1][0].student(0).parameters(), runs[4][0].student(0).parameters())]
    assert any(moved)  # while the healthy student kept training


def test_an_earlier_failure_stays_frozen_when_another_student_fails_later():
    x, y = _data()
    y = y.clone()
    y[1, 5] = float("inf")  # student 1 (trial 1) fails in epoch 0
    ens = Ensemble([make_student(10, _plans(w, "spectral"), seed=w) for w in (6, 9, 7)])
    frozen = {}

    def on_epoch(epoch, loss):
        if epoch == 0:
            frozen["s1"] = [p.detach()[1].clone() for p in ens.parameters()]
        if epoch == 2:
            with torch.no_grad():
                ens.layers[0].phi[2].fill_(float("inf"))  # student 2 fails in epoch 3

    log = train_ensemble(ens, x, y, torch.tensor([0, 1, 0]), TrainSpec(0.01, 40, 6), [1, 2], on_epoch)
    assert log.failed_step[0] == -1 and 0 <= log.failed_step[1] < 3 and 9 <= log.failed_step[2] < 12
    for p, v in zip(ens.parameters(), frozen["s1"]):
        assert torch.equal(p.detach()[1], v)  # not moved by the momentum of the epochs after its failure


@pytest.mark.parametrize("shape", [(3, 100, 10, 60), (3, 100, 60, 10), (2, 60, 100, 10), (2, 10, 100, 60), (4, 100, 1, 10)])
def test_bmm_picks_an_orientation_and_keeps_the_product(shape):
    s, m, k, n = shape
    a, b = torch.randn(s, m, k, dtype=torch.float64), torch.randn(s, k, n, dtype=torch.float64)
    out = bmm(a, b)
    assert out.shape == (s, m, n)
    torch.testing.assert_close(out, torch.bmm(a, b), rtol=1e-12, atol=1e-12)
    assert out.is_contiguous() == (n >= min(m, k))  # few output columns from a long contraction: the transpose


def test_bmm_follows_the_layout_it_is_asked_for():
    a, b = torch.randn(3, 100, 60, dtype=torch.float64), torch.randn(3, 60, 10, dtype=torch.float64)
    for like in (torch.empty(3, 100, 10), torch.empty(3, 10, 100).transpose(1, 2)):
        out = bmm(a, b, like=like)
        torch.testing.assert_close(out, torch.bmm(a, b), rtol=1e-12, atol=1e-12)
        assert out.stride() == like.stride()


def test_gradients_have_their_parameters_layout():
    """The step's gradients reach Adam with the parameters' (contiguous) layout, whichever way bmm ran."""
    x, y = _data()
    index = torch.tensor([0, 1])
    for kind in ("spectral", "direct"):
        ens = Ensemble([make_student(10, _plans(w, kind), seed=w) for w in (5, 40)])
        step = ManualStep(ens, "regression")
        _, _, grads = step(x[index, :50], y[index, :50], torch.ones(2, dtype=torch.bool))
        assert len(grads) == len(step.params) == sum(p.requires_grad for p in ens.parameters())
        for p, g in zip(step.params, grads):
            assert g.shape == p.shape and g.stride() == p.stride()


def test_reuse_freed_memory_applies_on_glibc():
    assert reuse_freed_memory() == (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")
