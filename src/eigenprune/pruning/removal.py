"""Pruning an MLP by importance: keep specs, masks, the loss for every kept count, and physical removal.

`prune_nodes` turns any chain-shaped MLP into a physically smaller one made of plain `nn.Linear`
layers (with `example_inputs`, any graph Torch-Pruning can trace: see `pruning.graph`). `loss_by_kept`
is the loss when only the k most important nodes of a layer are kept, for every k (the ensemble's
version is `batched.curves.pruning_curves`).
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Union

import torch
from torch import nn

from eigenprune.core.convert import despectralize
from eigenprune.core.layers import SpectralLinear
from eigenprune.core.losses import Task, task_loss
from eigenprune.core.structure import as_sequential, check_hidden_layer, linear_layers
from eigenprune.pruning.importance import node_importance, normalize

CURVE_BUDGET = 2**24
"""Floats in one block of a prefix-sum pruning curve (bounds its memory)."""


def top_k_mask(scores: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """0/1 mask [..., N] keeping the k highest-scoring nodes of each row (ties broken by index)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranks = order.argsort(dim=-1)
    k = torch.as_tensor(k, device=scores.device)
    return (ranks < k.unsqueeze(-1) if k.dim() else ranks < k).to(scores.dtype)


# --- Physical removal ------------------------------------------------------------------------------
#
# "Removing" hidden node j of linear layer l means what setting its eigenvalue to zero means: its
# incoming weights become 0, so it outputs the constant act(b_j) (act: the element-wise modules
# after layer l, b_j its bias, 0 without one). `mask_nodes` builds exactly that network;
# `remove_nodes` builds the smaller one: row j of layer l and column j of layer l+1 go, and
# W_next[:, j] * act(b_j) is folded into the next layer's bias. Both compute the same function.


class PruneError(ValueError):
    """A pruning request that cannot be carried out, stated in one line."""


KeepKind = Literal["count", "fraction", "threshold", "auto"]


@dataclass(frozen=True)
class KeepSpec:
    """How many nodes of a layer to keep.

    count: the `value` most important; fraction: ceil(value x width), at least 1; threshold: those
    whose normalised importance (score / max score) exceeds `value` (at least the top one); auto:
    the smallest count whose validation loss is within tolerance of the unpruned model's.
    """

    kind: KeepKind
    value: float = 0.0


KeepLike = Union[int, float, str, KeepSpec]

_KEEP_HELP = ("keep must be a count >= 1 (e.g. 25), a fraction in (0, 1] (e.g. 0.1 or '10%'), "
              "a threshold '>t' on normalised importance with 0 <= t < 1 (e.g. '>0.05'), or 'auto'")


def parse_keep(keep: KeepLike) -> KeepSpec:
    """Read a keep value: int -> count, float -> fraction, or a string '25', '0.1', '10%', '>0.05', 'auto'."""
    if isinstance(keep, KeepSpec):
        return keep
    if isinstance(keep, bool):
        raise PruneError(f"{_KEEP_HELP}; got {keep!r}")
    if isinstance(keep, str):
        text = keep.strip()
        try:
            if text == "auto":
                return KeepSpec("auto")
            if text.startswith(">"):
                value = float(text[1:])
                if 0 <= value < 1:
                    return KeepSpec("threshold", value)
            elif text.endswith("%"):
                return parse_keep(float(text[:-1]) / 100)
            elif text.isdigit():
                return parse_keep(int(text))
            else:
                return parse_keep(float(text))
        except ValueError:
            pass
    elif isinstance(keep, int):
        if keep >= 1:
            return KeepSpec("count", keep)
    elif isinstance(keep, float):
        if 0 < keep <= 1:
            return KeepSpec("fraction", keep)
    raise PruneError(f"{_KEEP_HELP}; got {keep!r}")


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


def _plain_copy(model: nn.Module) -> nn.Sequential:
    """A deep copy of the MLP as a flat `nn.Sequential` whose linear layers are all `nn.Linear`; PruneError for a model
    with forward hooks (the copy is rebuilt from its layers: a hook on the model would be lost, one on a pruned layer
    would see other widths)."""
    chain = _chain(model)
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


def _default_scores(model: nn.Module, layer: int, x: torch.Tensor | None = None, y: torch.Tensor | None = None,
                    task: Task = "regression") -> torch.Tensor:
    return node_importance(linear_layers(as_sequential(model))[layer])


def ranked_layers(model: nn.Module) -> list[int]:
    """The hidden linear layers a training method ranks, the default of `select_nodes`: those that are
    `SpectralLinear` with trained eigenvalues or with a sparsity/L2 term on what trains (the method's
    layer of an eigenprune student, every layer of a deep or `spectralize`d one). A model with none
    (plain `nn.Linear` layers, say) gets all its hidden layers."""
    hidden = linear_layers(_chain(model))[:-1]
    ranked = [i for i, m in enumerate(hidden) if isinstance(m, SpectralLinear) and (
        m.lam_out.requires_grad or m.l1_lam > 0 or m.group_lasso > 0 or (m.phi.requires_grad and m.l2_phi > 0))]
    return ranked or list(range(len(hidden)))


def check_finite(model: nn.Module, *data: torch.Tensor | None, names: tuple[str, ...] = ()) -> None:
    """Refuse a model or data holding NaN/inf, or data without rows (pruning would write a model of garbage).

    `data` are tensors (None skipped) named by `names` (default "example_inputs[i]") in the message.
    """
    for name, t in model.state_dict().items():
        if t.is_meta:
            raise PruneError(f"the model's {name} is on the meta device (it holds no values): load or initialise the weights first")
        if t.dim() and t.numel() == 0:
            raise PruneError(f"the model's {name} is empty (shape {list(t.shape)}: a layer of width 0): nothing to prune")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise PruneError(f"the model's {name} holds {bad} NaN/inf value(s) (a diverged student?): nothing to prune")
    for i, t in enumerate(data):
        label = names[i] if i < len(names) else f"example_inputs[{i}]"
        if t is None:
            continue
        if t.is_meta:
            raise PruneError(f"{label} is on the meta device (it holds no values); pruning runs the model on real tensors")
        if t.dim() and t.shape[0] == 0:
            raise PruneError(f"{label} has no rows: pruning needs data to check against")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PruneError(f"{label} holds {int((~torch.isfinite(t)).sum())} NaN/inf value(s)")


def count_to_keep(spec: KeepSpec, scores: torch.Tensor, where: str, curve: Callable[[], torch.Tensor] | None = None,
                  limit: float = float("inf")) -> int:
    """How many of the nodes (channels) `scores` ranks a keep spec keeps, for the layer named `where`.

    count: the value (at most the width); fraction: ceil(value x width), at least 1; threshold: those above
    it after normalising by the top score, at least 1; auto: the smallest k such that `curve()` (the loss
    for every k) stays <= `limit` from k on. Where no curve can be made, auto is refused.
    """
    width = scores.numel()
    if spec.kind == "count":
        if spec.value > width:
            raise PruneError(f"keep={int(spec.value)} exceeds the width {width} of {where}; give a count in 1..{width}")
        return int(spec.value)
    if spec.kind == "fraction":
        return max(1, math.ceil(spec.value * width - 1e-9))
    if spec.kind == "threshold":
        return max(1, int((normalize(scores) > spec.value).sum()))
    if curve is None:
        raise PruneError("keep='auto' is for chain MLPs (call prune_nodes without example_inputs); with example_inputs "
                         "give a count, a fraction or a threshold '>t'")
    ok = (curve() <= limit).int().flip(0).cumprod(0).flip(0)  # 1 where this k and every larger k are within the limit
    return width - int(ok.sum()) + 1 if ok.any() else width


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
    """
    criterion = criterion or _default_scores
    n_linear = len(linear_layers(_chain(model)))
    if isinstance(keep, dict):
        if layers is not None:
            raise PruneError("pass either a per-layer keep dict or layers=, not both")
        specs = {int(k): parse_keep(v) for k, v in keep.items()}
    else:
        try:
            hidden = ranked_layers(model) if layers is None else [operator.index(i) for i in layers if not isinstance(i, bool)]
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
    current, kept = _plain_copy(model).eval(), {}
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


def prune_nodes(
    model: nn.Module, keep: KeepLike | dict[int, KeepLike], *, layers: list[int] | None = None,
    criterion: ScoreFn | None = None, x_val: torch.Tensor | None = None, y_val: torch.Tensor | None = None,
    rtol: float = 0.05, atol: float = 0.0, task: Task = "regression", example_inputs=None, **graph_options,
) -> nn.Module:
    """A physically smaller copy of `model`: plain `nn.Linear` layers, only the important nodes kept.

    With `example_inputs`, any model Torch-Pruning can trace (convolutions, residual blocks,
    BatchNorm, transformer MLPs) is pruned by `eigenprune.pruning.graph.prune_graph`: `keep` is then
    a count, fraction or '>t' per channel group, or a dict {layer name: keep}, and `graph_options`
    are prune_graph's (importance, global_ranking, ignored_layers, keep_spectral, inplace).
    Without it, the chain-MLP path below runs.

    `model` is any MLP `as_sequential` can read (spectral or direct layers, `nn.Sequential` or a
    chain-shaped module of your own). `keep` is a count, a fraction, a threshold '>t' on the
    normalised importance, 'auto' (needs x_val, y_val), or a dict {layer: keep} for per-layer
    values; `layers` picks hidden linear layers by index (default: `ranked_layers`, the layers the
    training method ranks; all hidden layers of a plain model). See `select_nodes` and
    `remove_nodes`. The result computes exactly what the model with the other nodes' incoming
    weights zeroed computes.
    """
    if example_inputs is not None:
        from eigenprune.pruning.graph import prune_graph

        if layers is not None or criterion is not None or x_val is not None or y_val is not None:
            raise PruneError("with example_inputs, choose layers by name in keep={name: value} and the criterion with "
                             "importance=; layers, criterion, x_val and y_val belong to the chain-MLP path")
        return prune_graph(model, keep, example_inputs, **graph_options)
    if graph_options:
        raise PruneError(f"{', '.join(sorted(graph_options))}: options of the graph path; pass example_inputs to use it")
    kept = select_nodes(model, keep, layers=layers, criterion=criterion, x_val=x_val, y_val=y_val, rtol=rtol, atol=atol, task=task)
    return remove_nodes(model, kept)
