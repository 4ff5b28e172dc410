"""Pruning curves and the joint minimal-architecture search of a whole ensemble at once."""

from __future__ import annotations

import torch

from eigenprune.batched.ensemble import Ensemble
from eigenprune.batched.train import evaluate
from eigenprune.core.losses import Task, task_metric
from eigenprune.core.structure import check_hidden_layer
from eigenprune.pruning.chain import CURVE_BUDGET
from eigenprune.pruning.keep import top_k_mask


@torch.no_grad()
def pruning_curves(
    ens: Ensemble, layer: int, scores: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
    trial_index: torch.Tensor, task: Task, budget: int = CURVE_BUDGET, metric: str = "loss",
) -> torch.Tensor:
    """Test loss (or accuracy) [S, N] of every student keeping its top-k nodes of hidden layer `layer`, k = 1..N.

    Uses prefix sums: with nodes sorted by importance, the next layer's pre-activation with k nodes
    kept is the cumulative sum of the first k nodes' contributions, so all N curves cost about one
    forward pass with an extra node axis. A removed node outputs relu(b_j), its value with zero incoming
    weights (see `Ensemble`): with a bias the sums run over a_j - relu(b_j) from W' relu(b) + b'.
    x [T, Q, D], y [T, Q] are the trials' test sets. Entries beyond a student's own width repeat its
    full-width loss.
    """
    check_hidden_layer(layer, len(ens.layers))
    s_count, n = scores.shape
    order = scores.argsort(dim=-1, descending=True, stable=True)
    nxt = ens.layers[layer + 1]
    w_next = torch.gather(nxt.weight, 2, order.unsqueeze(1).expand(-1, nxt.weight.shape[1], -1))  # [S, O, N]
    lin = ens.layers[layer]
    const = None if lin.bias is None else torch.gather(torch.relu(lin.bias), 1, order)  # [S, N]: removed nodes' outputs
    base = nxt.bias
    if const is not None:
        base = torch.bmm(w_next, const.unsqueeze(-1)).squeeze(-1) + (0 if base is None else base)  # [S, O]
    q = x.shape[1]
    per_row = n * max(w_next.shape[1], 1) * s_count
    chunk = max(1, min(q, budget // max(per_row, 1)))
    total = x.new_zeros(s_count, n)
    for start in range(0, q, chunk):
        xb, yb = x[trial_index, start : start + chunk], y[trial_index, start : start + chunk]
        a = torch.gather(ens.hidden(xb, layer), 2, order.unsqueeze(1).expand(-1, xb.shape[1], -1))  # [S, B, N]
        if const is not None:
            a = a - const.unsqueeze(1)
        z = torch.cumsum(a.unsqueeze(-1) * w_next.transpose(1, 2).unsqueeze(1), dim=2)  # [S, B, N(k), O]
        if base is not None:
            z = z + base[:, None, None, :]
        out = ens.head(z.flatten(1, 2), layer + 1).unflatten(1, (xb.shape[1], n))  # [S, B, N, C]
        yk = yb.unsqueeze(-1).expand(-1, -1, n)  # [S, B, N]
        total += task_metric(out.transpose(1, 2), yk.transpose(1, 2), task, metric) * xb.shape[1]
    return total / q


@torch.no_grad()
def joint_search(
    ens: Ensemble, scores: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, trial_index: torch.Tensor,
    task: Task, rel_tol: float,
) -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
    """Smallest widths of all hidden layers, pruned jointly by importance: a minimal architecture.

    Layers are pruned in order; layer l (of L) gets the smallest top-k (binary search, per student)
    whose loss on (x, y) stays within (1 + rel_tol * (l + 1) / L) x the full model's, with the layers
    before it already pruned, so the final loss is within (1 + rel_tol) x full. Returns the kept
    count per layer [S] and the 0/1 masks of the kept nodes.
    """
    full = evaluate(ens, x, y, trial_index, task)
    kept: dict[int, torch.Tensor] = {}
    widths = []
    for layer, sc in enumerate(scores):
        bound = full * (1 + rel_tol * (layer + 1) / len(scores))
        lo, hi = torch.ones_like(ens.layers[layer].widths), ens.layers[layer].widths.clone()
        while bool((lo < hi).any()):
            mid = (lo + hi) // 2
            ok = evaluate(ens, x, y, trial_index, task, kept={**kept, layer: top_k_mask(sc, mid)}) <= bound
            active = lo < hi
            hi = torch.where(active & ok, mid, hi)
            lo = torch.where(active & ~ok, mid + 1, lo)
        kept[layer] = top_k_mask(sc, lo)
        widths.append(lo)
    return widths, kept
