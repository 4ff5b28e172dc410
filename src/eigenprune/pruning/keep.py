"""What to keep, shared by both pruning paths: keep specs, how many nodes a spec keeps of a ranked layer, the top-k
mask, the error type and the checks every pruning request starts with.

`keep` counts what STAYS: keep=25 keeps 25 nodes (channels), keep=0.1 keeps 10% of them. (Torch-Pruning's
`pruning_ratio` and `torch.nn.utils.prune`'s `amount` count what goes: keep=0.3 is pruning_ratio=0.7.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Union

import torch
from torch import nn

from eigenprune.core.errors import EigenpruneError
from eigenprune.pruning.importance import normalize


class PruneError(EigenpruneError, ValueError):
    """A pruning request that cannot be carried out, stated in one line."""


KeepKind = Literal["count", "fraction", "threshold", "auto"]


@dataclass(frozen=True)
class KeepSpec:
    """How many nodes (channels) of a layer to keep: it counts what stays, not what goes.

    count: the `value` most important; fraction: ceil(value x width), at least 1; threshold: those
    whose normalised importance (score / max score) exceeds `value` (at least the top one); auto:
    the smallest count whose validation loss is within tolerance of the unpruned model's (chain path only).
    """

    kind: KeepKind
    value: float = 0.0


KeepLike = Union[int, float, str, KeepSpec]
"""What `parse_keep` reads: a count (int), a fraction (float), a string ('25', '0.1', '10%', '>0.05', 'auto') or a KeepSpec."""

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


def top_k_mask(scores: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """0/1 mask [..., N] keeping the k highest-scoring nodes of each row (ties broken by index)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranks = order.argsort(dim=-1)
    k = torch.as_tensor(k, device=scores.device)
    return (ranks < k.unsqueeze(-1) if k.dim() else ranks < k).to(scores.dtype)


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


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of a floating-point `t` is finite. A finite sum proves it at the cost of one read (NaN and
    inf propagate through a sum); only a non-finite sum (NaN/inf, or a sum that overflows) takes the exact check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_finite(model: nn.Module, *data: torch.Tensor | None, names: tuple[str, ...] = ()) -> None:
    """Refuse a model or data holding NaN/inf, or data without rows (pruning would write a model of garbage).

    `data` are tensors (None skipped) named by `names` (default "example_inputs[i]") in the message.
    """
    for name, t in model.state_dict().items():
        if t.is_meta:
            raise PruneError(f"the model's {name} is on the meta device (it holds no values): load or initialise the weights first")
        if t.dim() and t.numel() == 0:
            raise PruneError(f"the model's {name} is empty (shape {list(t.shape)}: a layer of width 0): nothing to prune")
        if t.is_floating_point() and not _all_finite(t):
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
        if t.is_floating_point() and not _all_finite(t):
            raise PruneError(f"{label} holds {int((~torch.isfinite(t)).sum())} NaN/inf value(s)")
