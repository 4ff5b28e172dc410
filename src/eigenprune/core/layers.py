"""The spectral dense layer: w_ij = (lam_in_j - lam_out_i) * phi_ij.

A dense map from n_in to n_out nodes is the off-diagonal block of A = Phi Lambda Phi^-1 with
Phi = identity + phi. `spectral_weight` is the one place the formula lives; the single layer
(`SpectralLinear`) and the batched ensemble both call it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def spectral_weight(phi: torch.Tensor, lam_in: torch.Tensor, lam_out: torch.Tensor) -> torch.Tensor:
    """Direct-space weight w_ij = (lam_in_j - lam_out_i) * phi_ij.

    Shapes: phi [..., n_out, n_in], lam_in [..., n_in], lam_out [..., n_out]; leading dims broadcast.
    """
    return (lam_in.unsqueeze(-2) - lam_out.unsqueeze(-1)) * phi


def glorot_uniform_(tensor: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill a [n_out, n_in] tensor from U(-a, a), a = sqrt(6 / (n_in + n_out)) (Keras' default)."""
    n_out, n_in = tensor.shape[-2:]
    bound = math.sqrt(6.0 / (n_in + n_out))
    with torch.no_grad():
        values = torch.rand(tensor.shape, generator=generator, dtype=torch.float64) * 2 - 1
        tensor.copy_(values * bound)
    return tensor


class SpectralLinear(nn.Module):
    """A dense layer trained in the spectral domain.

    Parameters `phi` [out, in] (eigenvector entries), `lam_out` [out] (one eigenvalue per output
    node), `lam_in` [in] and an optional `bias` [out]. Which of them train is set by the flags;
    frozen ones stay `nn.Parameter`s with `requires_grad=False` so that state dicts are uniform.
    Defaults follow the paper: lam_in = 0 frozen, lam_out = 1 trainable, phi Glorot uniform, no bias.
    A "direct" layer is the same with `train_lam_out=False`: an ordinary dense layer, w = -phi.
    Two optional sparsity terms serve the pruning baselines (both 0 by default): `l1_lam` (an L1
    penalty on lam_out, i.e. network slimming's per-node gate) and `group_lasso` (sum over nodes
    of the norm of each node's incoming weights).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = False,
        train_phi: bool = True,
        train_lam_in: bool = False,
        train_lam_out: bool = True,
        train_bias: bool = True,
        lam_in_init: float = 0.0,
        lam_out_init: float = 1.0,
        l2_phi: float = 0.01,
        l2_lam: float = 5e-4,
        l1_lam: float = 0.0,
        group_lasso: float = 0.0,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"SpectralLinear sizes must be positive integers, got {in_features}x{out_features}")
        kw = {"dtype": dtype or torch.get_default_dtype(), "device": device}
        self.in_features = in_features
        self.out_features = out_features
        self.l2_phi = float(l2_phi)
        self.l2_lam = float(l2_lam)
        self.l1_lam = float(l1_lam)
        self.group_lasso = float(group_lasso)
        self.phi = nn.Parameter(glorot_uniform_(torch.empty(out_features, in_features, **kw), generator), train_phi)
        self.lam_in = nn.Parameter(torch.full((in_features,), float(lam_in_init), **kw), train_lam_in)
        self.lam_out = nn.Parameter(torch.full((out_features,), float(lam_out_init), **kw), train_lam_out)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw), train_bias) if bias else None

    @property
    def weight(self) -> torch.Tensor:
        """The direct-space weight matrix [out, in]."""
        return spectral_weight(self.phi, self.lam_in, self.lam_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def penalty(self) -> torch.Tensor:
        """Regularization of the trainable parts.

        The paper's L2 terms l2_phi * sum(phi^2) + l2_lam * sum(lam^2), plus, when set,
        l1_lam * sum_i |lam_out_i| and group_lasso * sum_i ||w_i|| (w_i: node i's incoming weights).
        """
        total = self.phi.new_zeros(())
        if self.phi.requires_grad:
            total = total + self.l2_phi * self.phi.square().sum()
        for lam in (self.lam_in, self.lam_out):
            if lam.requires_grad:
                total = total + self.l2_lam * lam.square().sum()
        if self.l1_lam and self.lam_out.requires_grad:
            total = total + self.l1_lam * self.lam_out.abs().sum()
        if self.group_lasso:
            total = total + self.group_lasso * self.weight.norm(dim=-1).sum()
        return total

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> SpectralLinear:
        """An exact spectral copy of `linear`: lam_in = 0, lam_out = 1, phi = -W (the same function).

        A frozen `linear` (requires_grad False) gives a frozen copy unless the flags say otherwise.
        """
        kwargs.setdefault("train_phi", linear.weight.requires_grad)
        kwargs.setdefault("train_lam_out", linear.weight.requires_grad)
        if linear.bias is not None:
            kwargs.setdefault("train_bias", linear.bias.requires_grad)
        kwargs.setdefault("dtype", linear.weight.dtype)
        kwargs.setdefault("device", linear.weight.device)
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, **kwargs)
        with torch.no_grad():
            layer.lam_in.zero_()
            layer.lam_out.fill_(1.0)
            layer.phi.copy_(-linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def to_linear(self) -> nn.Linear:
        """An `nn.Linear` with exactly this layer's weight and bias; its weight trains if any of phi, lam_in, lam_out did."""
        w = self.weight.detach()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(any(p.requires_grad for p in (self.phi, self.lam_in, self.lam_out)))
        if self.bias is not None:
            linear.bias.requires_grad_(self.bias.requires_grad)
        return linear

    def trainable_parts(self) -> list[str]:
        """Names of the parameters that train, from phi, lam_in, lam_out, bias."""
        return [n for n in ("phi", "lam_in", "lam_out", "bias") if getattr(self, n) is not None and getattr(self, n).requires_grad]

    def extra_repr(self) -> str:
        trains = "+".join(self.trainable_parts()) or "nothing"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, trains={trains}"
