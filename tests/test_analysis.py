import math

import pytest
import torch

from eigenprune.batched.curves import pruning_curves
from eigenprune.batched.ensemble import Ensemble
from eigenprune.core.layers import SpectralLinear
from eigenprune.core.losses import task_loss
from eigenprune.core.plans import LayerPlan, make_student
from eigenprune.experiments.analysis import effective_dim
from eigenprune.pruning.importance import eigenvalue_importance, feature_norm, node_importance, normalize
from eigenprune.pruning.keep import top_k_mask


def test_eigenvalue_importance_on_hand_made_weights():
    layer = SpectralLinear(2, 3)
    with torch.no_grad():
        layer.phi.copy_(torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]]))
        layer.lam_out.copy_(torch.tensor([-2.0, 0.5, 9.0]))
    assert node_importance(layer).tolist() == pytest.approx([10.0, 0.5, 0.0])
    assert feature_norm(layer.weight).tolist() == pytest.approx([10.0, 0.5, 0.0])
    layer.lam_out.requires_grad_(False)  # a direct layer is ranked by its weight norm
    assert node_importance(layer).tolist() == pytest.approx([10.0, 0.5, 0.0])
    stacked = eigenvalue_importance(torch.ones(2, 3, 4), torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.5, 0.5]]))
    torch.testing.assert_close(stacked, torch.tensor([[2.0, 4.0, 0.0], [1.0, 1.0, 1.0]]))


def test_effective_dimension_counts_above_threshold_of_max():
    scores = torch.tensor([[10.0, 0.6, 0.4, 0.0], [1.0, 1.0, 0.01, 0.2]])
    assert normalize(scores)[0].tolist() == pytest.approx([1.0, 0.06, 0.04, 0.0])
    assert effective_dim(scores, 0.05).tolist() == [2, 3]
    assert effective_dim(scores, 0.5).tolist() == [1, 2]
    # padding beyond a student's width is never counted
    assert effective_dim(scores, 0.05, widths=torch.tensor([4, 2])).tolist() == [2, 2]


def test_top_k_mask_keeps_the_top_k():
    scores = torch.tensor([[0.1, 5.0, 3.0, 0.2]])
    assert top_k_mask(scores, 2).tolist() == [[0.0, 1.0, 1.0, 0.0]]


def _diagonal_student(c):
    """Hidden node i reads input i with weight c_i; the readout sums the hidden nodes."""
    n = len(c)
    student = make_student(n, [LayerPlan(n, "spectral"), LayerPlan(1, "fixed")], seed=0, dtype=torch.float64)
    with torch.no_grad():
        student[0].phi.copy_(torch.eye(n, dtype=torch.float64))
        student[0].lam_out.copy_(-torch.tensor(c, dtype=torch.float64))  # w = -lam_out * phi = diag(c)
    return student


def test_pruning_curve_on_a_net_with_a_known_answer():
    c = [3.0, 0.5, 2.0, 1.0]
    ens = Ensemble([_diagonal_student(c)])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5000, 4, generator=g, dtype=torch.float64)
    y = ens(x).squeeze(-1)  # the full model is exact: loss_full = 0
    scores = node_importance(ens.layers[0])
    assert scores[0].tolist() == pytest.approx([3.0, 0.5, 2.0, 1.0])
    curve = pruning_curves(ens, 0, scores, x, y, torch.tensor([0]), "regression")[0]
    relu = x[0].clamp_min(0)
    order = [0, 2, 3, 1]  # by importance
    for k in range(1, 5):
        dropped = order[k:]
        want = (sum(c[i] * relu[:, i] for i in dropped) if dropped else torch.zeros(5000, dtype=torch.float64)).square().mean()
        assert curve[k - 1].item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12)
    # and in expectation: dropping only the weakest node costs c^2 E[relu(x)^2] = 0.25 / 2
    assert curve[2].item() == pytest.approx(0.125, rel=0.1)
    assert curve[3].item() == pytest.approx(0.0, abs=1e-20)
    assert curve.tolist() == sorted(curve.tolist(), reverse=True)


def test_prefix_sum_curves_equal_masked_forward_passes():
    students = [make_student(6, [LayerPlan(w, "spectral"), LayerPlan(5, "direct", bias=True), LayerPlan(1, "fixed")], seed=w,
                             dtype=torch.float64) for w in (7, 11)]
    ens = Ensemble(students)
    with torch.no_grad():
        ens.layers[1].bias.uniform_(-0.5, 0.5)
        ens.layers[1].bias[0, 5:] = 0
    x = torch.randn(2, 300, 6, dtype=torch.float64)
    y = torch.randn(2, 300, dtype=torch.float64)
    ti = torch.tensor([1, 0])
    scores = node_importance(ens.layers[0])
    curves = pruning_curves(ens, 0, scores, x, y, ti, "regression", budget=5000)  # forces several chunks
    for k in range(1, 12):
        masked = task_loss(ens(x[ti], kept={0: top_k_mask(scores, k)}), y[ti], "regression")
        torch.testing.assert_close(curves[:, k - 1], masked)
    assert math.isclose(curves[0, 10].item(), curves[0, 6].item())  # beyond its width: the full loss


def test_pruning_curves_reject_the_output_layer():
    ens = Ensemble([make_student(3, [LayerPlan(4), LayerPlan(1, "fixed")], seed=1)])
    with pytest.raises(ValueError, match="hidden layer index in 0..0, got 1"):
        pruning_curves(ens, 1, torch.ones(1, 1), torch.zeros(1, 2, 3), torch.zeros(1, 2), torch.tensor([0]), "regression")


@pytest.mark.parametrize("sizes", [(1, 1), (5, 5), (7, 40), (300, 12)])
def test_distribution_distance_is_scipys_wasserstein_distance(sizes):
    import numpy as np
    from scipy.stats import wasserstein_distance

    from eigenprune.experiments.analysis import distribution_distance

    rng = np.random.default_rng(sum(sizes))
    a, b = rng.normal(size=sizes[0]), rng.exponential(size=sizes[1]) + 0.3
    b[: sizes[1] // 3] = a[0]  # ties, across the two samples too
    assert distribution_distance(a, b) == pytest.approx(wasserstein_distance(a, b), rel=1e-12, abs=1e-15)
    assert distribution_distance(a, a) == 0.0
    with pytest.raises(ValueError, match="sizes 0 and"):
        distribution_distance(a[:0], b)
