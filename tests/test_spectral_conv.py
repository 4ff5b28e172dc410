"""Spectral convolutions against their plain PyTorch twins; spectralize/despectralize on any module."""

import copy
import logging

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from eigenprune import SpectralLinear, despectralize, node_importance, spectral_penalty, spectralize
from eigenprune.core.convert import SpectralizeError, plan_spectralize
from eigenprune.core.layers import (
    PLAIN_LAYERS,
    SPECTRAL_LAYERS,
    SpectralConv1d,
    SpectralConv2d,
    SpectralConv3d,
    spectral_twin,
    spectral_weight,
)
from real_models import CNN, MODELS, CNN3d, TinyTransformer, _randomize, _settle, assert_formula_outputs_and_gradients


@pytest.mark.parametrize("cls,conv,shape", [(SpectralConv1d, F.conv1d, (3, 4, 11)), (SpectralConv2d, F.conv2d, (3, 4, 7, 6)),
                                            (SpectralConv3d, F.conv3d, (2, 4, 5, 6, 4))])
def test_spectral_conv_outputs_and_gradients_match_autograd_on_the_formula(cls, conv, shape):
    layer = cls(4, 5, 3, stride=2, padding=1, dilation=1, bias=True, train_lam_in=True, dtype=torch.float64)
    _randomize(layer)
    # the oracle: the formula written out per entry, differentiated by autograd
    assert_formula_outputs_and_gradients(layer, torch.randn(*shape, dtype=torch.float64), conv, stride=2, padding=1)


@pytest.mark.parametrize("plain", [nn.Conv1d(3, 6, 5, padding="same", bias=True),
                                   nn.Conv2d(3, 6, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), bias=False),
                                   nn.Conv3d(3, 6, (3, 1, 2), stride=(1, 2, 1), padding=1, dilation=(2, 1, 1), bias=True)])
def test_from_and_to_plain_are_exact_and_keep_gradients(plain):
    spec = spectral_twin(type(plain)).from_plain(plain)
    assert type(spec).plain is type(plain)
    x = torch.randn(2, 3, *([9] * (spec.kernel_dims)), requires_grad=True)
    out = spec(x)
    assert torch.equal(out, plain(x))
    gx_spec, = torch.autograd.grad(out.sum(), x)
    gx_plain, = torch.autograd.grad(plain(x).sum(), x)
    assert torch.equal(gx_spec, gx_plain)
    back = spec.to_plain()
    assert type(back) is type(plain) and torch.equal(back.weight, plain.weight) and torch.equal(back(x), plain(x))
    assert (back.bias is None) == (plain.bias is None)


def test_a_kernel_one_conv_is_a_spectral_linear_with_the_same_penalty():
    lin = SpectralLinear(4, 3, bias=True, train_lam_in=True, l1_lam=0.1, group_lasso=0.2, dtype=torch.float64)
    _randomize(lin)
    conv = SpectralConv1d(4, 3, 1, bias=True, train_lam_in=True, l1_lam=0.1, group_lasso=0.2, dtype=torch.float64)
    with torch.no_grad():
        conv.phi.copy_(lin.phi[..., None])
        conv.lam_in.copy_(lin.lam_in)
        conv.lam_out.copy_(lin.lam_out)
        conv.bias.copy_(lin.bias)
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(conv(x[..., None])[..., 0], lin(x))
    torch.testing.assert_close(conv.penalty(), lin.penalty())
    assert conv.trainable_parts() == lin.trainable_parts() == ["phi", "lam_in", "lam_out", "bias"]


def test_spectral_weight_broadcasts_over_kernel_dims():
    phi = torch.randn(2, 5, 4, 3, 3)
    lam_in, lam_out = torch.randn(2, 4), torch.randn(2, 5)
    w = spectral_weight(phi, lam_in, lam_out, kernel_dims=2)
    o, i, s = 3, 1, 1
    torch.testing.assert_close(w[s, o, i], (lam_in[s, i] - lam_out[s, o]) * phi[s, o, i])


def test_conv_glorot_bound_counts_the_kernel():
    layer = SpectralConv2d(16, 32, 3, generator=torch.Generator().manual_seed(0))
    bound = (6 / ((16 + 32) * 9)) ** 0.5
    assert layer.phi.abs().max() <= bound and layer.phi.abs().max() > 0.95 * bound


# --- whole models ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(MODELS))
def test_spectralize_despectralize_round_trip_is_exact(kind):
    torch.manual_seed(0)
    cls, shape = MODELS[kind]
    model = _settle(cls()).eval()
    x = torch.randn(*shape, requires_grad=True)
    ref = model(x)
    ref_gx, = torch.autograd.grad(ref.sum(), x)
    plain_types = sum(type(m) in PLAIN_LAYERS for m in model.modules())
    spectralize(model)
    spectral = [m for m in model.modules() if isinstance(m, SPECTRAL_LAYERS)]
    assert len(spectral) == plain_types
    out = model(x)
    gx, = torch.autograd.grad(out.sum(), x)
    assert torch.equal(out, ref) and torch.equal(gx, ref_gx)
    assert spectral_penalty(model) > 0
    despectralize(model)
    assert sum(type(m) in PLAIN_LAYERS for m in model.modules()) == plain_types
    assert torch.equal(model(x), ref)


def test_the_report_lists_what_is_converted_and_what_is_left_alone(caplog):
    model = TinyTransformer()
    report = plan_spectralize(model)
    assert report.converted == ["embed", "encoder.linear1", "encoder.linear2", "head"]
    assert set(report.left_alone) == {"encoder.self_attn", "encoder.self_attn.out_proj", "encoder.norm1", "encoder.norm2"}
    assert "LayerNorm has no spectral form" in report.left_alone["encoder.norm1"]
    with caplog.at_level(logging.INFO, logger="eigenprune"):
        spectralize(model)
    assert "converted 4 layer(s), left 4 alone" in caplog.text and "encoder.norm2" in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["spectralize left encoder.self_attn.out_proj (NonDynamicallyQuantizableLinear) alone: "
                        "NonDynamicallyQuantizableLinear has no spectral form (Linear, Conv1d, Conv2d, Conv3d have)"]
    assert type(model.encoder.self_attn.out_proj) is not SpectralLinear


def test_include_and_exclude_select_layers_by_name_or_type():
    cnn = CNN()
    assert plan_spectralize(cnn, include=[nn.Conv2d]).converted == ["c1", "c2"]
    report = plan_spectralize(cnn, include=["c*"], exclude=["c3"])
    assert report.converted == ["c1", "c2"]
    assert report.left_alone["c3"] == "matched by exclude" and report.left_alone["head"] == "not matched by include"
    spectralize(cnn, exclude=[nn.Linear])
    assert type(cnn.head) is nn.Linear and isinstance(cnn.c3, SpectralConv1d)


def test_unsupported_convolutions_are_reported_not_converted():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                          nn.ConvTranspose3d(4, 4, 1), nn.Conv3d(4, 4, 1, groups=4))
    report = plan_spectralize(model)
    assert report.converted == ["0", "3"]  # grouped and depthwise convolutions have an exact spectral form
    assert report.left_alone == {"1": "padding_mode='reflect' (only 'zeros' is supported)",
                                 "2": "ConvTranspose3d has no spectral form (Linear, Conv1d, Conv2d, Conv3d have)"}


def test_a_lazy_layer_is_refused_in_one_line():
    model = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(SpectralizeError, match=r"^cannot spectralize 0 \(LazyLinear\): its parameters are not initialised yet"):
        spectralize(model)
    model(torch.randn(2, 5))  # initialised: now an nn.Linear
    spectralize(model)
    assert isinstance(model[0], SpectralLinear)


def test_a_layer_used_twice_stays_one_layer_and_tied_parameters_are_left_alone():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.randn(3, 4)
    ref = model(x)
    spectralize(model)
    assert model[0] is model[2] and isinstance(model[0], SpectralLinear)
    assert torch.equal(model(x), ref)
    assert sum(1 for _ in model.parameters()) == 4  # phi, lam_in, lam_out, bias, once
    despectralize(model)
    assert model[0] is model[2] and type(model[0]) is nn.Linear

    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight  # two modules, one weight: converting one would untie them
    tied = nn.Sequential(a, b)
    report = plan_spectralize(tied)
    assert report.converted == [] and "shared with 1" in report.left_alone["0"] and "shared with 0" in report.left_alone["1"]


def test_state_dict_round_trip_and_torch_compile(tmp_path):
    torch.manual_seed(0)
    model = spectralize(_settle(CNN()), train_lam_in=True).eval()
    for m in model.modules():
        if hasattr(m, "lam_in"):
            _randomize(m)
    torch.save(model.state_dict(), tmp_path / "cnn.pt")
    fresh = spectralize(CNN(), train_lam_in=True).eval()
    fresh.load_state_dict(torch.load(tmp_path / "cnn.pt"))
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(fresh(x), model(x))
    assert set(model.state_dict()) >= {"c1.phi", "c1.lam_in", "c1.lam_out", "c1.bias", "head.phi"}

    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, model(x), rtol=1e-6, atol=1e-6)
    out.square().sum().backward()
    model(x).square().sum().backward()
    got = dict(compiled.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(got["_orig_mod." + name].grad, p.grad, rtol=1e-5, atol=1e-6)


# --- a layer type is declared once ------------------------------------------------------------------------


def test_every_spectral_layer_declares_its_plain_twin_and_functional_once():
    assert [cls.plain for cls in SPECTRAL_LAYERS] == [nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d] == list(PLAIN_LAYERS)
    assert [cls.functional for cls in SPECTRAL_LAYERS] == [F.linear, F.conv1d, F.conv2d, F.conv3d]
    for cls in SPECTRAL_LAYERS:
        assert spectral_twin(cls.plain) is cls
    assert spectral_twin(nn.ConvTranspose2d) is None and spectral_twin(nn.modules.linear.NonDynamicallyQuantizableLinear) is None


def test_a_conv3d_model_spectralizes_and_back_exactly_with_penalty_and_importance():
    torch.manual_seed(0)
    model = _settle(CNN3d()).eval()
    x = torch.randn(3, 2, 4, 4, 4, requires_grad=True)
    ref = model(x)
    ref_gx, = torch.autograd.grad(ref.sum(), x)
    plain_c1 = copy.deepcopy(model.c1)
    spectralize(model)
    assert type(model.c1) is type(model.c2) is SpectralConv3d and type(model.head) is SpectralLinear
    out = model(x)
    gx, = torch.autograd.grad(out.sum(), x)
    assert torch.equal(out, ref) and torch.equal(gx, ref_gx)
    # penalty: the paper's L2 terms over the trained parts (lam_in is frozen by default)
    want = sum(0.01 * m.phi.square().sum() + 5e-4 * m.lam_out.square().sum() for m in (model.c1, model.c2, model.head))
    torch.testing.assert_close(spectral_penalty(model), want)
    # importance: the norm of each output channel's incoming weights (all kernel positions), the plain layer's too
    want = plain_c1.weight.detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(node_importance(model.c1), want)
    torch.testing.assert_close(node_importance(plain_c1), want)
    with torch.no_grad():
        model.c1.lam_out.mul_(torch.linspace(0.1, 2, 6))
    torch.testing.assert_close(node_importance(model.c1), model.c1.lam_out.abs().detach() * model.c1.phi.detach().flatten(1).norm(dim=1))
    spectral_out = model(x)
    despectralize(model)
    assert type(model.c1) is type(model.c2) is nn.Conv3d and type(model.head) is nn.Linear
    assert torch.equal(model(x), spectral_out)
