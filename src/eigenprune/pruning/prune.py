"""`prune_nodes`: the one pruning entry, above the two paths (`pruning.chain` and `pruning.graph`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn

from eigenprune.core.losses import Task
from eigenprune.pruning.chain import ScoreFn, prune_chain
from eigenprune.pruning.graph import ChannelPlan, Inputs, LayerRef, prune_graph
from eigenprune.pruning.keep import KeepLike, PruneError


def prune_nodes(
    model: nn.Module, keep: KeepLike | dict[int, KeepLike] | dict[str, KeepLike] | ChannelPlan, *,
    example_inputs: Inputs | None = None,
    layers: list[int] | None = None, criterion: ScoreFn | None = None, x_val: torch.Tensor | None = None,
    y_val: torch.Tensor | None = None, rtol: float | None = None, atol: float | None = None, task: Task | None = None,
    importance: tp.importance.Importance | None = None, global_ranking: bool | None = None,
    ignored_layers: Sequence[LayerRef] | None = None, unwrapped_parameters: Sequence[tuple[object, int]] | None = None,
    keep_spectral: bool | None = None, inplace: bool | None = None, exact: bool | None = None,
) -> nn.Module:
    """A physically smaller copy of `model` keeping only its most important nodes (channels).

    `keep` counts what STAYS, per layer (channel group): a count (25), a fraction of the width (0.1 or
    '10%', rounded up, at least 1), a threshold '>t' on the score divided by the layer's top score, or a
    dict of per-layer values. (Torch-Pruning's `pruning_ratio` and `torch.nn.utils.prune`'s `amount` count
    what goes: keep=0.3 is pruning_ratio=0.7.) Two paths, chosen by `example_inputs`:

    * **Chain path** (no `example_inputs`; `pruning.chain.prune_chain`): any MLP `as_sequential` reads
      (`nn.Sequential` or a chain-shaped module of your own, spectral or plain linear layers). Layers are
      named by their index among the linear layers (dict keys are ints). A removed node's incoming weights
      become zero, so it would output the constant act(b_j): that constant is folded into the next layer's
      bias, and the result (a flat `nn.Sequential` of plain `nn.Linear` layers) computes exactly what
      `mask_nodes` (the same-size model with those weights zeroed) computes. Options: `layers` (default
      `ranked_layers`: those the training method ranks), `criterion` (default `node_importance`),
      keep='auto' with `x_val`, `y_val`, `rtol` (0.05), `atol` (0) and `task` ('regression').
    * **Graph path** (`example_inputs` given; `pruning.graph.prune_graph`): any model Torch-Pruning can
      trace (convolutions, residual blocks, BatchNorm, transformer MLPs). Layers are named by module name
      (dict keys are strings; any layer producing a group's channels names the group). A removed channel is
      cut out whole, its output included: its constant act(b_j) is NOT folded into what follows (it may
      pass through BatchNorm, a residual sum or LayerNorm first), and the result (the model's own classes,
      plain layers unless `keep_spectral`) computes exactly what `mask_graph` (every slice of the channel
      zeroed) computes. For a bias-free ReLU MLP the two paths give the same model. Options:
      `importance` (any Torch-Pruning `Importance`, default `EigenImportance`), `global_ranking`,
      `ignored_layers`, `unwrapped_parameters` ((parameter, dim) pairs for bare parameters such as a layer
      scale or class token; others are found and cut along their last dimension longer than 1),
      `keep_spectral`, `inplace` (all off by default), `exact` (default True: groups through LayerNorm,
      GroupNorm, RMSNorm or nn.MultiheadAttention are left alone; False prunes them too, recomputing each
      norm over the kept channels: NOT equal to the masked model; see `select_channels`); keep='auto' is
      chain-only.

    An option of the other path is a PruneError, as is any request either path cannot carry out.
    """
    chain_options = {"layers": layers, "criterion": criterion, "x_val": x_val, "y_val": y_val, "rtol": rtol, "atol": atol,
                     "task": task}
    graph_options = {"importance": importance, "global_ranking": global_ranking, "ignored_layers": ignored_layers,
                     "unwrapped_parameters": unwrapped_parameters, "keep_spectral": keep_spectral, "inplace": inplace,
                     "exact": exact}
    if example_inputs is not None:
        if given := [name for name, value in chain_options.items() if value is not None]:
            raise PruneError("with example_inputs, choose layers by name in keep={name: value} and the criterion with "
                             f"importance=; {', '.join(given)}: options of the chain path")
        return prune_graph(model, keep, example_inputs, **{k: v for k, v in graph_options.items() if v is not None})
    if given := [name for name, value in graph_options.items() if value is not None]:
        raise PruneError(f"{', '.join(given)}: options of the graph path; pass example_inputs to use it")
    return prune_chain(model, keep, **{k: v for k, v in chain_options.items() if v is not None})
