import pytest
import torch
from torch import nn
from torch.nn import functional as F

from eigenprune import SpectralLinear, despectralize, spectral_weight, spectralize


def test_weight_is_the_spectral_formula():
    layer = SpectralLinear(4, 3, train_lam_in=True, dtype=torch.float64)
    with torch.no_grad():
        layer.lam_in.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
        layer.lam_out.copy_(torch.tensor([1.5, 0.0, -2.0]))
    w = layer.weight
    for i in range(3):
        for j in range(4):
            assert w[i, j].item() == pytest.approx((layer.lam_in[j] - layer.lam_out[i]).item() * layer.phi[i, j].item())
    x = torch.randn(7, 4, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ w.T)


def test_paper_defaults():
    layer = SpectralLinear(10, 5)
    assert not layer.lam_in.requires_grad and torch.all(layer.lam_in == 0)
    assert layer.lam_out.requires_grad and torch.all(layer.lam_out == 1)
    assert layer.phi.requires_grad and layer.bias is None
    bound = (6 / 15) ** 0.5
    assert layer.phi.abs().max() <= bound
    big = SpectralLinear(300, 300)
    assert big.phi.abs().max() > 0.95 * (6 / 600) ** 0.5  # Glorot uniform fills its range
    torch.testing.assert_close(layer.weight, -layer.phi)


def test_gradients_match_the_chain_rule():
    layer = SpectralLinear(5, 4, train_lam_in=True, dtype=torch.float64)
    with torch.no_grad():
        layer.lam_in.uniform_(-1, 1)
        layer.lam_out.uniform_(-1, 1)
    x = torch.randn(9, 5, dtype=torch.float64)
    layer(x).square().sum().backward()
    w = layer.weight.detach().requires_grad_(True)
    F.linear(x, w).square().sum().backward()
    g = w.grad
    lam_diff = layer.lam_in.detach()[None, :] - layer.lam_out.detach()[:, None]
    torch.testing.assert_close(layer.phi.grad, lam_diff * g)
    torch.testing.assert_close(layer.lam_out.grad, -(layer.phi.detach() * g).sum(1))
    torch.testing.assert_close(layer.lam_in.grad, (layer.phi.detach() * g).sum(0))


def test_from_and_to_plain_are_exact_for_a_linear():
    lin = nn.Linear(6, 3)
    spec = SpectralLinear.from_plain(lin)
    x = torch.randn(11, 6)
    assert torch.equal(spec(x), lin(x))
    back = spec.to_plain()
    assert type(back) is nn.Linear
    assert torch.equal(back.weight, lin.weight) and torch.equal(back.bias, lin.bias)


def test_penalty_counts_only_trainable_parts():
    layer = SpectralLinear(3, 2, l2_phi=0.1, l2_lam=0.5)
    with torch.no_grad():
        layer.phi.fill_(2.0)
        layer.lam_out.copy_(torch.tensor([1.0, 3.0]))
        layer.lam_in.fill_(7.0)  # frozen: not penalised
    assert layer.penalty().item() == pytest.approx(0.1 * 6 * 4 + 0.5 * (1 + 9))
    direct = SpectralLinear(3, 2, train_lam_out=False, l2_phi=0.1)
    with torch.no_grad():
        direct.phi.fill_(1.0)
    assert direct.penalty().item() == pytest.approx(0.6)


def test_spectral_weight_broadcasts_over_students():
    phi = torch.randn(4, 3, 2)
    lam_in, lam_out = torch.randn(4, 2), torch.randn(4, 3)
    w = spectral_weight(phi, lam_in, lam_out)
    for s in range(4):
        torch.testing.assert_close(w[s], spectral_weight(phi[s], lam_in[s], lam_out[s]))


def test_spectralize_any_module_round_trip():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8))
            self.out = nn.Linear(8, 2, bias=False)

        def forward(self, x):
            return self.out(torch.relu(self.body(x)))

    net = Net()
    x = torch.randn(4, 5)
    ref = net(x)
    spectralize(net)
    assert sum(isinstance(m, SpectralLinear) for m in net.modules()) == 3
    assert not any(type(m) is nn.Linear for m in net.modules())
    torch.testing.assert_close(net(x), ref, rtol=0, atol=0)
    despectralize(net)
    assert sum(type(m) is nn.Linear for m in net.modules()) == 3
    torch.testing.assert_close(net(x), ref, rtol=0, atol=0)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="positive integers, got 0x3"):
        SpectralLinear(0, 3)


def test_node_importance_is_the_norm_of_the_actual_incoming_weights():
    """With lam_in trained, a node whose lam_out is 0 still has weights lam_in * phi: it must score their norm."""
    from eigenprune import node_importance

    layer = SpectralLinear(4, 3, train_lam_in=True, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lam_in.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
        layer.lam_out.copy_(torch.tensor([0.0, 1.0, -2.0]))
    want = ((layer.lam_in[None, :] - layer.lam_out[:, None]) * layer.phi).norm(dim=1)
    got = node_importance(layer)
    assert got[0] > 0
    torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=0)
    paper = SpectralLinear(4, 3, generator=torch.Generator().manual_seed(0))  # lam_in = 0: the paper's |lam_out| ||phi||
    with torch.no_grad():
        paper.lam_out.copy_(torch.tensor([0.0, 1.0, -2.0]))
    torch.testing.assert_close(node_importance(paper), paper.lam_out.abs() * paper.phi.norm(dim=1), rtol=0, atol=0)


def test_a_layers_role_is_read_once_from_what_trains():
    from eigenprune.core import LayerPlan, SpectralConv2d
    from eigenprune.core.plans import make_layer
    from eigenprune.pruning import get_criterion

    g = torch.Generator().manual_seed(0)
    for kind in ("spectral", "direct", "fixed"):
        assert make_layer(3, LayerPlan(4, kind), g, torch.float32).role == kind
    ranked = {name: make_layer(3, get_criterion(name).layer_plan(4), g, torch.float32).ranked
              for name in ("eigenvalue", "feature_norm", "slimming", "group_lasso")}
    assert ranked == {"eigenvalue": True, "feature_norm": True, "slimming": True, "group_lasso": True}
    assert not make_layer(3, LayerPlan(4, "direct", 0.0, 0.0), g, torch.float32).ranked  # the paper's dense `rest`
    assert not make_layer(3, LayerPlan(4, "fixed", 0.0, 0.0), g, torch.float32).ranked  # the frozen readout
    layer = spectralize(nn.Linear(3, 4))
    assert layer.role == "spectral" and layer.ranked
    layer.lam_out.requires_grad_(False)  # the flags are the record: changing them changes the role
    assert layer.role == "direct"
    layer.phi.requires_grad_(False)
    assert layer.role == "fixed"
    assert SpectralConv2d(2, 3, 3, train_lam_out=False).role == "direct"
