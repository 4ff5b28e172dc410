"""The standard architectures' blocks (tests/zoo_blocks.py) through the graph path, beside Torch-Pruning's own pruner.

For each block: `spectralize` computes what the plain model computes; `prune_nodes` at keep 0.75/0.5/0.25 computes
what `mask_graph` computes (float64, on the spectralized model with random eigenvalues); the kept parameter fraction
matches Torch-Pruning 1.6.1's `MetaPruner` with L2 magnitude at the same ratio, on the same groups; the pruned
models export to ONNX. Widths are multiples of 4, so ceil(keep x width) (ours) and width - floor(ratio x width)
(Torch-Pruning) agree at these keeps.

What is not pruned yet, and asserted as such: the residual stream of the LayerNorm blocks (`convnext`, `vit`): a
LayerNorm normalises all channels together, so cutting one cannot equal masking it (Torch-Pruning prunes it
anyway; there the comparison is with Torch-Pruning told to leave the stream alone). `shufflenet`: the groups
through the channel shuffle (a reshape that splits the channel dimension) are left alone: Torch-Pruning
mis-maps them (its pruned model raises a shape error), so the comparison leaves them out too.
"""

import copy
import warnings

import pytest
import torch
import torch_pruning as tp
from torch import nn

from eigenprune import prune_nodes, spectralize
from eigenprune.core.layers import SpectralModule
from eigenprune.pruning.graph import choose_channels, mask_graph, prune_graph, select_channels
from zoo_blocks import ZOO, ConvNeXtBlock, DenseBlock, InvertedResidualSE, ResNeXtBlock, ShuffleUnit, make, settle

KEEPS = (0.75, 0.5, 0.25)

STREAM = {"convnext": ["stem.0"], "vit": ["patch_embed"], "shufflenet": ["stem.0", "block.branch.5"]}
"""Layers whose groups we leave alone (and why, above): Torch-Pruning is told to ignore them too for the comparison."""


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _random_eigenvalues(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SpectralModule):
                for p in (m.lam_in, m.lam_out):
                    p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 2 - 1)
    return model


def _torch_pruning_fraction(model, x, keep, ignored=()):
    theirs = copy.deepcopy(model)
    ignored_layers = [theirs.head] + [theirs.get_submodule(n) for n in ignored]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tp.pruner.MetaPruner(theirs, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=1 - keep,
                             ignored_layers=ignored_layers).step()
    theirs(x)  # Torch-Pruning's model runs
    return _params(theirs) / _params(model)


@pytest.mark.parametrize("name", list(ZOO))
def test_block_is_spectralized_and_pruned_exactly_and_as_far_as_torch_pruning(name):
    model = make(name).double()
    x = torch.randn(*ZOO[name][1], dtype=torch.float64)
    spectral = spectralize(copy.deepcopy(model))
    torch.testing.assert_close(spectral(x), model(x), rtol=1e-12, atol=1e-12)
    spectral = _random_eigenvalues(spectral)
    plan = select_channels(spectral, 1.0, x)
    assert plan.kept and all(len(v) == plan.widths[n] for n, v in plan.kept.items())
    for keep in KEEPS:
        small = choose_channels(plan, keep)
        pruned, masked = prune_graph(spectral, small, x), mask_graph(spectral, small, x)
        torch.testing.assert_close(pruned(x), masked(x), rtol=1e-10, atol=1e-12)
        assert not torch.allclose(masked(x), spectral(x))  # the pruning did something
        ours = _params(prune_nodes(model, keep, example_inputs=x)) / _params(model)
        theirs = _torch_pruning_fraction(model, x, keep, STREAM.get(name, ()))
        assert abs(ours - theirs) < 0.02, (keep, ours, theirs)


def test_grouped_convolutions_lose_the_same_positions_in_every_group():
    model, x = make("resnext").double(), torch.randn(2, 3, 16, 16, dtype=torch.float64)
    plan = select_channels(model, 0.5, x)
    assert plan.blocks == {"block.conv1": 4, "block.conv2": 4} and plan.left_alone == {"head": "its channels are model outputs"}
    for name in ("block.conv1", "block.conv2"):
        kept = plan.kept[name].view(4, -1)
        assert plan.scores[name].shape == (4,) and kept.shape == (4, 2)
        assert torch.equal(kept - kept[:1], torch.arange(4).unsqueeze(1) * 4 * torch.ones(1, 2, dtype=torch.long))
    small = prune_nodes(model, {"block.conv2": 6}, example_inputs=x)  # a count: rounded up to a multiple of the groups
    assert small.block.conv2.out_channels == 8 and small.block.conv2.weight.shape == (8, 4, 3, 3)
    glob = select_channels(model, 0.5, x, global_ranking=True)
    assert all(len(v) % plan.blocks.get(n, 1) == 0 for n, v in glob.kept.items())
    with torch.no_grad():  # the scores: the norm of a position's incoming weights over the four groups
        model.block.conv2.weight[[1, 5, 9, 13]] = 0
    plan = select_channels(model, 0.75, x)
    assert 1 not in plan.kept["block.conv2"].tolist() and plan.scores["block.conv2"][1] == 0


def test_a_depthwise_convolution_goes_with_its_input_and_scales_the_score():
    model, x = make("mbv3").double(), torch.randn(2, 3, 16, 16, dtype=torch.float64)
    plan = select_channels(model, 0.5, x)
    group = plan.members["block.dw.0"]
    assert plan.members["block.expand.0"] == plan.members["block.se.fc2"] == group
    assert set(plan.left_alone) == {"head"}
    with torch.no_grad():
        model.block.dw[0].weight[7] = 0  # a dead depthwise kernel: channel 7 carries nothing, however large its expand row
        model.block.expand[0].weight[7] *= 100
    assert 7 not in select_channels(model, {"block.dw.0": 31}, x).kept[group].tolist()
    small = prune_nodes(model, 0.5, example_inputs=x)
    assert small.block.dw[0].groups == small.block.dw[0].out_channels == small.block.expand[0].out_channels == 16


def test_layer_scale_class_token_and_position_embedding_are_not_refused():
    model, x = make("convnext_bn").double(), torch.randn(2, 3, 16, 16, dtype=torch.float64)
    plan = select_channels(model, 0.5, x)
    small = prune_graph(model, plan, x)
    assert small.block.gamma.shape == (8,) and small.block.dwconv.out_channels == 8
    torch.testing.assert_close(small(x), mask_graph(model, plan, x)(x), rtol=1e-10, atol=1e-12)
    model = make("convnext").double()  # with its LayerNorm: the MLP is pruned, the stream (and gamma) left alone
    plan = select_channels(model, 0.5, x)
    assert set(plan.kept) == {"block.pwconv1"} and "LayerNorm" in plan.left_alone["block.pwconv2"]
    assert prune_nodes(model, 0.5, example_inputs=x).block.gamma.shape == (16,)
    vit = make("vit").double()
    plan = select_channels(vit, 0.25, x)
    assert set(plan.kept) == {"fc1"} and "LayerNorm" in plan.left_alone["patch_embed"]
    small = prune_graph(vit, plan, x)
    assert small.fc1.out_features == 8 and small.cls_token.shape == (1, 1, 16) and small.pos_embed.shape == (1, 17, 16)
    torch.testing.assert_close(small(x), mask_graph(vit, plan, x)(x), rtol=1e-10, atol=1e-12)


def test_a_channel_shuffle_is_left_alone_and_said_why():
    model, x = make("shufflenet").double(), torch.randn(2, 3, 16, 16, dtype=torch.float64)
    plan = select_channels(model, 0.5, x)
    assert set(plan.kept) == {"block.branch.3"}  # the branch's inner channels (1x1 -> depthwise -> 1x1) are pruned
    assert plan.left_alone["stem.0"] == plan.left_alone["block.branch.5"] == (
        "its channels pass through a reshape from [2, 16, 16, 16] to [2, 2, 8, 16, 16] that splits a dimension (e.g. a "
        "channel shuffle), which Torch-Pruning cannot follow")


class InputResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(6, 12), nn.Linear(12, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.head(x + self.fc2(torch.relu(self.fc1(x))))


def test_channels_tied_to_a_model_input_are_left_alone():
    """y = head(x + fc2(relu(fc1(x)))): fc2's channels are added to the input, which keeps all of its channels."""
    model, x = InputResidual(), torch.randn(3, 6)
    plan = select_channels(model, 0.5, x)
    assert set(plan.kept) == {"fc1"}
    assert plan.left_alone["fc2"] == ("its channels meet a model input (e.g. a residual sum with the input), whose channels "
                                      "cannot be removed")
    small = prune_nodes(model, 0.5, example_inputs=x)
    assert small.fc2.out_features == 6
    torch.testing.assert_close(small(x), mask_graph(model, plan, x)(x), rtol=0, atol=1e-6)


class ConvZoo(nn.Module):
    """Every conv block of the zoo in one classifier, so one ONNX export covers them all (an export costs seconds)."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(ResNeXtBlock(c), InvertedResidualSE(c), ConvNeXtBlock(c, "batch"), ShuffleUnit(c),
                                    DenseBlock(c))
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(torch.nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


@pytest.mark.parametrize("kind", ["conv", "vit"])
def test_pruned_zoo_exports_to_onnx(tmp_path, kind):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from eigenprune.pruning.export import check_onnx, export_module_onnx

    torch.manual_seed(0)
    model = settle(ConvZoo()) if kind == "conv" else make("vit")
    x = torch.randn(2, 3, 16, 16)
    plan = select_channels(model, 0.5, x)
    pruned = prune_graph(model, plan, x).eval()
    torch.testing.assert_close(pruned(x), mask_graph(model, plan, x)(x), rtol=1e-4, atol=1e-5)
    assert _params(pruned) < 0.9 * _params(model)
    path = export_module_onnx(pruned, x, tmp_path / f"{kind}.onnx")
    assert check_onnx(path, pruned, torch.randn(3, 3, 16, 16)) < 1e-4


class ConcatIntoGroupedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.g(torch.relu(torch.cat([self.a(x), self.b(x)], 1))).mean((2, 3)))


def test_a_grouped_convolution_behind_a_concatenation_is_left_alone():
    """Its conv groups straddle the concatenated inputs: which positions go together is not the inputs' own."""
    model, x = ConcatIntoGroupedConv().double(), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    plan = select_channels(model, 0.5, x)
    assert set(plan.kept) == {"g"} and plan.left_alone["a"] == plan.left_alone["b"] == (
        "it shares channels with g, which is a grouped convolution (groups=4) reached through a concatenation, split or slice")
    torch.testing.assert_close(prune_graph(model, plan, x)(x), mask_graph(model, plan, x)(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,grouped", [("resnext", "block.conv2"), ("mbv3", "block.dw.0"), ("convnext_bn", "block.dwconv")])
def test_spectralized_grouped_and_depthwise_convs_are_pruned_through_as_the_plain_ones(name, grouped):
    """spectralize makes the grouped and depthwise convolutions spectral (SpectralConv2d with groups, and the
    SpectralDepthwiseConv2d type); the graph path prunes through them: the same groups, blocks and members as the plain
    model, pruned equal to masked, and the same kept parameter fraction as the plain model at each keep."""
    model = make(name).double()
    x = torch.randn(*ZOO[name][1], dtype=torch.float64)
    spectral = _random_eigenvalues(spectralize(copy.deepcopy(model)))
    assert isinstance(spectral.get_submodule(grouped), SpectralModule) and spectral.get_submodule(grouped).groups > 1
    plan, plain_plan = select_channels(spectral, 1.0, x), select_channels(model, 1.0, x)
    assert plan.left_alone == plain_plan.left_alone == {"head": "its channels are model outputs"}
    assert plan.members == plain_plan.members and grouped in plan.members and plan.blocks == plain_plan.blocks
    for keep in KEEPS:
        small = choose_channels(plan, keep)
        pruned = prune_graph(spectral, small, x, keep_spectral=True)
        torch.testing.assert_close(pruned(x), mask_graph(spectral, small, x)(x), rtol=1e-10, atol=1e-12)
        assert pruned.get_submodule(grouped).out_channels < spectral.get_submodule(grouped).out_channels
        ours = _params(prune_nodes(spectral, keep, example_inputs=x)) / _params(model)  # back to plain layers
        plain = _params(prune_nodes(model, keep, example_inputs=x)) / _params(model)
        assert ours == plain, (keep, ours, plain)


@pytest.mark.parametrize("name", ["convnext", "vit"])
def test_exact_false_prunes_the_layer_norm_streams_with_their_bare_parameters_as_far_as_torch_pruning(name):
    """exact=False with bare parameters on the stream (ConvNeXt's layer scale; a ViT's class token and position
    embedding, nn.MultiheadAttention): the stream is pruned (not exactly: through its LayerNorms) with its parameters
    sliced, plain and spectralized alike, to Torch-Pruning's fraction with no group left out."""
    model = make(name)
    x = torch.randn(*ZOO[name][1])
    for keep in (0.5, 0.25):
        theirs = _torch_pruning_fraction(model, x, keep)
        for m in (model, spectralize(copy.deepcopy(model))):
            plan = select_channels(m, keep, x, exact=False)
            assert any("LayerNorm" in through for through in plan.inexact.values())
            small = prune_nodes(m, keep, example_inputs=x, exact=False)
            assert small(x).shape == model(x).shape
            assert abs(_params(small) / _params(model) - theirs) < 0.02, (keep, _params(small) / _params(model), theirs)
