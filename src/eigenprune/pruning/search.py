"""Minimal-width search ("forgetting" with fine-tuning): how few nodes can a hidden layer keep?

Starting from a trained MLP, repeatedly remove the least important nodes of one hidden layer
(physically, with `remove_nodes`), fine-tune the smaller network briefly, and measure its test
loss. A step is accepted while that loss stays within `full + atol + rtol * full` (full: the
unpruned model's test loss); after a rejected step the search returns to the last accepted model
and tries half as many nodes; it stops when even one node cannot go. Step sizes shrink
geometrically (`shrink` x the current width), so a width-N layer takes about log(N) steps plus a
few single-node steps near the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from eigenprune.core.losses import Task, task_loss, task_metric
from eigenprune.core.structure import check_hidden_layer, layer_sizes
from eigenprune.core.training import TrainSpec, train_alone
from eigenprune.pruning.chain import ScoreFn, remove_nodes, select_nodes
from eigenprune.pruning.keep import PruneError

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class SearchResult:
    """The smallest accepted model, its width, the unpruned model's test loss and every step tried.

    `curve` has one row per step: step, kept (width tried), loss_pruned (right after removal),
    loss_finetuned (after fine-tuning), accepted (bool).
    """

    model: nn.Sequential
    width: int
    full_loss: float
    curve: pd.DataFrame


@torch.no_grad()
def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task) -> float:
    return float(task_loss(model(x), y, task))


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(task_metric(model(x), y, "classification", "accuracy"))


def minimal_width(
    model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, *,
    layer: int = 0, criterion: ScoreFn | None = None, rtol: float = 0.1, atol: float = 0.0, shrink: float = 0.2,
    finetune: TrainSpec = TrainSpec(lr=1e-3, batch_size=100, epochs=2), seed: int = 0, task: Task = "regression",
    accuracy_tol: float | None = None,
) -> SearchResult:
    """Prune hidden linear layer `layer` of `model` in steps, fine-tuning after each, down to the smallest width that passes.

    `criterion(model, layer, x, y) -> scores` ranks the current model's nodes before each step
    (default: `node_importance`; on the already pruned, plain network that is the norm of each
    node's incoming weights, which equals the eigenvalue score |lam_i| ||phi_i|| when lam_in = 0).
    Fine-tuning trains every parameter that requires grad with `finetune` (Adam, task loss, no
    penalty: the pruned network is made of plain `nn.Linear` layers) on `task`'s loss (`finetune.task` is
    ignored: the search and its fine-tuning optimise one loss). x_* [P, D], y_* [P].
    With `accuracy_tol` (classification), a step is accepted instead while the test accuracy stays
    within `accuracy_tol` of the unpruned model's (e.g. 0.01 = one point).
    """
    if not 0 < shrink < 1:
        raise PruneError(f"shrink must be in (0, 1), got {shrink}")
    if not (math.isfinite(rtol) and math.isfinite(atol) and rtol >= 0 and atol >= 0):
        raise PruneError(f"rtol and atol must be finite numbers >= 0, got rtol={rtol}, atol={atol}")
    current = remove_nodes(model, {})  # a plain copy: nothing removed yet
    sizes = layer_sizes(current)
    check_hidden_layer(layer, len(sizes) - 1, PruneError)
    full = _loss(current, x_test, y_test, task)
    if not math.isfinite(full):
        raise PruneError(f"the unpruned model's test loss is {full} (a diverged model, or NaN/inf data): nothing to search")
    limit = full + atol + rtol * full
    if accuracy_tol is not None and task != "classification":
        raise PruneError(f"accuracy_tol needs task classification, got {task}")
    floor = None if accuracy_tol is None else _accuracy(current, x_test, y_test) - accuracy_tol
    finetune = replace(finetune, task=task)
    n = sizes[layer + 1]
    step = max(1, int(shrink * n))
    rows = []
    while n > 1:
        k = max(1, n - step)
        kept = select_nodes(current, {layer: k}, criterion=criterion, x_val=x_train, y_val=y_train, task=task)
        candidate = remove_nodes(current, kept)
        pruned = _loss(candidate, x_test, y_test, task)
        train_alone(candidate, x_train, y_train, finetune, seed + len(rows))
        tuned = _loss(candidate, x_test, y_test, task)
        accepted = tuned <= limit if floor is None else _accuracy(candidate, x_test, y_test) >= floor
        rows.append({"step": len(rows), "kept": k, "loss_pruned": pruned, "loss_finetuned": tuned, "accepted": accepted})
        if accepted:
            current, n = candidate, k
            step = min(step, max(1, int(shrink * n)))
        elif step == 1:
            break
        else:
            step //= 2
    import pandas as pd  # only here: the library does not load pandas on import

    curve = pd.DataFrame(rows, columns=["step", "kept", "loss_pruned", "loss_finetuned", "accepted"])
    return SearchResult(current, n, full, curve)

