"""The graph path: pruning any traceable model with Torch-Pruning's DependencyGraph.

Torch-Pruning (`torch_pruning`) traces a model on example inputs and groups the channels that must
go together: a convolution's output channels with the BatchNorm after it, the next layer's input
channels, both branches of a residual sum. This module registers pruners for the spectral layers
(`SPECTRAL_PRUNERS`, slicing phi, lam_in and lam_out), ships the eigenvalue criterion as a
Torch-Pruning `Importance` (`EigenImportance`), and prunes any model with it (`prune_graph`, reached
through `prune_nodes(model, keep, example_inputs=x)`). Layers are named by their module names.

What "removing" a channel means here: the channel is cut out of the network, i.e. every slice of
its group is removed (its rows in the producing layers, its BatchNorm entries, its columns in the
consuming layers). `mask_graph` builds the same-size reference with exactly those slices zeroed;
the pruned model computes what it computes. Groups that cannot be cut out exactly are left alone
and listed: channels that are model outputs, and channels normalised together with others
(LayerNorm, GroupNorm), mixed by attention, or read by a layer Torch-Pruning has no pruner for.
Unlike the chain path (`pruning.chain`), a removed node's constant output act(b_j) is not folded
into the next layer's bias.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops

from eigenprune.core.convert import despectralize
from eigenprune.core.io import first_line
from eigenprune.core.layers import PLAIN_LAYERS, SPECTRAL_LAYERS, SpectralModule, plain_names
from eigenprune.core.structure import input_tuple
from eigenprune.pruning.importance import node_importance, normalize
from eigenprune.pruning.keep import KeepLike, PruneError, check_finite, count_to_keep, parse_keep, top_k_mask

Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]
LayerRef = Union[nn.Module, str]


class SpectralPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning pruner for every spectral layer (`SPECTRAL_LAYERS`).

    Output channel o is phi[o], lam_out[o], bias[o]; input channel i is phi[:, i] and lam_in[i].
    Pass `SPECTRAL_PRUNERS` as `customized_pruners` to any Torch-Pruning pruner or DependencyGraph.
    """

    TARGET_MODULES = SPECTRAL_LAYERS

    @staticmethod
    def _keep(n: int, idxs: Sequence[int]) -> list[int]:
        drop = set(int(i) for i in idxs)
        return [i for i in range(n) if i not in drop]

    @staticmethod
    def _set(layer: nn.Module, name: str, value: torch.Tensor) -> None:
        old = getattr(layer, name)
        setattr(layer, name, nn.Parameter(value.contiguous(), old.requires_grad))

    def prune_out_channels(self, layer: SpectralModule, idxs: Sequence[int]) -> nn.Module:
        keep = self._keep(layer.phi.shape[0], idxs)
        self._set(layer, "phi", layer.phi.data[keep])
        self._set(layer, "lam_out", layer.lam_out.data[keep])
        if layer.bias is not None:
            self._set(layer, "bias", layer.bias.data[keep])
        setattr(layer, "out_features" if hasattr(layer, "out_features") else "out_channels", len(keep))
        return layer

    def prune_in_channels(self, layer: SpectralModule, idxs: Sequence[int]) -> nn.Module:
        keep = self._keep(layer.phi.shape[1], idxs)
        self._set(layer, "phi", layer.phi.data[:, keep])
        self._set(layer, "lam_in", layer.lam_in.data[keep])
        setattr(layer, "in_features" if hasattr(layer, "in_features") else "in_channels", len(keep))
        return layer

    def get_out_channels(self, layer: SpectralModule) -> int:
        return layer.phi.shape[0]

    def get_in_channels(self, layer: SpectralModule) -> int:
        return layer.phi.shape[1]


SPECTRAL_PRUNER = SpectralPruner()
SPECTRAL_PRUNERS: dict[type[nn.Module], tp.pruner.function.BasePruningFunc] = {cls: SPECTRAL_PRUNER for cls in SPECTRAL_LAYERS}
"""`customized_pruners` for Torch-Pruning: {spectral layer type: pruner}."""

ROOT_TYPES: tuple[type, ...] = (ops.TORCH_CONV, ops.TORCH_LINEAR, *SPECTRAL_LAYERS)
"""`root_module_types` for Torch-Pruning's pruners: its defaults plus the spectral layers (else they root no group)."""

_WEIGHTED = (*PLAIN_LAYERS, *SPECTRAL_LAYERS)
"""Layers whose output channels are ranked and whose slices `mask_graph` zeroes."""

_EXACT = (*_WEIGHTED, nn.modules.batchnorm._BatchNorm)
"""Layer types whose channels can be cut out exactly (the pruned model equals the masked one)."""


def _is_out(group, dep) -> bool:
    return group._DG.is_out_channel_pruning_fn(dep.handler)


class EigenImportance(tp.importance.Importance):
    """eigenprune's criterion as a Torch-Pruning `Importance`: the norm of each channel's incoming weights.

    For a channel produced by one layer it is `node_importance` of that layer (on a spectral layer with
    lam_in = 0, the paper's |lam_out_i| ||phi_i||); for channels that several layers produce together
    (a residual sum) it is the norm of all their incoming weights, sqrt(sum over layers of the squares).
    A BatchNorm right after a layer (its only consumer) is part of the channel's incoming weights: its scale
    gamma / sqrt(var + eps) multiplies them (otherwise the normalisation would hide how small a channel's weights are).
    Use it with any Torch-Pruning pruner, e.g. `tp.pruner.MetaPruner(model, x, importance=EigenImportance(),
    customized_pruners=SPECTRAL_PRUNERS, root_module_types=ROOT_TYPES)`.

    `side="out"` scores a channel by its outgoing weights instead: the norm of its columns in every layer that reads
    it (|lam_in_i| ||phi[:, i]|| on a layer gated on its inputs, lam_out = 0), which a BatchNorm after the reading
    layer does not cancel; `side="both"` multiplies the two norms. The default, "in", is the paper's criterion.
    """

    SIDES = ("in", "out", "both")

    def __init__(self, side: str = "in") -> None:
        if side not in self.SIDES:
            raise PruneError(f"EigenImportance side must be one of {', '.join(self.SIDES)}, got {side!r}")
        self.side = side

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor:
        if self.side == "in":
            return self._incoming(group)
        out = self._outgoing(group)
        if self.side == "out" or out is None:
            return out
        inc = self._incoming(group)
        return None if inc is None else inc * out

    @staticmethod
    def _outgoing(group) -> torch.Tensor | None:
        """Per channel, the norm of its columns in every ungrouped weighted layer that reads it."""
        total = None
        for item in group:
            layer = item.dep.target.module
            if not isinstance(layer, _WEIGHTED) or _is_out(group, item.dep) or getattr(layer, "groups", 1) != 1:
                continue
            w = layer.weight.detach().double()
            cols = w.transpose(0, 1).flatten(1).square().sum(1)[list(item.idxs)]
            if total is None:
                total = torch.zeros(len(group[0].idxs), dtype=torch.float64, device=cols.device)
            total.index_add_(0, torch.as_tensor(item.root_idxs, device=cols.device), cols)
        return None if total is None else total.sqrt()

    @staticmethod
    def _incoming(group) -> torch.Tensor | None:
        scale = {}  # a BatchNorm right after a layer multiplies its channel o by gamma_o / sqrt(var_o + eps)
        for item in group:
            bn = item.dep.target
            if not (isinstance(bn.module, nn.modules.batchnorm._BatchNorm) and bn.module.affine and len(bn.inputs) == 1):
                continue
            source = bn.inputs[0].module
            if isinstance(source, _WEIGHTED) and len(bn.inputs[0].outputs) == 1:  # the layer feeds only this BatchNorm
                m = bn.module
                factor = m.weight.abs() / (m.running_var + m.eps).sqrt() if m.running_var is not None else m.weight.abs()
                scale[id(source)] = factor.double()
        total = None
        for item in group:
            dep, idxs = item.dep, item.idxs
            layer = dep.target.module
            if not (isinstance(layer, _WEIGHTED) and _is_out(group, dep)):
                continue
            scores = node_importance(layer).double()
            if id(layer) in scale:
                scores = scores * scale[id(layer)].to(scores.device)
            scores = scores[list(idxs)].square()
            if total is None:
                total = torch.zeros(len(group[0].idxs), dtype=torch.float64, device=scores.device)
            total.index_add_(0, torch.as_tensor(item.root_idxs, device=scores.device), scores)
        return None if total is None else total.sqrt()


@dataclass
class ChannelPlan:
    """Which channels of which groups to keep, decided on the unpruned model.

    `kept`: root layer name -> sorted kept output-channel indices; `widths`: root layer name -> its
    width; `members`: every layer producing a group's channels (e.g. both convolutions of a residual
    sum) -> the group's root layer name; `left_alone`: name -> why its channels are not pruned;
    `scores`: root layer name -> the importance of each of its channels.
    """

    kept: dict[str, torch.Tensor] = field(default_factory=dict)
    widths: dict[str, int] = field(default_factory=dict)
    members: dict[str, str] = field(default_factory=dict)
    left_alone: dict[str, str] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{name}: keep {len(idx)} of {self.widths[name]}" for name, idx in self.kept.items()]
        lines += [f"{name}: left alone ({why})" for name, why in self.left_alone.items()]
        return "\n".join(lines)


def _shapes(inputs: tuple[torch.Tensor, ...]) -> str:
    return ", ".join(str(list(t.shape)) for t in inputs)


def _check_forward(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """One line naming the model and the inputs if `model(*inputs)` fails or has no autograd graph."""
    name = type(model).__name__
    training = model.training
    calls: dict[str, int] = {}
    weighted = [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: calls.__setitem__(n, calls.get(n, 0) + 1)) for n, m in weighted]
    try:
        with torch.enable_grad():
            out = model.eval()(*inputs)  # eval: a check must not move BatchNorm statistics
    except Exception as err:  # noqa: BLE001 - any failure means these inputs do not fit this model
        raise PruneError(f"example_inputs of shape {_shapes(inputs)} do not fit {name}: {type(err).__name__}: {first_line(err)}") from None
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    shared = [(n, k) for n, k in calls.items() if k > 1]
    if shared:
        raise PruneError(f"cannot prune {name}: its layer {shared[0][0]} is called {shared[0][1]} times in one forward pass (a shared "
                         "layer), and one set of channels cannot fit every place it is used; give each use a layer of its own")
    tensors = [t for t in tp.utils.flatten_as_list(out) if isinstance(t, torch.Tensor)]
    if not tensors or all(t.grad_fn is None for t in tensors):
        raise PruneError(f"cannot trace {name}: its output on example_inputs has no autograd graph "
                         "(forward runs under no_grad or returns no tensor), so Torch-Pruning cannot follow it")


def _resolve(model: nn.Module, refs: Sequence[LayerRef] | None, names_of_original: dict[int, str]) -> set[str]:
    """Layer names for `ignored_layers` entries given as modules (of the original model) or names."""
    out = set()
    valid = dict(model.named_modules())
    for ref in refs or ():
        name = ref if isinstance(ref, str) else names_of_original.get(id(ref))
        if name is None or name not in valid:
            raise PruneError(f"ignored_layers entry {ref if isinstance(ref, str) else type(ref).__name__!r} is not a module of "
                             f"{type(model).__name__}; give modules of the model or their names (e.g. {next(iter(valid), '')!r})")
        out.add(name)
    return out


def _unsupported_modules(model: nn.Module, dg: tp.DependencyGraph) -> list[tuple[str, nn.Module]]:
    """Modules with parameters of their own that no registered or customised pruner handles."""
    bad = []
    for name, m in model.named_modules():
        if not any(True for _ in m.parameters(recurse=False)):
            continue
        if isinstance(m, nn.MultiheadAttention) or type(m) in dg.CUSTOMIZED_PRUNERS:
            continue
        if dg.get_pruner_of_module(m) is None or ops.module2type(m) == ops.OPTYPE.ELEMENTWISE:
            bad.append((name, m))
    return bad


def _build(model: nn.Module, inputs: tuple[torch.Tensor, ...], ignored: set[str] | None) -> tp.DependencyGraph:
    """The dependency graph of `model`; refuses modules no pruner handles unless under `ignored` (None: no check)."""
    _check_forward(model, inputs)
    dg = tp.DependencyGraph()
    for cls, pruner in SPECTRAL_PRUNERS.items():
        dg.register_customized_layer(cls, pruner)
    bad = [] if ignored is None else [
        (n, m) for n, m in _unsupported_modules(model, dg) if not any(n == i or n.startswith(i + ".") for i in ignored)]
    if bad:
        name, m = bad[0]
        raise PruneError(f"cannot prune through {name} ({type(m).__name__}): Torch-Pruning has no pruner for it; supported: "
                         "Linear, Conv, BatchNorm, LayerNorm, MultiheadAttention, spectral layers and parameter-free operations; "
                         "pass it in ignored_layers to leave its channels alone")
    try:
        return dg.build_dependency(model, example_inputs=inputs, customized_pruners=SPECTRAL_PRUNERS, verbose=False)
    except Exception as err:  # noqa: BLE001 - Torch-Pruning raises many kinds; all mean "cannot trace"
        raise PruneError(f"Torch-Pruning could not trace {type(model).__name__}: {type(err).__name__}: {err}") from None


def _groups(model: nn.Module, dg: tp.DependencyGraph, ignored: set[str], plan: ChannelPlan) -> dict[str, object]:
    """Prunable groups by root layer name; the others go to plan.left_alone with the reason."""
    names = {id(m): n for n, m in model.named_modules()}
    names.update({id(p): n for n, p in model.named_parameters()})
    attention = [n + "." for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name, m in model.named_modules():
        if isinstance(m, _WEIGHTED) and m not in dg.module2node:
            inside = next((a[:-1] for a in attention if name.startswith(a)), None)
            plan.left_alone[name] = (f"MultiheadAttention {inside} reads its weight directly, never calling its forward"
                                     if inside is not None else "not reached by the forward pass on example_inputs")
    groups = {}
    for group in dg.get_all_groups(root_module_types=ROOT_TYPES):
        root = group[0].dep.target.module
        rname = names[id(root)]
        why = None
        for item in group:
            target = item.dep.target
            mod = target.module
            mname = names.get(id(mod), repr(mod))
            other = "it is" if mod is root else f"it shares channels with {mname}, which is"
            if isinstance(mod, ops._OutputOp) or (not target.outputs and _is_out(group, item.dep)):
                why = "its channels are model outputs"
            elif _is_out(group, item.dep) and any(mname == i or mname.startswith(i + ".") for i in ignored):
                why = f"{other} in ignored_layers"
            elif isinstance(mod, PLAIN_LAYERS) and getattr(mod, "groups", 1) != 1:
                why = f"{other} a grouped convolution (groups={mod.groups})"
            elif not (isinstance(mod, _EXACT) or type(mod).__module__ == ops.__name__):
                why = (f"{other} a {type(mod).__name__}, which cannot lose channels exactly (exact: {plain_names()}, "
                       "BatchNorm, their spectral forms and parameter-free operations)")
            if why:
                break
        if why:
            plan.left_alone[rname] = why
            for item in group:
                if isinstance(item.dep.target.module, _WEIGHTED) and _is_out(group, item.dep):
                    plan.left_alone.setdefault(names[id(item.dep.target.module)], why)
        else:
            groups[rname] = group
            plan.widths[rname] = len(group[0].idxs)
            for item in group:
                if isinstance(item.dep.target.module, _WEIGHTED) and _is_out(group, item.dep):
                    plan.members[names[id(item.dep.target.module)]] = rname
    return groups


def select_channels(
    model: nn.Module, keep: KeepLike | dict[str, KeepLike], example_inputs: Inputs, *,
    importance: tp.importance.Importance | None = None, global_ranking: bool = False,
    ignored_layers: Sequence[LayerRef] | None = None,
) -> ChannelPlan:
    """Which output channels of each prunable group to keep (`model` is not modified).

    `importance`: any Torch-Pruning `Importance` (default `EigenImportance`; gradient-based ones such as
    `TaylorImportance` read the gradients already in `model`'s parameters). The scores are kept in
    the plan (`plan.scores`), so `choose_channels(plan, other_keep)` re-decides without re-scoring.
    `keep` and `global_ranking`: see `choose_channels`.
    """
    scripted = next((n for n, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)), None)
    if scripted is not None:
        raise PruneError(f"cannot prune {type(model).__name__}: {scripted or 'the model'} is a TorchScript module (torch.jit.script "
                         "or trace), which Torch-Pruning can neither trace nor cut; prune the Python module, then script it")
    work = copy.deepcopy(model)
    for p, q in zip(model.parameters(), work.parameters()):  # gradient-based importances (Taylor) read .grad
        if p.grad is not None:
            q.grad = p.grad.detach().clone()
    inputs = input_tuple(example_inputs, PruneError)
    check_finite(model, *inputs)  # a diverged model (or NaN inputs) would rank garbage
    names_of_original = {id(m): n for n, m in model.named_modules()}
    ignored = _resolve(work, ignored_layers, names_of_original)
    dg = _build(work, inputs, ignored)
    plan = ChannelPlan()
    groups = _groups(work, dg, ignored, plan)
    if not groups:
        raise PruneError(f"{type(model).__name__} has no channels that can be pruned: " +
                         "; ".join(f"{n}: {w}" for n, w in plan.left_alone.items()))
    importance = importance or EigenImportance()
    for name, group in groups.items():
        s = importance(group)
        if s is None:
            raise PruneError(f"the importance {type(importance).__name__} gives no scores for the group of {name}")
        plan.scores[name] = s.detach().flatten().double().cpu()
    return choose_channels(plan, keep, global_ranking=global_ranking)


def choose_channels(plan: ChannelPlan, keep: KeepLike | dict[str, KeepLike], *, global_ranking: bool = False) -> ChannelPlan:
    """A plan with the same groups and scores as `plan` keeping, by score, the channels `keep` asks for.

    `keep`: a count per group (int), a fraction (float or '10%'), a threshold '>t' on each group's
    score normalised by its maximum, or a dict {layer name: keep} (other groups untouched; any layer
    producing a group's channels names the group). With `global_ranking`, a count or a fraction is
    of all prunable channels together, ranked by score normalised by each group's maximum (each group
    keeps at least its top channel).
    """
    scores = plan.scores
    new = ChannelPlan(widths=dict(plan.widths), members=dict(plan.members), left_alone=dict(plan.left_alone), scores=scores)
    if isinstance(keep, dict):
        if global_ranking:
            raise PruneError("global_ranking ranks all groups together: give one keep value, not a per-layer dict")
        specs = {}
        for name, value in keep.items():
            if name not in plan.members:
                valid = ", ".join(plan.members) or "none"
                why = f" ({plan.left_alone[name]})" if name in plan.left_alone else ""
                raise PruneError(f"keep names {name!r}, which is not a prunable layer{why}; prunable: {valid}")
            if plan.members[name] in specs:
                raise PruneError(f"keep names two layers of one channel group ({plan.members[name]}): give one value")
            specs[plan.members[name]] = parse_keep(value)
    else:
        spec = parse_keep(keep)
        specs = {name: spec for name in scores}
    if global_ranking and spec.kind in ("count", "fraction"):
        flat = torch.cat([normalize(scores[n]) for n in specs])
        total = sum(new.widths[n] for n in specs)
        wanted = int(spec.value) if spec.kind == "count" else math.ceil(spec.value * total - 1e-9)
        if not len(specs) <= wanted <= total:
            raise PruneError(f"global keep={wanted} must be between the number of groups {len(specs)} and the "
                             f"number of prunable channels {total}")
        top = torch.cat([top_k_mask(scores[n], 1) for n in specs]).bool()  # each group's top channel first
        chosen = top_k_mask(torch.where(top, torch.full_like(flat, math.inf), flat), wanted).bool()
        start = 0
        for name in specs:
            n = scores[name].numel()
            new.kept[name] = chosen[start : start + n].nonzero().flatten()
            start += n
        return new
    for name, spec in specs.items():
        k = count_to_keep(spec, scores[name], name)
        new.kept[name] = top_k_mask(scores[name], k).nonzero().flatten()
    return new


@torch.no_grad()
def _zero(layer: nn.Module, idxs: list[int], out: bool) -> None:
    if isinstance(layer, SpectralModule):
        if out:
            layer.phi[idxs] = 0
        else:
            layer.phi[:, idxs] = 0
    elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
        if layer.affine:
            layer.weight[idxs] = 0
    elif out:
        layer.weight[idxs] = 0
    else:
        layer.weight[:, idxs] = 0
    if out and getattr(layer, "bias", None) is not None:
        layer.bias[idxs] = 0


def _apply(model: nn.Module, plan: ChannelPlan, inputs: tuple[torch.Tensor, ...], mask: bool) -> nn.Module:
    training = model.training
    dg = _build(model, inputs, None)
    modules = dict(model.named_modules())
    for name, kept in plan.kept.items():
        root = modules[name]
        width = dg.get_pruner_of_module(root).get_out_channels(root)
        if width != plan.widths[name]:
            raise PruneError(f"{name} has {width} channels, the plan was made for {plan.widths[name]}")
        drop = sorted(set(range(width)) - set(kept.tolist()))
        if not drop:
            continue
        group = dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, drop)
        if mask:
            for item in group:
                if isinstance(item.dep.target.module, _EXACT):
                    _zero(item.dep.target.module, list(item.idxs), _is_out(group, item.dep))
        else:
            group.prune()
    model.train(training)  # Torch-Pruning's tracing switches to eval mode
    return model


def mask_graph(model: nn.Module, plan: ChannelPlan, example_inputs: Inputs) -> nn.Module:
    """A same-size copy of `model` with every slice that `prune_graph` would remove set to zero (the reference)."""
    work = copy.deepcopy(model)
    return _apply(work, plan, input_tuple(example_inputs, PruneError), mask=True)


def prune_graph(
    model: nn.Module, keep: KeepLike | dict[str, KeepLike] | ChannelPlan, example_inputs: Inputs, *,
    importance: tp.importance.Importance | None = None, global_ranking: bool = False,
    ignored_layers: Sequence[LayerRef] | None = None, keep_spectral: bool = False, inplace: bool = False,
) -> nn.Module:
    """A physically smaller `model` with only the important channels of each prunable group.

    `keep` and the options as in `select_channels` (or a `ChannelPlan` it returned). Spectral layers
    are sliced by `SPECTRAL_PRUNERS`; with `keep_spectral` they stay spectral (train on after pruning),
    otherwise the result has plain `nn.Linear`/`nn.Conv*` layers. `model` is left unchanged unless
    `inplace`. The result computes what `mask_graph(model, plan, example_inputs)` computes.
    """
    plan = keep if isinstance(keep, ChannelPlan) else select_channels(
        model, keep, example_inputs, importance=importance, global_ranking=global_ranking, ignored_layers=ignored_layers)
    work = model if inplace else copy.deepcopy(model)
    _apply(work, plan, input_tuple(example_inputs, PruneError), mask=False)
    return work if keep_spectral else despectralize(work)
