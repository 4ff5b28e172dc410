"""Spectral layers: w_ij = (lam_in_j - lam_out_i) * phi_ij, dense or convolutional.

A dense map from n_in to n_out nodes is the off-diagonal block of A = Phi Lambda Phi^-1 with
Phi = identity + phi. A convolution is the same map between channels, with one phi entry per kernel
position: w[o, i, ...] = (lam_in_i - lam_out_o) * phi[o, i, ...]; a grouped one connects each output only to its
group's inputs (one lam_out per output channel, one lam_in per input channel). `spectral_weight` is the one place
the formula lives and `Penalty` the one place the penalty and its gradient live; the dense layer
(`SpectralLinear`), the convolutions (`SpectralConv1d`, `SpectralConv2d`, `SpectralConv3d`) and the batched ensemble
all use them.

Each spectral class names its plain twin and the functional that computes it (`plain`, `functional`); `SPECTRAL_LAYERS`
lists the classes, and everything that maps plain layers to spectral ones (`spectral_twin`, `PLAIN_LAYERS`) is derived
from it: a new layer type is one class here and its entry in `SPECTRAL_LAYERS`. A depthwise convolution is made as a
subclass of its convolution (`DEPTHWISE_LAYERS`), a type of its own for Torch-Pruning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.nn import functional as F


def eigen_gap(lam_in: torch.Tensor, lam_out: torch.Tensor, kernel_dims: int = 0, groups: int = 1) -> torch.Tensor:
    """lam_in_i - lam_out_o, shaped [..., n_out, n_in, 1...] (`kernel_dims` ones) to multiply phi: d w / d phi.

    With `groups` > 1 (a grouped convolution, phi [..., n_out, n_in / groups, *kernel]) output o belongs to group
    g = o // (n_out / groups) and sees only its group's inputs: entry [o, j] is lam_in[g * n_in / groups + j] - lam_out_o.
    """
    tail = (1,) * kernel_dims
    if groups != 1:
        per_out = lam_in.reshape(*lam_in.shape[:-1], groups, lam_in.shape[-1] // groups)
        per_out = per_out.repeat_interleave(lam_out.shape[-1] // groups, dim=-2)  # [..., n_out, n_in / groups]
        return per_out.reshape(*per_out.shape, *tail) - lam_out.reshape(*lam_out.shape, 1, *tail)
    lam_in = lam_in.reshape(*lam_in.shape[:-1], 1, lam_in.shape[-1], *tail)
    lam_out = lam_out.reshape(*lam_out.shape[:-1], lam_out.shape[-1], 1, *tail)
    return lam_in - lam_out


def spectral_weight(phi: torch.Tensor, lam_in: torch.Tensor, lam_out: torch.Tensor, kernel_dims: int = 0,
                    groups: int = 1) -> torch.Tensor:
    """Direct-space weight w[..., o, i, k...] = (lam_in_i - lam_out_o) * phi[..., o, i, k...].

    Shapes: phi [..., n_out, n_in, *kernel] with `kernel_dims` trailing kernel dimensions (0 for a dense
    layer), lam_in [..., n_in], lam_out [..., n_out]; leading dims broadcast. A grouped convolution (`groups` > 1)
    has phi [..., n_out, n_in / groups, *kernel] and w[o, j] = (lam_in[g * n_in / groups + j] - lam_out_o) * phi[o, j]
    with g = o // (n_out / groups), its output's group (see `eigen_gap`).
    """
    return eigen_gap(lam_in, lam_out, kernel_dims, groups) * phi


def glorot_uniform_(tensor: torch.Tensor, generator: torch.Generator | None = None, kernel_dims: int = 0) -> torch.Tensor:
    """Fill a [..., n_out, n_in, *kernel] tensor from U(-a, a), a = sqrt(6 / (fan_in + fan_out)) (Keras' default).

    fan_in = n_in x kernel size, fan_out = n_out x kernel size (kernel size 1 for a dense layer).
    """
    split = tensor.dim() - kernel_dims
    n_out, n_in = tensor.shape[split - 2 : split]
    receptive = math.prod(tensor.shape[split:])
    bound = math.sqrt(6.0 / ((n_in + n_out) * receptive))
    with torch.no_grad():
        values = torch.rand(tensor.shape, generator=generator, dtype=torch.float64) * 2 - 1
        tensor.copy_(values * bound)
    return tensor


def _sum_squares(t: torch.Tensor, lead: int) -> torch.Tensor:
    """Sum of squares over all but the first `lead` dims, as one (batched) dot product."""
    flat = t.reshape(*t.shape[:lead], -1)
    return torch.linalg.vecdot(flat, flat)


def _node_norms(weight: torch.Tensor, lead: int) -> torch.Tensor:
    """||w_i|| of every output node (all inputs and kernel positions of channel i) [*lead, O]."""
    return weight.flatten(lead + 1).norm(dim=-1)


class Penalty:
    """The regularization of one spectral layer (lead = 0, a scalar) or of a stack of S of them (lead = 1, [S], with
    the coefficients as [S] tensors), with its coefficients looked up once:

        l2_phi * sum(phi^2) + l2_lam * (sum(lam_in^2) + sum(lam_out^2))       (the paper's L2 terms, trained parts only)
        + l1_lam * sum_i |lam_out_i| + group_lasso * sum_i ||w_i||             (the baselines' sparsity terms, when set)

    `layer` is anything with phi, lam_in, lam_out, weight, the four coefficients and `terms` (which of the
    four coefficients are non-zero: known without reading tensors back, so that a CUDA graph can capture it;
    a term that is not set costs no kernel). `value` is the penalty and `grads` its gradient (for the hand-written
    step). The function `penalty` makes one per call; the batched step keeps one per layer for a whole training
    (the coefficients and which parts train must not change meanwhile).
    """

    def __init__(self, layer: SpectralModule, lead: int = 0) -> None:
        phi = layer.phi
        l2_phi, l2_lam, l1, group = layer.terms
        self.layer, self.lead = layer, lead

        def coef(value: float | torch.Tensor) -> torch.Tensor:
            return torch.as_tensor(value, dtype=phi.dtype, device=phi.device)

        self.l2 = [(name, coef(layer.l2_phi if name == "phi" else layer.l2_lam))
                   for name, term in (("phi", l2_phi), ("lam_in", l2_lam), ("lam_out", l2_lam))
                   if term and getattr(layer, name).requires_grad]
        self.l1 = coef(layer.l1_lam) if l1 and layer.lam_out.requires_grad else None
        self.group = coef(layer.group_lasso) if group else None
        self.active = bool(self.l2) or self.l1 is not None or self.group is not None
        self._grad_coefs: dict | None = None

    def value(self, total: torch.Tensor | None = None) -> torch.Tensor:
        """The penalty, added to `total` if given (one running sum over a network's layers)."""
        layer, lead = self.layer, self.lead
        total = layer.phi.new_zeros(layer.phi.shape[:lead]) if total is None else total
        for name, c in self.l2:
            total = torch.addcmul(total, c, _sum_squares(getattr(layer, name), lead))
        if self.l1 is not None:
            total = total + self.l1 * layer.lam_out.abs().sum(-1)
        if self.group is not None:
            total = total + self.group * _node_norms(layer.weight, lead).sum(-1)
        return total

    def grads(self, grads: dict[str, torch.Tensor], on: torch.Tensor) -> dict[str, torch.Tensor]:
        """`grads` (data gradients, by parameter name) plus the penalty's gradient, for the students with on = 1
        (on [*lead], 0/1). A "weight" entry gets the group-lasso term g * w_i / ||w_i|| (0 for an all-zero row,
        as in autograd), to be chained through w = (lam_in - lam_out) phi by the caller; "phi", "lam_in" and
        "lam_out" get 2 * l2 * p (and lam_out l1 * sign(lam_out), sign(0) = 0)."""
        layer, lead = self.layer, self.lead
        if self._grad_coefs is None:  # shaped [*lead, 1, ...] to broadcast against each parameter
            def shaped(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
                return c.reshape(*c.shape, *(1,) * (like.dim() - lead))
            self._grad_coefs = {name: shaped(2 * c, getattr(layer, name)) for name, c in self.l2}
            if self.l1 is not None:
                self._grad_coefs["l1"] = shaped(self.l1, layer.lam_out)
            if self.group is not None:
                self._grad_coefs["group"] = shaped(self.group, layer.phi)

        def on_(c: torch.Tensor) -> torch.Tensor:
            return c * on.reshape(*on.shape, *(1,) * (c.dim() - lead))

        coefs, out = self._grad_coefs, dict(grads)
        if "weight" in out and self.group is not None:
            w = layer.weight
            norm = w.flatten(lead + 1).norm(dim=-1).reshape(*w.shape[: lead + 1], *(1,) * (w.dim() - lead - 1))
            out["weight"] = out["weight"] + on_(coefs["group"]) * w / torch.where(norm > 0, norm, torch.ones_like(norm))
        for name, _ in self.l2:
            if name in out:
                out[name] = torch.addcmul(out[name], on_(coefs[name]), getattr(layer, name))
        if "lam_out" in out and self.l1 is not None:
            out["lam_out"] = out["lam_out"] + on_(coefs["l1"]) * layer.lam_out.sign()
        return out


def penalty(layer: SpectralModule, lead: int = 0, total: torch.Tensor | None = None) -> torch.Tensor:
    """The regularization of a spectral layer's trainable parts (`Penalty`), per leading index, added to `total` if given."""
    return Penalty(layer, lead).value(total)


Role = Literal["spectral", "direct", "fixed"]
"""How a spectral layer trains (the names of `LayerPlan.kind`): see `SpectralModule.role`."""


class SpectralModule(nn.Module):
    """What every spectral layer shares: parameters phi, lam_in, lam_out, bias; their flags; the penalty; the exact
    conversion from and to its plain twin.

    Subclasses set `plain` (the plain layer type it computes, e.g. `nn.Conv2d`), `functional` (the function that
    computes it from the input, the weight, the bias and `_functional_args()`, e.g. `F.conv2d`) and `kernel_dims`
    (0 dense, else the number of kernel dimensions), and `_shape(layer)`: the positional constructor arguments that
    an instance of this class and of its plain twin share (they use the same attribute names). Frozen parts stay
    `nn.Parameter`s with `requires_grad=False` so that state dicts are uniform.
    """

    plain: ClassVar[type[nn.Module]]
    functional: ClassVar[Callable[..., torch.Tensor]]
    kernel_dims: ClassVar[int] = 0
    groups: int = 1
    phi: nn.Parameter
    lam_in: nn.Parameter
    lam_out: nn.Parameter
    bias: nn.Parameter | None

    def _init_spectral(
        self, n_in: int, n_out: int, kernel: tuple[int, ...], *, bias: bool = False, train_phi: bool = True,
        train_lam_in: bool = False, train_lam_out: bool = True, train_bias: bool = True, lam_in_init: float = 0.0,
        lam_out_init: float = 1.0, l2_phi: float = 0.01, l2_lam: float = 5e-4, l1_lam: float = 0.0, group_lasso: float = 0.0,
        generator: torch.Generator | None = None, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    ) -> None:
        """The parameters and coefficients; its keyword arguments are every spectral layer's options (the paper's
        defaults: lam_in = 0 frozen, lam_out = 1 trainable, phi Glorot uniform from `generator`, no bias,
        L2 0.01 on phi and 5e-4 on lam, no sparsity terms). A grouped convolution (`self.groups` > 1, set before) has phi
        [n_out, n_in / groups, *kernel] and still one lam_in per input channel."""
        kw = {"dtype": dtype or torch.get_default_dtype(), "device": device}
        self.l2_phi = float(l2_phi)
        self.l2_lam = float(l2_lam)
        self.l1_lam = float(l1_lam)
        self.group_lasso = float(group_lasso)
        phi = glorot_uniform_(torch.empty(n_out, n_in // self.groups, *kernel, **kw), generator, self.kernel_dims)
        self.phi = nn.Parameter(phi, train_phi)
        self.lam_in = nn.Parameter(torch.full((n_in,), float(lam_in_init), **kw), train_lam_in)
        self.lam_out = nn.Parameter(torch.full((n_out,), float(lam_out_init), **kw), train_lam_out)
        self.bias = nn.Parameter(torch.zeros(n_out, **kw), train_bias) if bias else None

    @property
    def weight(self) -> torch.Tensor:
        """The direct-space weight [out, in / groups, *kernel] (see `spectral_weight`)."""
        return spectral_weight(self.phi, self.lam_in, self.lam_out, self.kernel_dims, self.groups)

    @property
    def terms(self) -> tuple[bool, bool, bool, bool]:
        """Which penalty terms are set: L2 on phi, L2 on lam, L1 on lam_out, group lasso."""
        return bool(self.l2_phi), bool(self.l2_lam), bool(self.l1_lam), bool(self.group_lasso)

    def penalty(self) -> torch.Tensor:
        """Regularization of the trainable parts (see the module function `penalty`): the paper's L2 terms
        l2_phi * sum(phi^2) + l2_lam * sum(lam^2), plus, when set, l1_lam * sum_i |lam_out_i| and
        group_lasso * sum_i ||w_i|| (all kernel positions of output channel i for a convolution)."""
        return penalty(self)

    @property
    def role(self) -> Role:
        """How this layer trains, read from which parameters train (their `requires_grad`, the one record of it):
        "spectral" when its eigenvalues lam_out train, "direct" when phi (or lam_in) trains with lam_out frozen
        (an ordinary layer, w = (lam_in - lam_out) * phi), "fixed" when nothing but perhaps the bias trains
        (the paper's frozen readout). `LayerPlan.kind` builds a layer of each role."""
        if self.lam_out.requires_grad:
            return "spectral"
        return "direct" if self.phi.requires_grad or self.lam_in.requires_grad else "fixed"

    @property
    def ranked(self) -> bool:
        """Whether its training ranks its nodes, so that pruning by importance means something: its eigenvalues
        train, or a sparsity term (l1_lam, group_lasso) or an L2 term on a trained phi is set."""
        return self.role == "spectral" or self.l1_lam > 0 or self.group_lasso > 0 or (self.phi.requires_grad and self.l2_phi > 0)

    @classmethod
    def _shape(cls, layer: nn.Module) -> tuple:
        """The positional constructor arguments that `layer` (of this class or its `plain` twin) has."""
        raise NotImplementedError

    def _functional_args(self) -> tuple:
        """The arguments of `functional` after the input, the weight and the bias."""
        return ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.functional(x, self.weight, self.bias, *self._functional_args())

    @classmethod
    def unsupported(cls, layer: nn.Module) -> str | None:
        """Why `layer` has no exact spectral copy of this class (None when it has one)."""
        if type(layer) is not cls.plain:
            return f"{cls.__name__} converts {cls.plain.__name__}, got {type(layer).__name__}"
        return None

    @classmethod
    def from_plain(cls, layer: nn.Module, **kwargs: Any) -> SpectralModule:
        """An exact spectral copy of `layer` (a `cls.plain`): lam_in = 0, lam_out = 1, phi = -W (the same function).

        Keyword arguments are the spectral options (flags, coefficients); by default a frozen `layer` (weight
        requires_grad False) gives a frozen copy, and the copy has `layer`'s dtype and device.
        """
        if (why := cls.unsupported(layer)) is not None:
            raise ValueError(f"cannot convert {type(layer).__name__} to {cls.__name__}: {why}")
        kwargs.setdefault("train_phi", layer.weight.requires_grad)
        kwargs.setdefault("train_lam_out", layer.weight.requires_grad)
        if layer.bias is not None:
            kwargs.setdefault("train_bias", layer.bias.requires_grad)
        kwargs.setdefault("dtype", layer.weight.dtype)
        kwargs.setdefault("device", layer.weight.device)
        new = cls(*cls._shape(layer), bias=layer.bias is not None, **kwargs)
        with torch.no_grad():
            new.lam_in.zero_()
            new.lam_out.fill_(1.0)
            new.phi.copy_(-layer.weight)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        return new

    def to_plain(self) -> nn.Module:
        """The `plain` layer (e.g. `nn.Linear`) with exactly this layer's weight and bias; its weight trains if any of
        phi, lam_in, lam_out did, its bias if this bias did."""
        w = self.weight.detach()
        plain = self.plain(*self._shape(self), bias=self.bias is not None, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            plain.weight.copy_(w)
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        plain.weight.requires_grad_(any(p.requires_grad for p in (self.phi, self.lam_in, self.lam_out)))
        if self.bias is not None:
            plain.bias.requires_grad_(self.bias.requires_grad)
        return plain

    def trainable_parts(self) -> list[str]:
        """Names of the parameters that train, from phi, lam_in, lam_out, bias."""
        return [n for n in ("phi", "lam_in", "lam_out", "bias") if getattr(self, n) is not None and getattr(self, n).requires_grad]


class SpectralLinear(SpectralModule):
    """A dense layer trained in the spectral domain.

    Parameters `phi` [out, in] (eigenvector entries), `lam_out` [out] (one eigenvalue per output
    node), `lam_in` [in] and an optional `bias` [out]. Which of them train is set by the flags;
    frozen ones stay `nn.Parameter`s with `requires_grad=False` so that state dicts are uniform.
    Defaults follow the paper: lam_in = 0 frozen, lam_out = 1 trainable, phi Glorot uniform, no bias.
    A "direct" layer is the same with `train_lam_out=False`: an ordinary dense layer, w = -phi.
    Two optional sparsity terms serve the pruning baselines (both 0 by default): `l1_lam` (an L1
    penalty on lam_out, i.e. network slimming's per-node gate) and `group_lasso` (sum over nodes
    of the norm of each node's incoming weights).

    Keyword options (all spectral layers share them, see `SpectralModule._init_spectral`): bias, train_phi,
    train_lam_in, train_lam_out, train_bias, lam_in_init, lam_out_init, l2_phi, l2_lam, l1_lam,
    group_lasso, generator, dtype, device.
    """

    plain = nn.Linear
    functional = F.linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        **options: Any,
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"SpectralLinear sizes must be positive integers, got {in_features}x{out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self._init_spectral(in_features, out_features, (), **options)

    @classmethod
    def _shape(cls, layer: nn.Module) -> tuple:
        return layer.in_features, layer.out_features

    def extra_repr(self) -> str:
        trains = "+".join(self.trainable_parts()) or "nothing"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, trains={trains}"


def _tuple(value: int | tuple[int, ...], n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * n


def _depthwise_shape(in_channels: Any = 0, out_channels: Any = 0, kernel_size: Any = 0, stride: Any = 1, padding: Any = 0,
                     dilation: Any = 1, groups: Any = 1, **options: Any) -> bool:
    """Whether a convolution's constructor arguments make a depthwise one: groups == in_channels == out_channels > 1."""
    return isinstance(groups, int) and groups > 1 and groups == in_channels == out_channels


class _SpectralConvNd(SpectralModule):
    """A convolution trained in the spectral domain: one lam_out per output channel, one lam_in per input channel.

    w[o, i, ...] = (lam_in_i - lam_out_o) * phi[o, i, ...]; phi [out, in / groups, *kernel_size]. Same flags,
    defaults and penalty as `SpectralLinear`. Any `groups` (output o of group g = o // (out / groups) reads the
    inputs g * in / groups + j: w[o, j] = (lam_in[g * in / groups + j] - lam_out_o) * phi[o, j]); only zero padding.
    A depthwise one (groups == in == out > 1) is made as the depthwise subclass (`SpectralDepthwiseConv2d` etc.), its
    own type so that Torch-Pruning couples its input and output channels. A subclass sets `kernel_dims`, `plain`
    and `functional`.
    """

    depthwise: ClassVar[bool] = False

    def __new__(cls, *args: Any, **kwargs: Any) -> _SpectralConvNd:
        if cls in _DEPTHWISE and _depthwise_shape(*args, **kwargs):
            cls = _DEPTHWISE[cls]
        return super().__new__(cls)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: int | str | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        **options: Any,
    ) -> None:
        super().__init__()
        n = self.kernel_dims
        name = type(self).__name__
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"{name} channels must be positive integers, got {in_channels}x{out_channels}")
        if not isinstance(groups, int) or groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"{name} groups must be a positive integer dividing in_channels and out_channels "
                             f"({in_channels}x{out_channels}), got {groups!r}")
        if self.depthwise and not groups == in_channels == out_channels:
            raise ValueError(f"{name} needs groups == in_channels == out_channels, got groups={groups} for "
                             f"{in_channels}x{out_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _tuple(kernel_size, n)
        self.stride = _tuple(stride, n)
        self.padding = padding if isinstance(padding, str) else _tuple(padding, n)
        self.dilation = _tuple(dilation, n)
        self.groups = groups
        if len(self.kernel_size) != n or min(self.kernel_size) < 1:
            raise ValueError(f"{name} kernel_size must be {n} positive integers, got {kernel_size!r}")
        self._init_spectral(in_channels, out_channels, self.kernel_size, **options)

    @classmethod
    def _shape(cls, layer: nn.Module) -> tuple:
        return (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                layer.groups)

    def _functional_args(self) -> tuple:
        return self.stride, self.padding, self.dilation, self.groups

    @classmethod
    def unsupported(cls, layer: nn.Module) -> str | None:
        if (why := super().unsupported(layer)) is not None:
            return why
        if layer.padding_mode != "zeros":
            return f"padding_mode={layer.padding_mode!r} (only 'zeros' is supported)"
        return None

    def extra_repr(self) -> str:
        trains = "+".join(self.trainable_parts()) or "nothing"
        groups = f", groups={self.groups}" if self.groups != 1 else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}{groups}, bias={self.bias is not None}, trains={trains}")


class SpectralConv1d(_SpectralConvNd):
    """Spectral `nn.Conv1d` (see `_SpectralConvNd`): phi [out, in / groups, k]."""

    kernel_dims = 1
    plain = nn.Conv1d
    functional = F.conv1d


class SpectralConv2d(_SpectralConvNd):
    """Spectral `nn.Conv2d` (see `_SpectralConvNd`): phi [out, in / groups, kh, kw]."""

    kernel_dims = 2
    plain = nn.Conv2d
    functional = F.conv2d


class SpectralConv3d(_SpectralConvNd):
    """Spectral `nn.Conv3d` (see `_SpectralConvNd`): phi [out, in / groups, kd, kh, kw]."""

    kernel_dims = 3
    plain = nn.Conv3d
    functional = F.conv3d


class SpectralDepthwiseConv1d(SpectralConv1d):
    """A depthwise `SpectralConv1d` (groups == in_channels == out_channels; what `SpectralConv1d(C, C, k, groups=C)`
    makes for C > 1): phi [C, 1, k], w[c] = (lam_in_c - lam_out_c) * phi[c]. Torch-Pruning removes its channel c as
    input and output together (`pruning.graph.SPECTRAL_PRUNERS`), as for a depthwise `nn.Conv1d`."""

    depthwise = True


class SpectralDepthwiseConv2d(SpectralConv2d):
    """A depthwise `SpectralConv2d` (groups == in_channels == out_channels), as `SpectralDepthwiseConv1d`."""

    depthwise = True


class SpectralDepthwiseConv3d(SpectralConv3d):
    """A depthwise `SpectralConv3d` (groups == in_channels == out_channels), as `SpectralDepthwiseConv1d`."""

    depthwise = True


_DEPTHWISE: dict[type[_SpectralConvNd], type[_SpectralConvNd]] = {
    SpectralConv1d: SpectralDepthwiseConv1d, SpectralConv2d: SpectralDepthwiseConv2d, SpectralConv3d: SpectralDepthwiseConv3d}

DEPTHWISE_LAYERS: tuple[type[SpectralModule], ...] = tuple(_DEPTHWISE.values())
"""The depthwise spectral convolutions (subclasses of `SPECTRAL_LAYERS`' convolutions, not listed there: they are not the
twin of a plain type)."""


SPECTRAL_LAYERS: tuple[type[SpectralModule], ...] = (SpectralLinear, SpectralConv1d, SpectralConv2d, SpectralConv3d)
"""Every spectral layer type: the one list of supported plain -> spectral pairs."""

PLAIN_LAYERS: tuple[type[nn.Module], ...] = tuple(cls.plain for cls in SPECTRAL_LAYERS)
"""The plain layer types that have a spectral twin (nn.Linear, nn.Conv1d, ...)."""

_TWIN: dict[type[nn.Module], type[SpectralModule]] = {cls.plain: cls for cls in SPECTRAL_LAYERS}


def spectral_twin(plain: type[nn.Module]) -> type[SpectralModule] | None:
    """The spectral class that computes layers of exactly the type `plain` (subclasses excluded), or None."""
    return _TWIN.get(plain)


def plain_names() -> str:
    """The plain layer types that have a spectral form, by name ("Linear, Conv1d, ..."), for messages."""
    return ", ".join(cls.__name__ for cls in PLAIN_LAYERS)
