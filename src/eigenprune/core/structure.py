"""Reading a model's structure: an MLP as a flat chain of linear layers and element-wise activations."""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.nn import functional as F

from eigenprune.core.layers import SpectralLinear

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


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module inside `nn.DataParallel`/`DistributedDataParallel` wrappers (which compute what it computes); else `model`."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def as_sequential(model: nn.Module) -> nn.Sequential:
    """`model` as a flat `nn.Sequential` of its linear layers and element-wise activations (layers shared, not copied).

    Accepts an `nn.Linear`/`SpectralLinear`, a (nested) `nn.Sequential`, or any `nn.Module` whose
    `forward` is a chain x -> f1 -> f2 -> ... of such layers and of element-wise activations (as
    modules, `torch.relu`/`F.relu`-style functions or `.relu()`-style methods), read with torch.fx.
    Raises TypeError, naming the offending operation, for anything else (branches, residuals,
    normalization layers, several inputs). A `DataParallel` wrapper is read as the module inside it.
    """
    model = unwrap_parallel(model)
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


def check_hidden_layer(layer: int, n_linear: int, error: type[Exception] = ValueError) -> int:
    """`layer` if it indexes a hidden linear layer (0..n_linear-2) of a network with `n_linear` linear layers;
    otherwise `error` saying which indices are valid."""
    if not 0 <= layer < n_linear - 1:
        raise error(f"layer must be a hidden layer index in 0..{n_linear - 2}, got {layer}")
    return layer


def input_tuple(example_inputs: object, error: type[Exception] = ValueError) -> tuple[torch.Tensor, ...]:
    """`example_inputs` (a tensor, or a non-empty tuple or list of tensors) as a tuple of tensors; else `error`."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise error(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")
