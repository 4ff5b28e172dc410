import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from eigenprune import SpectralLinear, despectralize, spectral_penalty, spectralize
from eigenprune.core.losses import task_loss
from eigenprune.core.plans import LayerPlan, make_student
from eigenprune.core.structure import as_sequential, layer_sizes
from eigenprune.core.training import TrainSpec, train_alone
from eigenprune.pruning.chain import loss_by_kept, mask_nodes, remove_nodes, select_nodes
from eigenprune.pruning.checkpoint import load_model, save_model
from eigenprune.pruning.importance import node_importance
from eigenprune.pruning.keep import KeepSpec, PruneError, parse_keep, top_k_mask
from eigenprune.pruning.prune import prune_nodes


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _random_mlp(seed, spectral, dtype=torch.float64):
    """5 linear layers, biases everywhere (random), mixed activations; spectral layers get random lam_in/lam_out."""
    g = torch.Generator().manual_seed(seed)
    sizes = [7, 13, 11, 9, 6, 2]
    acts = [nn.ReLU(), nn.Tanh(), nn.GELU(), nn.LeakyReLU(0.1)]
    mods = []
    for i in range(5):
        lin = nn.Linear(sizes[i], sizes[i + 1], dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, dtype=dtype))
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g, dtype=dtype))
        if spectral:
            lin = SpectralLinear.from_plain(lin, train_lam_in=True)
            with torch.no_grad():
                lin.lam_in.uniform_(-1, 1, generator=g)
                lin.lam_out.uniform_(-2, 2, generator=g)
        mods.append(lin)
        if i < 4:
            mods.append(acts[i])
    return nn.Sequential(*mods)


@pytest.mark.parametrize("spectral", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_removal_equals_masking_on_random_deep_nets(seed, spectral):
    model = _random_mlp(seed, spectral)
    before = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(100 + seed)
    kept = {layer: torch.randperm(n, generator=g)[: max(1, n // 3)] for layer, n in enumerate([13, 11, 9, 6])}
    small = remove_nodes(model, kept)
    masked = mask_nodes(model, kept)
    assert layer_sizes(small) == [7, 4, 3, 3, 2, 2]
    assert all(type(m) is nn.Linear for m in small if not isinstance(m, (nn.ReLU, nn.Tanh, nn.GELU, nn.LeakyReLU)))
    x = torch.randn(400, 7, dtype=torch.float64, generator=g)
    assert _rel(small(x), masked(x)) <= 1e-6
    assert _rel(masked(x), model(x)) > 1e-2  # pruning did change the function: the test is not vacuous
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the input model is untouched


def test_a_removed_node_with_bias_folds_relu_of_its_bias_into_the_next_bias():
    lin, nxt = nn.Linear(2, 3), nn.Linear(3, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]))
        lin.bias.copy_(torch.tensor([0.0, -1.0, 2.0]))
        nxt.weight.copy_(torch.tensor([[1.0, 1.0, 3.0]]))
        nxt.bias.fill_(0.5)
    small = remove_nodes(nn.Sequential(lin, nn.ReLU(), nxt), {0: [0, 1]})
    assert small[2].bias.item() == pytest.approx(0.5 + 3.0 * 2.0)  # relu(2) * 3 folded in
    small = remove_nodes(nn.Sequential(lin, nn.ReLU(), nxt), {0: [0, 2]})
    assert small[2].bias.item() == pytest.approx(0.5)  # relu(-1) = 0: nothing to fold
    plain = nn.Sequential(nn.Linear(2, 3, bias=False), nn.ReLU(), nn.Linear(3, 1, bias=False))
    assert remove_nodes(plain, {0: [1]})[2].bias is None  # no bias appears where nothing is folded


def test_masking_is_setting_the_eigenvalue_to_zero():
    student = make_student(10, [LayerPlan(30), LayerPlan(10, "direct"), LayerPlan(1, "fixed")], seed=3, dtype=torch.float64)
    keep = [0, 4, 7, 21]
    zeroed = copy.deepcopy(student)
    with torch.no_grad():
        drop = torch.ones(30, dtype=torch.bool)
        drop[keep] = False
        zeroed[0].lam_out[drop] = 0
    x = torch.randn(50, 10, dtype=torch.float64)
    torch.testing.assert_close(mask_nodes(student, {0: torch.tensor(keep)})(x), zeroed(x))
    torch.testing.assert_close(remove_nodes(student, {0: torch.tensor(keep)})(x), zeroed(x), rtol=1e-12, atol=1e-12)


def test_keep_values_parse_and_bad_ones_are_named():
    assert parse_keep(25) == KeepSpec("count", 25)
    assert parse_keep("25") == KeepSpec("count", 25)
    assert parse_keep(0.1) == KeepSpec("fraction", 0.1)
    assert parse_keep("10%") == KeepSpec("fraction", 0.1)
    assert parse_keep(">0.05") == KeepSpec("threshold", 0.05)
    assert parse_keep("auto") == KeepSpec("auto")
    for bad in (0, -3, 1.5, "0", ">1.2", "abc", True, "150%"):
        with pytest.raises(PruneError, match=f"keep must be a count >= 1.*got {bad!r}"):
            parse_keep(bad)


def _scored_student(scores, dtype=torch.float64):
    """A spectral student whose first-layer eigenvalue scores are `scores` (phi rows of norm 1)."""
    n = len(scores)
    student = make_student(4, [LayerPlan(n), LayerPlan(3, "direct"), LayerPlan(1, "fixed")], seed=0, dtype=dtype)
    with torch.no_grad():
        student[0].phi.copy_(student[0].phi / student[0].phi.norm(dim=1, keepdim=True))
        student[0].lam_out.copy_(torch.tensor(scores, dtype=dtype))
    return student


def test_count_fraction_threshold_and_per_layer_dict_select_the_right_nodes():
    student = _scored_student([0.5, 4.0, 0.01, 3.0, 0.2, 1.0, 0.02, 2.0])
    assert node_importance(student[0]).tolist() == pytest.approx([0.5, 4.0, 0.01, 3.0, 0.2, 1.0, 0.02, 2.0])
    assert select_nodes(student, 3, layers=[0])[0].tolist() == [1, 3, 7]
    assert select_nodes(student, 0.5, layers=[0])[0].tolist() == [1, 3, 5, 7]
    assert select_nodes(student, 0.3, layers=[0])[0].tolist() == [1, 3, 7]  # ceil(2.4) = 3
    assert select_nodes(student, ">0.1", layers=[0])[0].tolist() == [0, 1, 3, 5, 7]  # score / 4 > 0.1
    both = select_nodes(student, {0: 2, 1: 1})
    assert both[0].tolist() == [1, 3] and len(both[1]) == 1
    assert layer_sizes(prune_nodes(student, {0: 2, 1: 1})) == [4, 2, 1, 1]
    assert layer_sizes(prune_nodes(student, 2)) == [4, 2, 2, 1]  # default: every hidden layer
    with pytest.raises(PruneError, match="keep=9 exceeds the width 8 of layer 0; give a count in 1..8"):
        prune_nodes(student, 9, layers=[0])
    with pytest.raises(PruneError, match=r"hidden layer index in 0..1, got 2"):
        prune_nodes(student, 2, layers=[2])
    with pytest.raises(PruneError, match="needs validation data"):
        prune_nodes(student, "auto")


def _diagonal(c, dtype=torch.float64):
    """Hidden node i reads input i with weight c_i; the readout sums them."""
    n = len(c)
    model = nn.Sequential(nn.Linear(n, n, bias=False, dtype=dtype), nn.ReLU(), nn.Linear(n, 1, bias=False, dtype=dtype))
    with torch.no_grad():
        model[0].weight.copy_(torch.diag(torch.tensor(c, dtype=dtype)))
        model[2].weight.fill_(1.0)
    return model


def test_auto_keeps_the_smallest_count_within_tolerance():
    c = [0.001, 3.0, 0.0005, 2.0, 0.002, 1.0, 0.03, 0.0]
    model = _diagonal(c)
    x = torch.randn(4000, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = model(x).squeeze(-1)  # the full model is exact
    # dropping nodes 0.03 and smaller costs <= 0.03^2 E[relu^2] ~ 5e-4 < atol; dropping the 1.0 node costs ~0.5
    assert select_nodes(model, "auto", x_val=x, y_val=y, atol=1e-3)[0].tolist() == [1, 3, 5]
    assert select_nodes(model, "auto", x_val=x, y_val=y, atol=1e-5)[0].tolist() == [1, 3, 5, 6]
    # node 7 (weight 0) costs nothing but rounding; node 2 (0.0005) costs ~1e-7
    assert select_nodes(model, "auto", x_val=x, y_val=y, atol=1e-12)[0].tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_auto_on_two_layers_shares_one_budget_measured_from_the_unpruned_model():
    g = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 20, dtype=torch.float64), nn.ReLU(), nn.Linear(20, 15, dtype=torch.float64), nn.ReLU(),
                          nn.Linear(15, 1, dtype=torch.float64))
    with torch.no_grad():
        for lin in (model[0], model[2], model[4]):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, dtype=torch.float64))
            lin.bias.zero_()
        model[0].weight[8:] *= 1e-4  # 12 nearly dead nodes in layer 0, 9 in layer 1
        model[2].weight[6:] *= 1e-4
    x = torch.randn(2000, 6, generator=g, dtype=torch.float64)
    y = model(x).squeeze(-1).detach()
    small = prune_nodes(model, "auto", x_val=x, y_val=y, atol=1e-3)
    sizes = layer_sizes(small)
    assert sizes[1] <= 8 and sizes[2] <= 6
    with torch.no_grad():
        assert float(task_loss(small(x), y, "regression")) <= 1e-3
        tighter = prune_nodes(model, "auto", x_val=x, y_val=y, atol=1e-12)
        assert float(task_loss(tighter(x), y, "regression")) <= 1e-12
    assert layer_sizes(tighter)[1:3] == [20, 15]  # every node costs something: nothing may go


def test_loss_for_every_kept_count_equals_masked_forward_passes():
    model = _random_mlp(5, spectral=True)
    x = torch.randn(300, 7, dtype=torch.float64)
    y = torch.randn(300, 2, dtype=torch.float64)[:, 0]
    model = nn.Sequential(*list(model)[:-2], nn.Linear(6, 1, dtype=torch.float64))  # one output: regression
    scores = node_importance(as_sequential(model)[2])
    curve = loss_by_kept(model, 1, scores, x, y, budget=500)  # several chunks
    for k in (1, 4, 10, 11):
        masked = mask_nodes(model, {1: top_k_mask(scores, k).nonzero().flatten()})
        assert curve[k - 1].item() == pytest.approx(task_loss(masked(x), y, "regression").item(), rel=1e-10)


class UserMLP(nn.Module):
    """A user's own model class: not an nn.Sequential, activations called as functions."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(10, 60)
        self.mid = nn.Linear(60, 10)
        self.readout = nn.Linear(10, 1, bias=False)

    def forward(self, x):
        return self.readout(F.relu(self.mid(torch.relu(self.inp(x)))))


def test_a_user_module_is_spectralized_trained_pruned_saved_and_reloaded(tmp_path):
    torch.manual_seed(0)
    model = UserMLP()
    model.readout.requires_grad_(False)
    x = torch.randn(400, 10)
    y = (x[:, :3].clamp_min(0) * torch.tensor([2.0, -1.0, 1.5])).sum(-1)
    ref = model(x)
    spectralize(model)
    assert isinstance(model.inp, SpectralLinear) and isinstance(model.mid, SpectralLinear)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)  # the same function
    assert model.readout.trainable_parts() == []  # a frozen layer stays frozen
    assert spectral_penalty(model).item() > 0
    lam0 = model.inp.lam_out.detach().clone()
    train_alone(model, x, y, TrainSpec(lr=0.01, batch_size=100, epochs=20), shuffle_seed=0)
    assert not torch.equal(model.inp.lam_out, lam0)  # the eigenvalues trained
    small = prune_nodes(model, {0: 12})
    assert layer_sizes(small) == [10, 12, 10, 1]
    torch.testing.assert_close(small(x), mask_nodes(model, select_nodes(model, {0: 12}))(x), rtol=1e-5, atol=1e-6)
    assert not small[-1].weight.requires_grad  # the frozen readout is still frozen
    for m, name in ((model, "full"), (small, "small")):
        path = save_model(m, tmp_path / f"{name}.safetensors", {"note": name})
        loaded, extra = load_model(path)
        assert extra == {"note": name}
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
    assert type(load_model(tmp_path / "small.safetensors")[0][0]) is nn.Linear
    despectralize(model)
    assert not any(isinstance(m, SpectralLinear) for m in model.modules())


def test_modules_that_are_not_mlps_are_refused_by_name():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return x + self.a(x)

    with pytest.raises(PruneError, match=r"not a chain .*prune other models with example_inputs"):
        prune_nodes(Residual(), 2)
    with pytest.raises(PruneError, match="cannot read LayerNorm"):
        prune_nodes(nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Linear(5, 1)), 2)


def test_pruned_wide_student_is_physically_smaller_and_computes_the_same():
    """Speed is measured in benchmarks/bench_inference.py (docs/benchmarks.md), not here."""
    student = make_student(10, [LayerPlan(1500), LayerPlan(10, "direct"), LayerPlan(1, "fixed")], seed=0)
    small = prune_nodes(student, 25, layers=[0])
    assert sum(p.numel() for p in small.parameters()) == 10 * 25 + 25 * 10 + 10
    kept = select_nodes(student, 25, layers=[0])
    x = torch.randn(512, 10)
    with torch.no_grad():
        assert _rel(small(x), mask_nodes(student, kept)(x)) <= 1e-6
