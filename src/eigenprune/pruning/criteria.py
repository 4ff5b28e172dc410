"""Node-importance criteria behind one interface: how to train a prunable layer, and how to rank its nodes.

A `Criterion` scores the output nodes of one hidden linear layer (higher = keep), and says how the
layer should be trained so that the score means something (`layer_plan`): some criteria are only
a score on an ordinary network, others need a sparsity term while training (like Torch-Pruning's
importance classes paired with their regularizers). The low-level formulas live in `importance.py`.

  name          trains the layer as                          score of node i
  eigenvalue    spectral: L2 on phi and lam (the paper)      |lam_out_i| * ||phi_i||
  feature_norm  direct: L2 on the weights                    ||w_i|| (norm of incoming weights)
  random        direct                                       uniform random (a floor)
  slimming      gate lam_out_i with L1, L2 on phi            |lam_out_i| (network slimming's gate)
  group_lasso   direct, group_lasso * sum_i ||w_i||          ||w_i||
  taylor        direct                                       mean over data of |a_i * dLoss/da_i|

Every criterion accepts either an MLP (`nn.Module`, read by `as_sequential`; scores [N]; data
x [B, D], y [B]) or a batched `Ensemble` (scores [S, N]; data x [S, B, D], y [S, B]). Padded
nodes of an ensemble always score 0. Use `get_criterion(name, **params)` or the `CRITERIA` registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from eigenprune.core.layers import SpectralLinear
from eigenprune.core.losses import Task, task_loss
from eigenprune.core.plans import LayerPlan
from eigenprune.core.seeds import derive_seed
from eigenprune.core.structure import as_sequential, check_hidden_layer, linear_layers
from eigenprune.pruning.importance import feature_norm, node_importance


@runtime_checkable
class Stacked(Protocol):
    """Many students as one model (implemented by `eigenprune.batched.ensemble.Ensemble`): stacked `layers`, each
    with its students' true `widths`; `hidden(x, l)` the activations after layer l; `head(z, l)` the
    network from layer l's pre-activation to the output."""

    layers: nn.ModuleList

    def hidden(self, x: torch.Tensor, upto: int) -> torch.Tensor: ...

    def head(self, a: torch.Tensor, start: int) -> torch.Tensor: ...


def _layer(model: nn.Module, layer: int) -> nn.Module:
    layers = list(model.layers) if isinstance(model, Stacked) else linear_layers(as_sequential(model))
    return layers[check_hidden_layer(layer, len(layers))]


def _valid(model: nn.Module, layer: int, scores: torch.Tensor) -> torch.Tensor:
    """Zero the scores of an ensemble's padded nodes."""
    if not isinstance(model, Stacked):
        return scores
    widths = model.layers[layer].widths
    return scores * (torch.arange(scores.shape[-1], device=scores.device) < widths.unsqueeze(-1))


class Criterion(ABC):
    """Scores the output nodes of a hidden linear layer; `layer_plan` says how to train that layer."""

    name: ClassVar[str]
    needs_data: ClassVar[bool] = False

    def __init__(self, l2_phi: float = 0.01) -> None:
        self.l2_phi = l2_phi

    def layer_plan(self, width: int) -> LayerPlan:
        """How a student's prunable layer of `width` nodes trains for this criterion (default: direct, L2)."""
        return LayerPlan(width, "direct", self.l2_phi, 0.0)

    @abstractmethod
    def scores(self, model: nn.Module, layer: int, x: torch.Tensor | None = None, y: torch.Tensor | None = None,
               task: Task = "regression") -> torch.Tensor:
        """Importance of each output node of hidden linear layer `layer`: [N] for an MLP, [S, N] for a `Stacked` model."""

    def __call__(self, model: nn.Module, layer: int, x: torch.Tensor | None = None, y: torch.Tensor | None = None,
                 task: Task = "regression") -> torch.Tensor:
        if self.needs_data and (x is None or y is None):
            raise ValueError(f"criterion {self.name!r} needs data: pass x and y")
        with torch.no_grad():
            return _valid(model, layer, self.scores(model, layer, x, y, task))

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


CRITERIA: dict[str, type[Criterion]] = {}


def register(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator: make a criterion available to `get_criterion` under `cls.name`."""
    CRITERIA[cls.name] = cls
    return cls


def get_criterion(name: str, **params) -> Criterion:
    """An instance of the registered criterion `name` (parameters go to its constructor)."""
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; known: {', '.join(CRITERIA)}")
    return CRITERIA[name](**params)


@register
class Eigenvalue(Criterion):
    """The paper's spectral ranking L_i = |lam_out_i| * ||phi_i|| on a spectral layer (L2 on phi and lam);
    `node_importance`: the norm of the actual incoming weights, which is L_i when lam_in = 0."""

    name = "eigenvalue"

    def __init__(self, l2_phi: float = 0.01, l2_lam: float = 5e-4) -> None:
        super().__init__(l2_phi)
        self.l2_lam = l2_lam

    def layer_plan(self, width: int) -> LayerPlan:
        return LayerPlan(width, "spectral", self.l2_phi, self.l2_lam)

    def scores(self, model, layer, x=None, y=None, task="regression"):
        return node_importance(_layer(model, layer))


@register
class FeatureNorm(Criterion):
    """M_i = ||w_i||, the norm of node i's incoming weights (the paper's direct ranking)."""

    name = "feature_norm"

    def scores(self, model, layer, x=None, y=None, task="regression"):
        return feature_norm(_layer(model, layer).weight)


@register
class Random(Criterion):
    """Uniform random scores in (0, 1], seeded: the floor any criterion must beat."""

    name = "random"

    def __init__(self, l2_phi: float = 0.01, seed: int = 0) -> None:
        super().__init__(l2_phi)
        self.seed = seed

    def scores(self, model, layer, x=None, y=None, task="regression"):
        w = _layer(model, layer).weight
        g = torch.Generator().manual_seed(derive_seed("random-criterion", self.seed, layer))
        return 1 - torch.rand(w.shape[:-1], generator=g, dtype=w.dtype).to(w.device)


@register
class Slimming(Criterion):
    """Network slimming (Liu et al. 2017): a per-node gate gamma_i = lam_out_i with an L1 penalty; score |gamma_i|.

    The layer trains as w_i = -gamma_i * phi_i with l1 * sum|gamma| + l2_phi * sum(phi^2).
    """

    name = "slimming"

    def __init__(self, l2_phi: float = 0.01, l1: float = 1e-3) -> None:
        super().__init__(l2_phi)
        self.l1 = l1

    def layer_plan(self, width: int) -> LayerPlan:
        return LayerPlan(width, "spectral", self.l2_phi, 0.0, l1_lam=self.l1)

    def scores(self, model, layer, x=None, y=None, task="regression"):
        lin = _layer(model, layer)
        if not hasattr(lin, "lam_out"):
            raise TypeError(f"criterion 'slimming' needs a gated layer (SpectralLinear lam_out), got {type(lin).__name__}")
        return lin.lam_out.abs()


@register
class GroupLasso(Criterion):
    """Explicit group lasso: train with strength * sum_i ||w_i|| (no L2), score ||w_i||.

    The default strength 2 * sqrt(0.01 * 5e-4) ~ 0.0045 is what the paper's spectral L2 terms
    amount to at their optimum (PAPER.md section 1), so this is the spectral method's penalty
    applied directly to the weights.
    """

    name = "group_lasso"

    def __init__(self, strength: float = 2 * (0.01 * 5e-4) ** 0.5) -> None:
        super().__init__(0.0)
        self.strength = strength

    def layer_plan(self, width: int) -> LayerPlan:
        return LayerPlan(width, "direct", 0.0, 0.0, group_lasso=self.strength)

    def scores(self, model, layer, x=None, y=None, task="regression"):
        return feature_norm(_layer(model, layer).weight)


@register
class Taylor(Criterion):
    """First-order Taylor (Molchanov et al. 2017): mean over the data of |a_i * dLoss/da_i|.

    a_i is node i's activation (after the element-wise modules that follow the layer) and Loss the
    per-pattern task loss: the first-order estimate of the loss change when a_i is set to 0.
    """

    name = "taylor"
    needs_data = True

    def scores(self, model, layer, x=None, y=None, task="regression"):
        with torch.enable_grad():
            if isinstance(model, Stacked):
                a = model.hidden(x, layer).detach().requires_grad_(True)
                out = model.head(model.layers[layer + 1](a), layer + 1)
            else:
                chain = as_sequential(model)
                nxt = [i for i, m in enumerate(chain) if isinstance(m, (nn.Linear, SpectralLinear))][layer + 1]
                a = chain[:nxt](x).detach().requires_grad_(True)
                out = chain[nxt:](a)
            loss = task_loss(out, y, task) * y.shape[-1]  # sum over patterns of the per-pattern loss
            (grad,) = torch.autograd.grad(loss.sum(), a)
        return (a * grad).abs().mean(-2)
