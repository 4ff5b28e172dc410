import pytest
import torch
from torch import nn

from eigenprune.core.losses import task_loss
from eigenprune.core.structure import layer_sizes
from eigenprune.core.training import TrainSpec
from eigenprune.experiments.builders import make_teacher
from eigenprune.pruning import search
from eigenprune.pruning.keep import PruneError
from eigenprune.pruning.search import minimal_width


def _teacher_inside_a_wide_student(h_t=6, width=30, seed=0):
    """A width-30 student that holds a 10 -> 6 -> 1 teacher in 6 of its nodes; the other 24 are tiny."""
    teacher = make_teacher(10, [h_t], seed)
    g = torch.Generator().manual_seed(seed + 1)
    student = nn.Sequential(nn.Linear(10, width, bias=False), nn.ReLU(), nn.Linear(width, 1, bias=False))
    with torch.no_grad():
        student[0].weight.copy_(1e-3 * torch.randn(width, 10, generator=g))
        real = torch.randperm(width, generator=g)[:h_t]
        student[0].weight[real] = teacher[0].weight
        student[2].weight.fill_(1.0)
    student[2].requires_grad_(False)
    x = torch.randn(3000, 10, generator=g)
    y = teacher(x).squeeze(-1)
    return student, x[:2000], y[:2000], x[2000:], y[2000:], real


def test_search_lands_exactly_on_the_teacher_width():
    student, x_tr, y_tr, x_te, y_te, real = _teacher_inside_a_wide_student()
    result = minimal_width(student, x_tr, y_tr, x_te, y_te, atol=1e-3, rtol=0.0,
                           finetune=TrainSpec(lr=1e-3, batch_size=100, epochs=1))
    assert result.width == 6
    assert layer_sizes(result.model) == [10, 6, 1]
    kept_rows = result.model[0].weight
    want = student[0].weight[real.sort().values]
    torch.testing.assert_close(kept_rows, want, atol=0.05, rtol=0.05)  # the teacher's own nodes survive (fine-tuned)
    curve = result.curve
    accepted = curve[curve.accepted]
    assert accepted.kept.is_monotonic_decreasing and accepted.kept.iloc[-1] == 6
    assert (accepted.loss_finetuned <= result.full_loss + 1e-3).all()
    assert curve.iloc[-1].kept == 5 and not curve.iloc[-1].accepted  # one node fewer fails, and that ends it
    assert curve.loss_pruned[~curve.accepted].min() > 0.1  # removing a teacher node costs a lot
    assert len(curve) <= 15  # geometric steps, not one fine-tuning per node
    with torch.no_grad():
        assert float(task_loss(result.model(x_te), y_te, "regression")) <= 1e-3
    assert torch.equal(result.model[2].weight, torch.ones(1, 6))  # the frozen readout stayed frozen


def test_search_refuses_bad_arguments():
    student, x_tr, y_tr, x_te, y_te, _ = _teacher_inside_a_wide_student(width=8)
    with pytest.raises(PruneError, match="shrink must be in \\(0, 1\\), got 1.5"):
        minimal_width(student, x_tr, y_tr, x_te, y_te, shrink=1.5)
    with pytest.raises(PruneError, match="hidden layer index in 0..0, got 1"):
        minimal_width(student, x_tr, y_tr, x_te, y_te, layer=1)
    with pytest.raises(PruneError, match="accuracy_tol needs task classification, got regression"):
        minimal_width(student, x_tr, y_tr, x_te, y_te, accuracy_tol=0.01)


def test_search_by_accuracy_keeps_the_class_defining_nodes():
    """3 classes read off 3 useful hidden nodes among 20 (the rest near zero): accuracy allows no fewer."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1500, 3, generator=g)
    y = x.argmax(-1)
    model = nn.Sequential(nn.Linear(3, 20, bias=False), nn.ReLU(), nn.Linear(20, 3, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(1e-4 * torch.randn(20, 3, generator=g))
        model[0].weight[[2, 9, 15]] = 5 * torch.eye(3)
        model[2].weight.zero_()
        model[2].weight[:, [2, 9, 15]] = torch.eye(3)
    result = minimal_width(model, x[:1000], y[:1000], x[1000:], y[1000:], task="classification", accuracy_tol=0.01,
                           finetune=TrainSpec(lr=1e-4, batch_size=100, epochs=1, task="classification"))
    assert result.width == 3
    with torch.no_grad():
        full = (model(x[1000:]).argmax(-1) == y[1000:]).float().mean()
        assert (result.model(x[1000:]).argmax(-1) == y[1000:]).float().mean() >= full - 0.01


def test_search_fine_tunes_on_its_own_task_whatever_the_finetune_spec_says(monkeypatch):
    """`task` governs fine-tuning too (before: `finetune.task`, default regression, squared error on the logits)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 3, generator=g)
    y = x.argmax(-1)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 3))
    seen = []
    original = search.train_alone
    monkeypatch.setattr(search, "train_alone", lambda m, xs, ys, spec, seed: (seen.append(spec.task), original(m, xs, ys, spec, seed))[1])
    minimal_width(model, x[:400], y[:400], x[400:], y[400:], task="classification", accuracy_tol=0.05,
                  finetune=TrainSpec(lr=1e-3, batch_size=100, epochs=1))
    assert seen and set(seen) == {"classification"}
