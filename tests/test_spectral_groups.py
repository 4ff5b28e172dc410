"""Grouped and depthwise spectral convolutions: exact conversion, the formula per group, penalty and importance by
brute force, training, and Torch-Pruning cutting through them as it cuts through their plain twins."""

import copy
import io

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F

from eigenprune import despectralize, node_importance, prune_nodes, spectral_penalty, spectralize
from eigenprune.core.convert import plan_spectralize
from eigenprune.core.layers import (
    DEPTHWISE_LAYERS,
    SpectralConv1d,
    SpectralConv2d,
    SpectralConv3d,
    SpectralDepthwiseConv2d,
    SpectralModule,
    spectral_twin,
)
from eigenprune.pruning.graph import (
    ROOT_TYPES,
    SPECTRAL_PRUNERS,
    ChannelPlan,
    EigenImportance,
    mask_graph,
    prune_graph,
    select_channels,
)
from eigenprune.pruning.keep import PruneError
from real_models import _randomize, _settle, assert_formula_outputs_and_gradients

PLAIN = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SPECTRAL = {1: SpectralConv1d, 2: SpectralConv2d, 3: SpectralConv3d}


class InvertedResidual(nn.Module):
    """A stem, then MobileNetV2's block: 1x1 expand, 3x3 depthwise, 1x1 project, BatchNorm, ReLU6, a residual; a head."""

    def __init__(self, c=4, expand=12):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.expand, self.bn1 = nn.Conv2d(c, expand, 1, bias=False), nn.BatchNorm2d(expand)
        self.dw, self.bn2 = nn.Conv2d(expand, expand, 3, padding=1, groups=expand, bias=False), nn.BatchNorm2d(expand)
        self.project, self.bn3 = nn.Conv2d(expand, c, 1, bias=False), nn.BatchNorm2d(c)
        self.head = nn.Conv2d(c, 3, 1)

    def forward(self, x):
        x = F.relu6(self.stem(x))
        h = F.relu6(self.bn1(self.expand(x)))
        h = F.relu6(self.bn2(self.dw(h)))
        return self.head(x + self.bn3(self.project(h)))


class ResNeXtBlock(nn.Module):
    """A stem, then ResNeXt's bottleneck: 1x1 reduce, 3x3 grouped (4 groups), 1x1 expand, a residual; a dense head."""

    def __init__(self, width=16, groups=4):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.reduce, self.bn1 = nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width)
        self.grouped = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.expand, self.bn3 = nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        h = torch.relu(self.bn1(self.reduce(x)))
        h = torch.relu(self.bn2(self.grouped(h)))
        return self.head(torch.relu(x + self.bn3(self.expand(h))).mean((2, 3)))


BLOCKS = {"inverted-residual": (InvertedResidual, (2, 3, 6, 6)), "resnext": (ResNeXtBlock, (2, 3, 6, 6))}


def _block(kind, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cls, shape = BLOCKS[kind]
    return _settle(cls()).to(dtype).eval(), torch.randn(*shape, dtype=dtype)


def _spectral_block(kind, seed=0):
    """A spectralized block with random lam_in and lam_out, so that every formula term counts."""
    model, x = _block(kind, seed=seed)
    spectralize(model, train_lam_in=True)
    for m in model.modules():
        if isinstance(m, SpectralModule):
            _randomize(m, seed)
    return model, x


# ---------------------------------------------------------------- the layer


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 4, "depthwise"])
@pytest.mark.parametrize("bias", [True, False])
def test_from_plain_and_to_plain_are_exact_for_every_groups(dims, groups, bias):
    torch.manual_seed(0)
    c_in, c_out, g = (8, 8, 8) if groups == "depthwise" else (8, 12, groups)
    plain = PLAIN[dims](c_in, c_out, 3, stride=1, padding=1, dilation=1, groups=g, bias=bias)
    spec = spectral_twin(type(plain)).from_plain(plain)
    assert isinstance(spec, SPECTRAL[dims]) and spec.groups == g
    assert (type(spec) in DEPTHWISE_LAYERS) == (groups == "depthwise")
    assert spec.phi.shape == plain.weight.shape and spec.lam_in.shape == (c_in,) and spec.lam_out.shape == (c_out,)
    x = torch.randn(2, c_in, *([5] * dims))
    assert torch.equal(spec.weight, plain.weight) and torch.equal(spec(x), plain(x))
    back = spec.to_plain()
    assert type(back) is type(plain) and back.groups == g
    assert torch.equal(back.weight, plain.weight) and torch.equal(back(x), plain(x))
    assert (back.bias is None) == (not bias)


@pytest.mark.parametrize("groups", [2, 4])
def test_a_grouped_weight_is_the_formula_with_each_groups_lam_in(groups):
    """w[o, j] = (lam_in[g * in/groups + j] - lam_out_o) * phi[o, j], g = o // (out/groups); outputs and gradients."""
    layer = SpectralConv2d(8, 12, 3, padding=1, groups=groups, bias=True, train_lam_in=True, dtype=torch.float64)
    _randomize(layer)
    assert_formula_outputs_and_gradients(layer, torch.randn(2, 8, 5, 5, dtype=torch.float64), F.conv2d, padding=1)


def test_a_depthwise_layer_is_its_own_type_and_stays_so():
    layer = SpectralConv2d(6, 6, 3, groups=6)
    assert type(layer) is SpectralDepthwiseConv2d and isinstance(layer, SpectralConv2d)
    assert type(SpectralConv1d(6, 6, 3, groups=6)).__name__ == "SpectralDepthwiseConv1d"
    assert type(SpectralConv3d(6, 6, 3, groups=6)).__name__ == "SpectralDepthwiseConv3d"
    assert type(SpectralConv2d(6, 12, 3, groups=6)) is SpectralConv2d  # a channel multiplier of 2: grouped, not depthwise
    assert type(SpectralConv2d(1, 1, 3, groups=1)) is SpectralConv2d
    assert type(copy.deepcopy(layer)) is SpectralDepthwiseConv2d
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    assert type(torch.load(buf, weights_only=False)) is SpectralDepthwiseConv2d
    assert "groups=6" in repr(layer) and "groups" not in repr(SpectralConv2d(6, 6, 3))


def test_bad_groups_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^SpectralConv2d groups must be a positive integer dividing in_channels and "
                                         r"out_channels \(4x6\), got 4$"):
        SpectralConv2d(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match=r"groups must be a positive integer .* got 0$"):
        SpectralConv1d(4, 4, 3, groups=0)
    with pytest.raises(ValueError, match=r"^SpectralDepthwiseConv2d needs groups == in_channels == out_channels, got groups=2"):
        SpectralDepthwiseConv2d(4, 4, 3, groups=2)


def test_penalty_and_node_importance_of_a_grouped_layer_match_brute_force():
    layer = SpectralConv2d(8, 12, 3, groups=4, bias=True, train_lam_in=True, l2_phi=0.3, l2_lam=0.2, l1_lam=0.1,
                           group_lasso=0.05, dtype=torch.float64)
    _randomize(layer, seed=3)
    phi, lam_in, lam_out = layer.phi.detach(), layer.lam_in.detach(), layer.lam_out.detach()
    rows = [torch.cat([((lam_in[o // 3 * 2 + j] - lam_out[o]) * phi[o, j]).flatten() for j in range(2)]) for o in range(12)]
    norms = torch.stack([r.norm() for r in rows])
    want = (0.3 * phi.square().sum() + 0.2 * (lam_in.square().sum() + lam_out.square().sum())
            + 0.1 * lam_out.abs().sum() + 0.05 * norms.sum())
    torch.testing.assert_close(layer.penalty(), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(node_importance(layer), norms, rtol=1e-12, atol=1e-12)
    # the paper's form (lam_in = 0, frozen): |lam_out_o| * ||phi_o||, and the same as the weights' norms
    paper = SpectralConv2d(8, 12, 3, groups=4, dtype=torch.float64)
    _randomize(paper, seed=4)
    with torch.no_grad():
        paper.lam_in.zero_()
    want = paper.lam_out.detach().abs() * paper.phi.detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(node_importance(paper), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(node_importance(paper.to_plain()), want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- whole models


@pytest.mark.parametrize("kind", list(BLOCKS))
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.float64, 1e-13)])
def test_spectralize_converts_grouped_and_depthwise_convolutions_exactly(kind, dtype, atol):
    model, x = _block(kind, dtype)
    want = model(x)
    report = plan_spectralize(model)
    assert set(report.left_alone) == {"bn1", "bn2", "bn3"}  # only the BatchNorms, which have no spectral form
    assert {"dw", "grouped"} & set(report.converted)
    spec = spectralize(copy.deepcopy(model))
    assert all(not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) for m in spec.modules())
    torch.testing.assert_close(spec(x), want, rtol=0, atol=atol)
    back = despectralize(spec)
    for (name, p), q in zip(model.named_parameters(), back.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(back(x), want)


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_training_a_spectralized_block_with_its_penalty(kind):
    model, x = _block(kind, torch.float32)
    model = spectralize(model.train(), train_lam_in=True, l1_lam=1e-3, group_lasso=1e-3)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = model(x).square().mean() + spectral_penalty(model)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    grouped = model.dw if kind == "inverted-residual" else model.grouped
    assert not torch.equal(grouped.lam_in, start[("dw" if kind == "inverted-residual" else "grouped") + ".lam_in"])


# ---------------------------------------------------------------- Torch-Pruning


def _root_group(dg, layer, idxs):
    return dg.get_pruning_group(layer, dg.get_pruner_of_module(layer).prune_out_channels, idxs)


def test_torch_pruning_couples_a_spectral_depthwise_conv_as_a_plain_one():
    model, x = _block("inverted-residual")
    spec = spectralize(copy.deepcopy(model))
    for m, pruners in ((model, None), (spec, SPECTRAL_PRUNERS)):
        dg = tp.DependencyGraph().build_dependency(m, example_inputs=x, customized_pruners=pruners, verbose=False)
        group = _root_group(dg, m.expand, [1, 5, 7])
        assert {it.dep.target.module for it in group} >= {m.expand, m.bn1, m.dw, m.bn2, m.project}
        group.prune()
    assert (spec.dw.in_channels, spec.dw.out_channels, spec.dw.groups, spec.dw.phi.shape[0], spec.dw.lam_in.shape[0]) == (9,) * 5
    assert torch.equal(despectralize(spec)(x), model(x))  # the plain model, pruned by Torch-Pruning alone


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_torch_pruning_meta_pruner_cuts_spectral_blocks_as_their_plain_twins(kind):
    """MetaPruner with the same criterion (EigenImportance: lam_in = 0, lam_out = 1 gives the plain weights' norms) cuts
    the same channels from the plain and the spectralized block: same sizes, same outputs."""
    model, x = _block(kind)
    spec = spectralize(copy.deepcopy(model))
    n0 = sum(p.numel() for p in model.parameters())
    head = [model.head]
    tp.pruner.MetaPruner(model, x, importance=EigenImportance(), pruning_ratio=0.5, ignored_layers=head).step()
    tp.pruner.MetaPruner(spec, x, importance=EigenImportance(), pruning_ratio=0.5, ignored_layers=[spec.head],
                         customized_pruners=SPECTRAL_PRUNERS, root_module_types=ROOT_TYPES).step()
    plain = despectralize(spec)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in model.parameters()) < n0
    assert str(plain) == str(model)
    torch.testing.assert_close(plain(x), model(x), rtol=1e-12, atol=1e-12)


def _plan(**kept):
    """A hand-made ChannelPlan keeping these channels of these root layers (widths from the blocks above)."""
    widths = {"expand": 12, "reduce": 16, "grouped": 16, "stem": 16}
    return ChannelPlan(kept={n: torch.tensor(k) for n, k in kept.items()}, widths={n: widths[n] for n in kept})


@pytest.mark.parametrize("kind,plan", [
    ("inverted-residual", _plan(expand=[0, 2, 3, 4, 6, 8, 9, 10, 11])),
    ("resnext", _plan(reduce=[1, 2, 3, 4, 6, 7, 8, 9, 11, 12, 13, 15])),  # one input of each of the 4 groups, other offsets
    ("resnext", _plan(grouped=[0, 1, 5, 6, 8, 11, 12, 13])),  # two outputs of each group
    ("resnext", _plan(stem=list(range(0, 16, 2)), reduce=[0, 1, 4, 5, 8, 9, 12, 13], grouped=list(range(0, 16, 2)))),
])
@pytest.mark.parametrize("keep_spectral", [True, False])
def test_pruned_equals_masked_through_grouped_and_depthwise_spectral_convs(kind, plan, keep_spectral):
    model, x = _spectral_block(kind)
    pruned = prune_graph(model, plan, x, keep_spectral=keep_spectral)
    masked = mask_graph(model, plan, x)
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(masked(x), model(x))
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_a_grouped_conv_must_lose_as_many_channels_in_every_group():
    model, x = _spectral_block("resnext")
    with pytest.raises(PruneError, match=r"^cannot remove input channels \[0, 1\] of SpectralConv2d with groups=4 \(4 per "
                                         r"group\): every group must lose as many as the others, they would lose \[2, 0, 0, 0\]$"):
        prune_graph(model, _plan(reduce=list(range(2, 16))), x)
    with pytest.raises(PruneError, match=r"^cannot remove output channels \[15\] of SpectralConv2d with groups=4"):
        prune_graph(model, _plan(grouped=list(range(15))), x)


def test_pruners_report_channel_groups_as_torch_pruning_expects():
    model, _ = _spectral_block("inverted-residual")
    depthwise = SPECTRAL_PRUNERS[type(model.dw)]
    assert depthwise.get_in_channel_groups(model.dw) == depthwise.get_out_channel_groups(model.dw) == 1  # each its own
    assert SPECTRAL_PRUNERS[type(model.dw)].prune_in_channels == SPECTRAL_PRUNERS[type(model.dw)].prune_out_channels
    model, _ = _spectral_block("resnext")
    pruner = SPECTRAL_PRUNERS[type(model.grouped)]
    assert pruner.get_in_channel_groups(model.grouped) == pruner.get_out_channel_groups(model.grouped) == 4
    assert pruner.prune_in_channels != pruner.prune_out_channels


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_prune_nodes_on_spectralized_blocks_is_exact_where_it_prunes(kind):
    """End to end: whatever groups the graph path prunes (grouped ones once its rules let them through), the result
    equals the masked model and is smaller."""
    model, x = _spectral_block(kind)
    pruned = prune_nodes(model, 0.5, example_inputs=x, keep_spectral=True)
    plan = select_channels(model, 0.5, x)
    torch.testing.assert_close(pruned(x), mask_graph(model, plan, x)(x), rtol=1e-10, atol=1e-12)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
