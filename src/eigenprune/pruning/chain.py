"""The chain path: exact removal of an MLP's hidden nodes, with bias folding.

"Removing" hidden node j of linear layer l means what setting its eigenvalue to zero means: its
incoming weights become 0, so it outputs the constant act(b_j) (act: the element-wise modules
after layer l, b_j its bias, 0 without one). `mask_nodes` builds exactly that network;
`remove_nodes` builds the smaller one: row j of layer l and column j of layer l+1 go, and
W_next[:, j] * act(b_j) is folded into the next layer's bias. Both compute the same function.

Layers are named by their index among the linear layers (0-based; only hidden ones can lose nodes).
`select_nodes` decides which nodes stay (any criterion, any keep spec, 'auto' from a validation loss),
`prune_chain` does both steps, and `loss_by_kept` is the loss when only the k most important nodes of a
layer are kept, for every k (the ensemble's version is `batched.curves.pruning_curves`).
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable

import torch
from torch import nn

from eigenprune.core.convert import despectralize
from eigenprune.core.layers import SpectralLinear
from eigenprune.core.losses import Task, task_loss
from eigenprune.core.structure import as_sequential, check_hidden_layer, linear_layers
from eigenprune.pruning.importance import node_importance
from eigenprune.pruning.keep import KeepLike, PruneError, check_finite, count_to_keep, parse_keep, top_k_mask

CURVE_BUDGET = 2**24
"""Floats in one block of a prefix-sum pruning curve (bounds its memory)."""


def _chain(model: nn.Module) -> nn.Sequential:
    """`as_sequential(model)` for the chain path; PruneError for a model it cannot read, or one that uses a linear layer
    at two places (pruning one use would prune the other)."""
    try:
        chain = as_sequential(model)
    except TypeError as err:
        raise PruneError(f"{err}; prune other models with example_inputs (the graph path)") from None
    seen: dict[int, int] = {}
    for i, m in enumerate(m for m in chain if isinstance(m, (nn.Linear, SpectralLinear))):
        if id(m) in seen:
            name = next((n for n, sub in model.named_modules() if sub is m), "")
            raise PruneError(f"{type(model).__name__} uses its layer {name or '<model>'} twice in forward (as linear layers "
                             f"{seen[id(m)]} and {i}); removing nodes of one use would change the other: give each use a layer of its own")
        seen[id(m)] = i
    return chain


def _plain_copy(model: nn.Module, chain: nn.Sequential | None = None) -> nn.Sequential:
    """A deep copy of the MLP as a flat `nn.Sequential` whose linear layers are all `nn.Linear` (`chain`: the model's
    `_chain`, if already read); PruneError for a model with forward hooks (the copy is rebuilt from its layers: a hook
    on the model would be lost, one on a pruned layer would see other widths)."""
    chain = _chain(model) if chain is None else chain
    for name, m in [("the model", model), *((f"its {type(m).__name__} (module {i})", m) for i, m in enumerate(chain))]:
        if m._forward_pre_hooks or m._forward_hooks:
            raise PruneError(f"{name} has a forward hook, which pruning a chain MLP would drop or feed other widths; "
                             "remove it (its handle's remove()) before pruning, and add it back to the pruned model")
    return despectralize(copy.deepcopy(chain))


def _linear_positions(chain: nn.Sequential) -> list[int]:
    return [i for i, m in enumerate(chain) if isinstance(m, (nn.Linear, SpectralLinear))]


def _activation(chain: nn.Sequential, start: int, stop: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The element-wise modules chain[start:stop] as one function, evaluated as in inference (eval mode)."""
    mods = [copy.deepcopy(m).eval() for m in chain[start:stop]]

    def act(z: torch.Tensor) -> torch.Tensor:
        for m in mods:
            z = m(z)
        return z

    return act


def _check_kept(kept: dict[int, torch.Tensor], widths: list[int]) -> dict[int, torch.Tensor]:
    out = {}
    for layer, idx in kept.items():
        check_hidden_layer(layer, len(widths), PruneError)
        idx = torch.as_tensor(idx, dtype=torch.long).flatten().unique(sorted=True)
        if idx.numel() == 0 or idx[0] < 0 or idx[-1] >= widths[layer]:
            raise PruneError(f"kept nodes of layer {layer} must be 1 to {widths[layer]} indices in 0..{widths[layer] - 1}, "
                             f"got {idx.tolist()[:10]}")
        out[layer] = idx
    return out


def _with_grad_flags(new: nn.Linear, old: nn.Linear) -> nn.Linear:
    new.requires_grad_(old.weight.requires_grad)
    return new


@torch.no_grad()
def mask_nodes(model: nn.Module, kept: dict[int, torch.Tensor]) -> nn.Sequential:
    """A same-size copy of `model` (plain `nn.Linear` layers) whose removed nodes have zero incoming weights.

    `kept[l]` lists the node indices of hidden linear layer l (0-based among linear layers) that stay.
    This is the reference that `remove_nodes` must equal.
    """
    chain = _plain_copy(model)
    pos = _linear_positions(chain)
    kept = _check_kept(kept, [chain[p].out_features for p in pos])
    for layer, idx in kept.items():
        lin = chain[pos[layer]]
        drop = torch.ones(lin.out_features, dtype=torch.bool)
        drop[idx] = False
        lin.weight[drop] = 0
    return chain.train(model.training)


@torch.no_grad()
def remove_nodes(model: nn.Module, kept: dict[int, torch.Tensor]) -> nn.Sequential:
    """A physically smaller copy of `model` keeping only `kept[l]` nodes of each listed hidden layer l.

    Returns a flat `nn.Sequential` of `nn.Linear` layers and the model's activations. Each removed
    node's constant output act(b_j) is folded into the next layer's bias (a bias is added to the
    next layer only if that constant is nonzero), so the result equals `mask_nodes(model, kept)`.
    Layers keep their `requires_grad` flags and the result `model`'s training mode; `model` is not modified.
    """
    chain = _plain_copy(model)
    pos = _linear_positions(chain)
    kept = _check_kept(kept, [chain[p].out_features for p in pos])
    for layer in sorted(kept, reverse=True):  # later layers first: a removed node's constant uses its own original bias
        idx = kept[layer]
        lin, nxt = chain[pos[layer]], chain[pos[layer + 1]]
        drop = torch.ones(lin.out_features, dtype=torch.bool)
        drop[idx] = False
        bias = lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
        fold = nxt.weight[:, drop] @ _activation(chain, pos[layer] + 1, pos[layer + 1])(bias[drop])
        kw = {"dtype": lin.weight.dtype, "device": lin.weight.device}
        small = nn.Linear(lin.in_features, len(idx), bias=lin.bias is not None, **kw)
        small.weight.copy_(lin.weight[idx])
        if lin.bias is not None:
            small.bias.copy_(lin.bias[idx])
        needs_bias = nxt.bias is not None or bool(fold.any())
        after = nn.Linear(len(idx), nxt.out_features, bias=needs_bias, **kw)
        after.weight.copy_(nxt.weight[:, idx])
        if needs_bias:
            after.bias.copy_(fold + (nxt.bias if nxt.bias is not None else 0))
        chain[pos[layer]] = _with_grad_flags(small, lin)
        chain[pos[layer + 1]] = _with_grad_flags(after, nxt)
    return chain.train(model.training)  # the new layers would be in training mode whatever the model's


@torch.no_grad()
def loss_by_kept(
    model: nn.Module, layer: int, scores: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
    task: Task = "regression", budget: int = CURVE_BUDGET,
) -> torch.Tensor:
    """Loss [N] of `model` with only the k highest-scoring nodes of hidden linear layer `layer` kept, k = 1..N.

    Same meaning as `mask_nodes` (a removed node outputs act(b_j)); computed with prefix sums, like
    `pruning_curves`: the next layer's pre-activation with k nodes kept is
    b' + W' act(b) + sum over the first k nodes (in score order) of W'_j (a_j - act(b_j)).
    x [B, D], y [B]; `budget` bounds the number of floats of one chunk.
    """
    chain = _chain(model)
    pos = _linear_positions(chain)
    check_hidden_layer(layer, len(pos), PruneError)
    lin, nxt = chain[pos[layer]], chain[pos[layer + 1]]
    act = _activation(chain, pos[layer] + 1, pos[layer + 1])
    head, tail = chain[: pos[layer] + 1], chain[pos[layer + 1] + 1 :]
    n = lin.out_features
    order = scores.argsort(descending=True, stable=True)
    bias = lin.bias if lin.bias is not None else lin.weight.new_zeros(n)
    const = act(bias)[order]  # [N]
    w_next = nxt.weight[:, order]  # [O, N]
    base = w_next @ const + (nxt.bias if nxt.bias is not None else 0)  # [O]
    chunk = max(1, budget // max(n * w_next.shape[0], 1))
    total = x.new_zeros(n)
    for start in range(0, x.shape[0], chunk):
        xb, yb = x[start : start + chunk], y[start : start + chunk]
        a = act(head(xb))[:, order] - const  # [B, N]
        z = base + torch.cumsum(a.unsqueeze(-1) * w_next.T, dim=1)  # [B, N(k), O]
        out = tail(z.flatten(0, 1)).unflatten(0, (xb.shape[0], n))  # [B, N, C]
        total += task_loss(out.transpose(0, 1), yb.expand(n, -1), task) * xb.shape[0]
    return total / x.shape[0]


ScoreFn = Callable[..., torch.Tensor]
"""criterion(model, layer, x, y) -> scores [N]; every `eigenprune.pruning.criteria.Criterion` is one."""


def ranked_layers(model: nn.Module) -> list[int]:
    """The hidden linear layers a training method ranks, the default of `select_nodes`: the `SpectralLinear`
    layers whose training ranks their nodes (`SpectralModule.ranked`: trained eigenvalues, or a sparsity/L2
    term on what trains; the method's layer of an eigenprune student, every layer of a deep or `spectralize`d
    one). A model with none (plain `nn.Linear` layers, say) gets all its hidden layers."""
    return _ranked(linear_layers(_chain(model)))


def _ranked(linears: list[nn.Module]) -> list[int]:
    """`ranked_layers` of a chain whose linear layers are `linears`."""
    hidden = linears[:-1]
    ranked = [i for i, m in enumerate(hidden) if isinstance(m, SpectralLinear) and m.ranked]
    return ranked or list(range(len(hidden)))


def select_nodes(
    model: nn.Module, keep: KeepLike | dict[int, KeepLike], *, layers: list[int] | None = None,
    criterion: ScoreFn | None = None, x_val: torch.Tensor | None = None, y_val: torch.Tensor | None = None,
    rtol: float = 0.05, atol: float = 0.0, task: Task = "regression",
) -> dict[int, torch.Tensor]:
    """Which nodes of each hidden layer to keep: {linear layer index: sorted node indices}.

    `layers` defaults to `ranked_layers(model)` (the layers the training method ranks; all hidden
    layers of a model without such layers). A model or validation data holding NaN/inf is refused.
    `criterion(model, layer, x, y, task=task) -> scores [N]` ranks each layer's nodes on the unpruned model
    (default `node_importance`: the eigenvalue score of a spectral layer, the norm of the incoming
    weights otherwise; `eigenprune.pruning.criteria` has the others). For keep="auto", pass validation
    data: a layer keeps the smallest k such that, for this k and every larger one, the validation
    loss stays within loss_full + atol + rtol * loss_full (loss_full: the unpruned model's). Layers
    are decided in order, each on the model with the earlier ones already pruned, against that one
    budget, so earlier layers may use it up.

    (Longer than 60 lines: the checks of every option come first, in one place, before any layer is scored.)
    """
    chain = _chain(model)  # the model's structure, read once
    linears = linear_layers(chain)

    def node_scores(model: nn.Module, layer: int, *data: object, **options: object) -> torch.Tensor:
        return node_importance(linears[layer])

    criterion = criterion or node_scores
    n_linear = len(linears)
    if isinstance(keep, dict):
        if layers is not None:
            raise PruneError("pass either a per-layer keep dict or layers=, not both")
        specs = {int(k): parse_keep(v) for k, v in keep.items()}
    else:
        try:
            hidden = _ranked(linears) if layers is None else [operator.index(i) for i in layers if not isinstance(i, bool)]
        except TypeError:
            hidden = None
        if hidden is None or (layers is not None and len(hidden) < len(list(layers))):
            raise PruneError(f"layers must be a list of hidden layer indices (ints), got {layers!r}")
        specs = {i: parse_keep(keep) for i in hidden}
    if not specs:
        raise PruneError("no layer to prune: name at least one hidden layer (layers=[0] or keep={0: ...})")
    for i in specs:
        check_hidden_layer(i, n_linear, PruneError)
    needs_data = any(s.kind == "auto" for s in specs.values())
    if needs_data and (x_val is None or y_val is None):
        raise PruneError("keep='auto' needs validation data: pass x_val and y_val")
    if not (math.isfinite(rtol) and math.isfinite(atol) and rtol >= 0 and atol >= 0):
        raise PruneError(f"rtol and atol must be finite numbers >= 0, got rtol={rtol}, atol={atol}")
    check_finite(model, x_val if needs_data else None, y_val if needs_data else None, names=("x_val", "y_val"))
    current, kept = _plain_copy(model, chain).eval(), {}
    limit = float("inf")
    if needs_data:
        dtype = next(current.parameters()).dtype
        x_val = x_val.to(dtype) if x_val.is_floating_point() else x_val
        y_val = y_val.to(dtype) if task == "regression" else y_val
        with torch.no_grad():
            full = float(task_loss(current(x_val), y_val, task))
        if not math.isfinite(full):
            raise PruneError(f"the unpruned model's validation loss is {full} (a diverged student, or data it cannot fit): "
                             "nothing to compare pruning against")
        limit = full + atol + rtol * abs(full)
    for layer in sorted(specs):
        scores = criterion(model, layer, x_val, y_val, task=task).detach().flatten()
        width = linear_layers(current)[layer].out_features
        if scores.numel() != width or not bool(torch.isfinite(scores).all()):
            raise PruneError(f"the criterion must score each of the {width} nodes of layer {layer} with a finite number, "
                             f"got {scores.numel()} score(s), {int((~torch.isfinite(scores)).sum())} of them NaN/inf")

        def curve(layer=layer, scores=scores, current=current) -> torch.Tensor:
            losses = loss_by_kept(current, layer, scores, x_val, y_val, task)
            with torch.no_grad():  # k = N is `current` itself: use its forward pass, free of prefix-sum rounding
                losses[-1] = task_loss(current(x_val), y_val, task)
            return losses

        k = count_to_keep(specs[layer], scores, f"layer {layer}", curve, limit)
        kept[layer] = top_k_mask(scores, k).nonzero().flatten()
        current = remove_nodes(current, {layer: kept[layer]})
    return kept


def prune_chain(
    model: nn.Module, keep: KeepLike | dict[int, KeepLike], *, layers: list[int] | None = None,
    criterion: ScoreFn | None = None, x_val: torch.Tensor | None = None, y_val: torch.Tensor | None = None,
    rtol: float = 0.05, atol: float = 0.0, task: Task = "regression",
) -> nn.Sequential:
    """`remove_nodes(model, select_nodes(model, keep, ...))`: a physically smaller copy of a chain MLP, a flat
    `nn.Sequential` of plain `nn.Linear` layers and the model's activations, computing exactly what
    `mask_nodes` computes (each removed node's constant act(b_j) folded into the next bias)."""
    kept = select_nodes(model, keep, layers=layers, criterion=criterion, x_val=x_val, y_val=y_val, rtol=rtol, atol=atol, task=task)
    return remove_nodes(model, kept)
