"""backprop='fused': the first layer in Triton kernels (run by Triton's interpreter without a GPU)."""

import copy

import pytest
import torch

from eigenprune.batched.ensemble import Ensemble
from eigenprune.batched.train import train_ensemble
from eigenprune.core.plans import LayerPlan, make_student
from eigenprune.core.training import TrainSpec
from eigenprune.experiments.builders import make_teacher, paper_student

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _students(plans_of_width, widths):
    return [make_student(10, plans_of_width(w), seed=i) for i, w in enumerate(widths)]


def _train(students, backprop, y_bad=False, task="regression", epochs=3):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 90, 10, generator=g)
    if task == "regression":
        y = make_teacher(10, [20, 10], 3)(x).squeeze(-1).detach()
    else:
        y = torch.randint(0, 4, (2, 90), generator=g)
    if y_bad:
        y[1, 4] = float("inf")
    ens = Ensemble(copy.deepcopy(students)).to(DEVICE)
    losses = []
    log = train_ensemble(ens, x.to(DEVICE), y.to(DEVICE), torch.tensor([0, 1, 0], device=DEVICE),
                         TrainSpec(0.01, 40, epochs, task, backprop), [7, 8], lambda e, loss: losses.append(loss))
    return ens.cpu(), log, losses


def _assert_same(a, b, rtol=1e-4, atol=1e-6):
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(q, p, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("kind", ["spectral", "direct"])
def test_fused_training_equals_the_manual_step(kind):
    """The paper's student (10 -> N -> 10 -> sum), widths padded in one stack, 9 Adam steps."""
    students = _students(lambda w: paper_student(LayerPlan(w, kind), [10]), (5, 70, 33))
    manual, log_m, loss_m = _train(students, "manual")
    fused, log_f, loss_f = _train(students, "fused")
    torch.testing.assert_close(loss_f, loss_m, rtol=1e-5, atol=0)
    _assert_same(manual, fused)


def test_fused_handles_a_deep_student_a_bias_head_and_a_failing_student():
    deep = _students(lambda w: paper_student(LayerPlan(w, "spectral"), [12, 6], deep=True), (20, 9, 40))
    manual, log_m, _ = _train(deep, "manual", y_bad=True)
    fused, log_f, _ = _train(deep, "fused", y_bad=True)
    assert torch.equal(log_m.failed_step, log_f.failed_step) and (log_f.failed_step[1] >= 0)
    _assert_same(manual, fused)
    head = _students(lambda w: paper_student(LayerPlan(w, "spectral"), [], head="linear", n_outputs=4), (8, 30, 17))
    _assert_same(_train(head, "manual", task="classification")[0], _train(head, "fused", task="classification")[0])


def test_fused_refuses_what_it_cannot_run():
    with_bias = Ensemble([make_student(10, [LayerPlan(8, "direct", bias=True), LayerPlan(1, "fixed", 0.0, 0.0)], 0)])
    x, y = torch.randn(1, 20, 10), torch.randn(1, 20)
    with pytest.raises(ValueError, match="first layer without bias"):
        train_ensemble(with_bias, x, y, torch.zeros(1, dtype=torch.long), TrainSpec(0.01, 10, 1, backprop="fused"), [0])
    double = Ensemble([make_student(10, paper_student(LayerPlan(8), [10]), 0, torch.float64)])
    with pytest.raises(ValueError, match="float32, not torch.float64"):
        train_ensemble(double, x.double(), y.double(), torch.zeros(1, dtype=torch.long), TrainSpec(0.01, 10, 1, backprop="fused"), [0])
    wide = Ensemble([make_student(200, paper_student(LayerPlan(8), [10]), 0)])
    with pytest.raises(ValueError, match="up to 128 inputs and second-layer nodes, got 200 and 10"):
        train_ensemble(wide, torch.randn(1, 20, 200), y, torch.zeros(1, dtype=torch.long), TrainSpec(0.01, 10, 1, backprop="fused"), [0])
