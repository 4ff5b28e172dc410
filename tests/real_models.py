"""Small models of the kinds people prune (a residual CNN, a residual MLP, a transformer block), shared by the tests."""

import torch
from torch import nn
from torch.nn import functional as F


def _randomize(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.lam_in, layer.lam_out):
            p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 2 - 1)
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g, dtype=layer.bias.dtype))


def assert_formula_outputs_and_gradients(layer, x, conv, **options):
    """`layer(x)` and its gradients equal autograd on the formula written out per entry (the oracle):
    w[o, j] = (lam_in[g * in/groups + j] - lam_out[o]) * phi[o, j], g = o // (out/groups), then `conv(x, w, bias,
    groups=layer.groups, **options)`."""
    phi, lam_in, lam_out, bias = (p.detach().clone().requires_grad_(True) for p in (layer.phi, layer.lam_in, layer.lam_out, layer.bias))
    n_out, per_in = phi.shape[0], phi.shape[1]
    per_out = n_out // layer.groups
    w = torch.stack([torch.stack([(lam_in[o // per_out * per_in + j] - lam_out[o]) * phi[o, j] for j in range(per_in)])
                     for o in range(n_out)])
    want = conv(x, w, bias, groups=layer.groups, **options)
    got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    (want * g).sum().backward()
    (got * g).sum().backward()
    for mine, ref in ((layer.phi, phi), (layer.lam_in, lam_in), (layer.lam_out, lam_out), (layer.bias, bias)):
        torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-12, atol=1e-12)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv1d(8, 6, 3)
        self.head = nn.Linear(6 * 6, 10)

    def forward(self, x):
        h = torch.relu(self.bn1(self.c1(x)))
        h = h + torch.relu(self.bn2(self.c2(h)))  # residual
        h = F.avg_pool2d(h, 2).flatten(2)  # [B, 8, 16]
        h = torch.relu(self.c3(h))[..., :6]  # [B, 6, 6]
        return self.head(h.flatten(1))


class ResMLP(nn.Module):
    def __init__(self, d=6, width=12, hidden=20, norm="batch"):
        super().__init__()
        self.inp = nn.Linear(d, width)
        make = (lambda: nn.BatchNorm1d(width)) if norm == "batch" else (lambda: nn.LayerNorm(width))
        self.blocks = nn.ModuleList(
            nn.Sequential(make(), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)) for _ in range(2))
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(torch.relu(h))


class TinyTransformer(nn.Module):
    def __init__(self, d_in=8, d=16, ff=24, classes=10):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.encoder = nn.TransformerEncoderLayer(d, 2, ff, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


class CNN3d(nn.Module):
    """A small volumetric CNN: Conv3d -> BatchNorm3d -> ReLU -> Conv3d -> ReLU -> Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv3d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm3d(6)
        self.c2 = nn.Conv3d(6, 5, 3)
        self.head = nn.Linear(5 * 2 * 2 * 2, 3)

    def forward(self, x):
        return self.head(torch.relu(self.c2(torch.relu(self.bn(self.c1(x))))).flatten(1))


MODELS = {"cnn": (CNN, (4, 1, 8, 8)), "resmlp": (ResMLP, (5, 6)), "transformer": (TinyTransformer, (3, 8, 8)),
          "cnn3d": (CNN3d, (3, 2, 4, 4, 4))}


def _settle(model, seed=0):
    """Random BatchNorm statistics so that normalisation layers are not the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model
