"""MLP builders: frozen teachers, spectral/direct students, and `spectralize` for any model.

Every network here is a plain `nn.Sequential` of linear layers with ReLU between them. A student's
layers are all `SpectralLinear` (a "direct" layer is one whose eigenvalues are frozen at 1), so the
batched ensemble can stack them; `despectralize` turns any of them back into `nn.Linear`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import fx, nn
from torch.nn import functional as F

from eigenprune.layers import SpectralLinear, glorot_uniform_

LayerKind = Literal["spectral", "direct", "fixed"]


@dataclass(frozen=True)
class LayerPlan:
    """One layer of a student: its output width, how it trains, and its regularization coefficients.

    `l1_lam` and `group_lasso` are the pruning baselines' sparsity terms (see `SpectralLinear`).
    """

    width: int
    kind: LayerKind = "spectral"
    l2_phi: float = 0.01
    l2_lam: float = 5e-4
    bias: bool = False
    l1_lam: float = 0.0
    group_lasso: float = 0.0


def make_layer(n_in: int, plan: LayerPlan, generator: torch.Generator, dtype: torch.dtype) -> SpectralLinear:
    """A `SpectralLinear` whose trainable parts follow `plan.kind`.

    spectral: phi and lam_out train; direct: phi (and bias) train, lam_out frozen at 1 (w = -phi);
    fixed: nothing trains and w = 1 (the paper's all-ones readout).
    """
    layer = SpectralLinear(
        n_in, plan.width, bias=plan.bias, train_phi=plan.kind != "fixed", train_lam_out=plan.kind == "spectral",
        train_bias=plan.kind != "fixed", l2_phi=plan.l2_phi, l2_lam=plan.l2_lam, l1_lam=plan.l1_lam,
        group_lasso=plan.group_lasso, generator=generator, dtype=dtype,
    )
    if plan.kind == "fixed":
        with torch.no_grad():
            layer.phi.fill_(-1.0)
    return layer


def paper_student(first: LayerPlan, rest: list[int], deep: bool = False, head: str = "sum", n_outputs: int = 1) -> list[LayerPlan]:
    """Plans of the paper's student: `first`, then hidden widths `rest` (dense and unregularized, or
    trained like `first` when `deep`), then the readout: the frozen all-ones sum ("sum") or a trainable
    dense layer with bias to `n_outputs` ("linear")."""
    hidden = [replace(first, width=w) if deep else LayerPlan(w, "direct", 0.0, 0.0) for w in rest]
    readout = LayerPlan(n_outputs, "direct", 0.0, 0.0, bias=True) if head == "linear" else LayerPlan(1, "fixed", 0.0, 0.0)
    return [first, *hidden, readout]


def make_student(input_dim: int, plans: list[LayerPlan], seed: int, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """A student MLP: one `SpectralLinear` per plan, ReLU between them, none after the last."""
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    n_in = input_dim
    for i, plan in enumerate(plans):
        layers.append(make_layer(n_in, plan, generator, dtype))
        if i < len(plans) - 1:
            layers.append(nn.ReLU())
        n_in = plan.width
    return nn.Sequential(*layers)


def make_teacher(input_dim: int, widths: list[int], seed: int, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """A frozen MLP teacher: input -> widths... (ReLU, no bias, Glorot from `seed`) -> sum of the last layer."""
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    n_in = input_dim
    for width in widths:
        linear = nn.Linear(n_in, width, bias=False, dtype=dtype)
        glorot_uniform_(linear.weight, generator)
        layers += [linear, nn.ReLU()]
        n_in = width
    readout = nn.Linear(n_in, 1, bias=False, dtype=dtype)
    nn.init.ones_(readout.weight)
    layers.append(readout)
    teacher = nn.Sequential(*layers)
    teacher.requires_grad_(False)
    return teacher


ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.Softplus, nn.Identity, nn.Dropout)
"""Modules that act on each node separately: the only ones allowed between two linear layers of an MLP."""

_FUNCTIONS = {
    torch.relu: lambda a, kw: nn.ReLU(), F.relu: lambda a, kw: nn.ReLU(),
    torch.tanh: lambda a, kw: nn.Tanh(), torch.sigmoid: lambda a, kw: nn.Sigmoid(),
    F.gelu: lambda a, kw: nn.GELU(approximate=kw.get("approximate", "none")), F.silu: lambda a, kw: nn.SiLU(),
    F.leaky_relu: lambda a, kw: nn.LeakyReLU(a[0] if a else kw.get("negative_slope", 0.01)),
    F.elu: lambda a, kw: nn.ELU(a[0] if a else kw.get("alpha", 1.0)),
}
_METHODS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


class _MLPTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, SpectralLinear) or super().is_leaf_module(m, qualname)


def _trace_chain(model: nn.Module) -> list[nn.Module]:
    """The modules a chain-shaped `forward` applies, in order (torch.fx); TypeError if it is not a chain."""
    name = type(model).__name__
    try:
        graph = _MLPTracer().trace(model)
    except Exception as err:  # noqa: BLE001 - fx raises many kinds; all mean "not traceable"
        raise TypeError(f"cannot read {name} as an MLP: torch.fx could not trace its forward ({type(err).__name__}: {err})") from None
    chain: list[nn.Module] = []
    prev = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if prev is not None:
                raise TypeError(f"cannot read {name} as an MLP: forward takes more than one input")
            prev = node
            continue
        if len(prev.users) != 1:
            raise TypeError(f"cannot read {name} as an MLP: forward is not a chain ({prev.name} feeds {len(prev.users)} operations)")
        if node.all_input_nodes != [prev]:
            raise TypeError(f"cannot read {name} as an MLP: forward is not a chain ({node.format_node()} has several inputs)")
        if node.op == "output":
            break
        args, kwargs = node.args[1:], {k: v for k, v in node.kwargs.items() if k != "inplace"}
        if node.op == "call_module":
            chain.append(model.get_submodule(node.target))
        elif node.op == "call_function" and node.target in _FUNCTIONS:
            chain.append(_FUNCTIONS[node.target](args, kwargs))
        elif node.op == "call_method" and node.target in _METHODS and not args:
            chain.append(_METHODS[node.target]())
        else:
            raise TypeError(f"cannot read {name} as an MLP: unsupported operation {node.format_node()}")
        prev = node
    return chain


def as_sequential(model: nn.Module) -> nn.Sequential:
    """`model` as a flat `nn.Sequential` of its linear layers and element-wise activations (layers shared, not copied).

    Accepts an `nn.Linear`/`SpectralLinear`, a (nested) `nn.Sequential`, or any `nn.Module` whose
    `forward` is a chain x -> f1 -> f2 -> ... of such layers and of element-wise activations (as
    modules, `torch.relu`/`F.relu`-style functions or `.relu()`-style methods), read with torch.fx.
    Raises TypeError, naming the offending operation, for anything else (branches, residuals,
    normalization layers, several inputs).
    """
    supported = (nn.Linear, SpectralLinear, *ELEMENTWISE)
    if isinstance(model, supported):
        return nn.Sequential(model)
    if type(model) is nn.Sequential:
        children = list(model)
    elif type(model).__module__.startswith("torch.nn"):
        names = ", ".join(c.__name__ for c in supported)
        raise TypeError(f"cannot read {type(model).__name__} as part of an MLP; supported: {names}, nn.Sequential, chain-shaped modules")
    else:
        children = _trace_chain(model)
    return nn.Sequential(*(m for child in children for m in as_sequential(child)))


def linear_layers(model: nn.Module) -> list[nn.Module]:
    """The `nn.Linear` and `SpectralLinear` layers of `model`, in order."""
    return [m for m in model.modules() if isinstance(m, (nn.Linear, SpectralLinear))]


def layer_sizes(model: nn.Module) -> list[int]:
    """The node counts of an MLP (see `as_sequential`): [inputs, hidden..., outputs]."""
    lins = linear_layers(as_sequential(model))
    return [lins[0].in_features] + [m.out_features for m in lins]


def spectralize(model: nn.Module, **kwargs) -> nn.Module:
    """Replace every `nn.Linear` inside `model` (in place) by an exact `SpectralLinear` copy; returns `model`.

    The outputs are unchanged (lam_in = 0, lam_out = 1, phi = -W). Keyword arguments go to
    `SpectralLinear` (flags, L2 coefficients).
    """
    if isinstance(model, nn.Linear):
        return SpectralLinear.from_linear(model, **kwargs)
    for name, child in model.named_children():
        setattr(model, name, spectralize(child, **kwargs))
    return model


def despectralize(model: nn.Module) -> nn.Module:
    """Replace every `SpectralLinear` inside `model` (in place) by the `nn.Linear` it computes; returns `model`."""
    if isinstance(model, SpectralLinear):
        return model.to_linear()
    for name, child in model.named_children():
        setattr(model, name, despectralize(child))
    return model


def spectral_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of `penalty()` over all `SpectralLinear` layers of `model` (add it to the loss)."""
    terms = [m.penalty() for m in model.modules() if isinstance(m, SpectralLinear)]
    return torch.stack(terms).sum() if terms else torch.zeros(())
