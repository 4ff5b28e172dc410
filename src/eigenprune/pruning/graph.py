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
the pruned model computes what it computes. Depthwise convolutions go with their input's channels,
and bare parameters (a layer scale, a class token) are sliced with their channels, as Torch-Pruning does.
Channels split into equal blocks (the groups of a grouped convolution, attention heads, GroupNorm groups)
lose the same positions in every block. Groups that cannot be cut out exactly are left alone and listed:
channels that are model outputs or meet a model input, and channels normalised together with others
(LayerNorm, GroupNorm, RMSNorm), mixed by nn.MultiheadAttention, split into attention heads of unknown
count, shuffled by a reshape, or read by a layer or parameter that cannot lose them exactly. With
`exact=False` the groups through norms and nn.MultiheadAttention are pruned too (the network without those
channels, each norm recomputed over the kept ones: not the masked model, so `mask_graph` refuses such a plan).
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
from torch.overrides import TorchFunctionMode
from torch_pruning import ops

from eigenprune.core.convert import despectralize
from eigenprune.core.io import first_line
from eigenprune.core.layers import DEPTHWISE_LAYERS, PLAIN_LAYERS, SPECTRAL_LAYERS, SpectralLinear, SpectralModule, plain_names
from eigenprune.core.structure import input_tuple
from eigenprune.pruning.importance import node_importance, normalize
from eigenprune.pruning.keep import KeepLike, KeepSpec, PruneError, check_finite, count_to_keep, parse_keep, top_k_mask

Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]
LayerRef = Union[nn.Module, str]


def _even_per_group(layer: SpectralModule, n: int, idxs: Sequence[int], what: str) -> list[list[int]]:
    """The kept indices within each of `layer`'s groups (of n // groups channels) when `idxs` (of n) go; a PruneError
    unless every group loses as many as the others (else the groups would differ in size, which a convolution cannot)."""
    groups = layer.groups
    size = n // groups
    drop = set(int(i) for i in idxs)
    kept = [[j for j in range(size) if g * size + j not in drop] for g in range(groups)]
    if len({len(k) for k in kept}) > 1:
        lost = [size - len(k) for k in kept]
        raise PruneError(f"cannot remove {what} channels {sorted(drop)} of {type(layer).__name__} with groups={groups} "
                         f"({size} per group): every group must lose as many as the others, they would lose {lost}")
    return kept


class SpectralPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning pruner for every spectral layer (`SPECTRAL_LAYERS`) but the depthwise convolutions.

    Output channel o is phi[o], lam_out[o], bias[o]; input channel i is lam_in[i] and phi[:, i], or in a grouped
    convolution (groups > 1) phi[o, j] for the outputs o of its group g, i = g * in / groups + j. A grouped
    convolution must lose as many channels in each group as in the others (Torch-Pruning's pruners ask for that
    through `get_in_channel_groups`/`get_out_channel_groups`, as for a grouped `nn.Conv2d`); a PruneError otherwise.
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
        _even_per_group(layer, layer.phi.shape[0], idxs, "output")
        keep = self._keep(layer.phi.shape[0], idxs)
        self._set(layer, "phi", layer.phi.data[keep])
        self._set(layer, "lam_out", layer.lam_out.data[keep])
        if layer.bias is not None:
            self._set(layer, "bias", layer.bias.data[keep])
        setattr(layer, "out_features" if hasattr(layer, "out_features") else "out_channels", len(keep))
        return layer

    def prune_in_channels(self, layer: SpectralModule, idxs: Sequence[int]) -> nn.Module:
        kept = _even_per_group(layer, layer.lam_in.shape[0], idxs, "input")
        rows = layer.phi.shape[0] // layer.groups  # output channels per group
        self._set(layer, "phi", torch.cat([layer.phi.data[g * rows : (g + 1) * rows][:, k] for g, k in enumerate(kept)]))
        self._set(layer, "lam_in", layer.lam_in.data[self._keep(layer.lam_in.shape[0], idxs)])
        setattr(layer, "in_features" if hasattr(layer, "in_features") else "in_channels", layer.lam_in.shape[0])
        return layer

    def get_out_channels(self, layer: SpectralModule) -> int:
        return layer.phi.shape[0]

    def get_in_channels(self, layer: SpectralModule) -> int:
        return layer.lam_in.shape[0]

    def get_in_channel_groups(self, layer: SpectralModule) -> int:
        return layer.groups

    def get_out_channel_groups(self, layer: SpectralModule) -> int:
        return layer.groups


class SpectralDepthwisePruner(SpectralPruner):
    """Torch-Pruning pruner for the depthwise spectral convolutions (`DEPTHWISE_LAYERS`), as its `DepthwiseConvPruner`
    for a depthwise `nn.Conv2d`: channel c is input and output at once (phi[c], lam_in[c], lam_out[c], bias[c]), so
    pruning one prunes the other (`prune_in_channels` is `prune_out_channels`: Torch-Pruning's sign of an intra-layer
    dependency) and groups shrinks with the channels. Channel groups 1: every channel is a group of its own."""

    TARGET_MODULES = DEPTHWISE_LAYERS

    def prune_out_channels(self, layer: SpectralModule, idxs: Sequence[int]) -> nn.Module:
        keep = self._keep(layer.phi.shape[0], idxs)
        for name in ("phi", "lam_in", "lam_out", *(["bias"] if layer.bias is not None else [])):
            self._set(layer, name, getattr(layer, name).data[keep])
        layer.in_channels = layer.out_channels = layer.groups = len(keep)
        return layer

    prune_in_channels = prune_out_channels

    def get_in_channel_groups(self, layer: SpectralModule) -> int:
        return 1

    def get_out_channel_groups(self, layer: SpectralModule) -> int:
        return 1


SPECTRAL_PRUNER = SpectralPruner()
SPECTRAL_DEPTHWISE_PRUNER = SpectralDepthwisePruner()
SPECTRAL_PRUNERS: dict[type[nn.Module], tp.pruner.function.BasePruningFunc] = {
    **{cls: SPECTRAL_PRUNER for cls in SPECTRAL_LAYERS}, **{cls: SPECTRAL_DEPTHWISE_PRUNER for cls in DEPTHWISE_LAYERS}}
"""`customized_pruners` for Torch-Pruning: {spectral layer type: pruner} (Torch-Pruning picks a pruner by exact type)."""


class RMSNormPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning pruner for RMSNorm-style modules (`is_rmsnorm`): channel c is weight[c] (and bias[c])."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = SpectralPruner._keep(layer.weight.shape[0], idxs)
        for name in ("weight", "bias"):
            if getattr(layer, name, None) is not None:
                SpectralPruner._set(layer, name, getattr(layer, name).data[keep])
        if isinstance(getattr(layer, "normalized_shape", None), tuple):  # torch.nn.RMSNorm
            layer.normalized_shape = (*layer.normalized_shape[:-1], len(keep))
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[0]

    get_in_channels = get_out_channels


RMSNORM_PRUNER = RMSNormPruner()


def is_rmsnorm(m: nn.Module) -> bool:
    """An RMSNorm-style module: its class name ends in RMSNorm (torch.nn.RMSNorm, HF LlamaRMSNorm, your own)
    and its parameters of its own are a 1-D `weight` (and optionally a 1-D `bias`), one entry per channel."""
    own = dict(m.named_parameters(recurse=False))
    return (type(m).__name__.lower().endswith("rmsnorm") and isinstance(own.get("weight"), torch.Tensor)
            and set(own) <= {"weight", "bias"} and all(p.dim() == 1 and p.shape == own["weight"].shape for p in own.values()))


ROOT_TYPES: tuple[type, ...] = (ops.TORCH_CONV, ops.TORCH_LINEAR, *SPECTRAL_LAYERS)
"""`root_module_types` for Torch-Pruning's pruners: its defaults plus the spectral layers (else they root no group)."""

_WEIGHTED = (*PLAIN_LAYERS, *SPECTRAL_LAYERS)
"""Layers whose output channels are ranked and whose slices `mask_graph` zeroes."""

_EXACT = (*_WEIGHTED, nn.modules.batchnorm._BatchNorm)
"""Layer types whose channels can be cut out exactly (the pruned model equals the masked one)."""


_MATMULS = ("BmmBackward0", "BaddbmmBackward0")
"""Torch-Pruning ops that contract channels with channels (q @ k^T, attn @ v of 3-D or 4-D tensors): channels there
are split into heads. (MmBackward0 is left out: Torch-Pruning shows a bias-free Linear's own product as one.)"""


def _attention_op(mod: nn.Module) -> str | None:
    """"sdpa" for an F.scaled_dot_product_attention call, "matmul" for a product of channels with channels
    (`_MATMULS`), else None (Torch-Pruning's element-wise ops carry their autograd node's name)."""
    if not isinstance(mod, ops._ElementWiseOp):
        return None
    if "ScaledDotProduct" in str(mod._grad_fn):
        return "sdpa"
    return "matmul" if str(mod._grad_fn) in _MATMULS else None


def _is_out(group, dep) -> bool:
    return group._DG.is_out_channel_pruning_fn(dep.handler)


def _is_depthwise(layer: nn.Module) -> bool:
    """A depthwise convolution (groups = in = out channels > 1, plain or spectral): each channel has its own kernel."""
    groups = getattr(layer, "groups", 1)
    return groups > 1 and groups == getattr(layer, "in_channels", 0) == getattr(layer, "out_channels", 0)


def _conv_groups(layer: nn.Module) -> int:
    """Into how many equal blocks a grouped (not depthwise) convolution splits its channels (1 for any other layer)."""
    groups = getattr(layer, "groups", 1) if isinstance(layer, _WEIGHTED) else 1
    return groups if groups > 1 and groups != layer.out_channels else 1


def _inexact_kind(mod: nn.Module) -> str | None:
    """What `exact=False` lets a group pass through (a norm or attention), else None."""
    if isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.MultiheadAttention)) or is_rmsnorm(mod):
        return type(mod).__name__
    if _attention_op(mod) == "sdpa":
        return "scaled_dot_product_attention"
    return None


def _blocks(modules: dict[str, nn.Module], names: dict[int, str], group, exact: bool) -> tuple[int, str | None]:
    """(blocks, why not): into how many equal blocks the group's channels are split, each of which must keep the same
    positions: the lcm of its attention heads, GroupNorm groups and grouped convolutions' groups; or why the group
    cannot be cut: heads of unknown count, or (when `exact`) F.scaled_dot_product_attention, whose default scale
    1/sqrt(head width) changes with the cut."""
    counts, heads, matmul, mha, stacked = set(), set(), None, False, 1
    for item in group:
        mod = item.dep.target.module
        if (conv_groups := _conv_groups(mod)) > 1:
            counts.add(conv_groups)
        if isinstance(mod, nn.MultiheadAttention):  # its products (traced inside it) are head-split by its own num_heads
            counts.add(mod.num_heads)
            mha = True
        elif isinstance(mod, nn.GroupNorm):
            counts.add(mod.num_groups)
        elif _attention_op(mod) == "sdpa":
            if exact:
                return 1, ("its channels pass through scaled_dot_product_attention, whose scale 1/sqrt(head width) "
                           "changes when they are cut (exact=False prunes them)")
            matmul = str(mod._grad_fn)
        elif _attention_op(mod) == "matmul":
            matmul = str(mod._grad_fn)
        elif isinstance(mod, ops._UnbindOp) and mod.offsets:  # a fused qkv projection: q, k, v stacked, each split in heads
            stacked = max(stacked, len(mod.offsets) - 1)
        elif isinstance(mod, _WEIGHTED) and _is_out(group, item.dep):
            parent = modules.get(names[id(mod)].rpartition(".")[0])
            n = getattr(parent, "num_heads", None)
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                heads.add(n)
    if matmul is not None and not mha:  # the producers' heads split these channels (they meet in q @ k^T or attn @ v)
        if not heads:
            return 1, ("its channels meet other channels in a matrix product (attention) and the number of heads is unknown: "
                       "give the module holding its projections an int attribute num_heads")
        counts |= {h * stacked for h in heads}
    blocks = math.lcm(*counts) if counts else 1
    if len(group[0].idxs) % blocks:
        return 1, (f"its {len(group[0].idxs)} channels are split into {sorted(counts)} heads or groups (of attention, "
                   "GroupNorm or grouped convolutions), which no cut keeps equal")
    return blocks, None


def _attends(group) -> bool:
    """Whether the group's channels are split into attention heads (nn.MultiheadAttention, a batched matrix product or
    scaled_dot_product_attention): a reshape that splits them is then the split into heads, which `_blocks` follows."""
    return any(isinstance(m, nn.MultiheadAttention) or _attention_op(m) is not None for m in (i.dep.target.module for i in group))


class EigenImportance(tp.importance.Importance):
    """eigenprune's criterion as a Torch-Pruning `Importance`: the norm of each channel's incoming weights.

    For a channel produced by one layer it is `node_importance` of that layer (on a spectral layer with
    lam_in = 0, the paper's |lam_out_i| ||phi_i||); for channels that several layers produce together
    (a residual sum) it is the norm of all their incoming weights, sqrt(sum over layers of the squares).
    A BatchNorm right after a layer (its only consumer) is part of the channel's incoming weights: its scale
    gamma / sqrt(var + eps) multiplies them (otherwise the normalisation would hide how small a channel's weights are).
    A depthwise convolution in the group maps each channel on by its own kernel, so the norm of the channel's weights
    from the group's inputs to the depthwise output is the product: the score is multiplied by the kernel's norm
    (times its BatchNorm's scale).
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
        total = factor = None
        for item in group:
            dep, idxs = item.dep, item.idxs
            layer = dep.target.module
            if not (isinstance(layer, _WEIGHTED) and _is_out(group, dep)):
                continue
            scores = node_importance(layer).double()
            if id(layer) in scale:
                scores = scores * scale[id(layer)].to(scores.device)
            root = torch.as_tensor(item.root_idxs, device=scores.device)
            if _is_depthwise(layer):
                factor = torch.ones(len(group[0].idxs), dtype=torch.float64, device=scores.device) if factor is None else factor
                factor[root] = factor[root] * scores[list(idxs)]
                continue
            if total is None:
                total = torch.zeros(len(group[0].idxs), dtype=torch.float64, device=scores.device)
            total.index_add_(0, root, scores[list(idxs)].square())
        if total is None:
            return factor
        return total.sqrt() if factor is None else total.sqrt() * factor


@dataclass
class ChannelPlan:
    """Which channels of which groups to keep, decided on the unpruned model.

    `kept`: root layer name -> sorted kept output-channel indices; `widths`: root layer name -> its
    width; `members`: every layer producing a group's channels (e.g. both convolutions of a residual
    sum) -> the group's root layer name; `left_alone`: name -> why its channels are not pruned;
    `scores`: root layer name -> the importance of each of its channels, or with blocks of each position;
    `blocks`: root layer name -> into how many equal blocks its channels are split (the lcm of its
    attention heads, GroupNorm groups and grouped convolutions' groups; absent: 1): every block keeps the
    same positions, and `scores` holds one score per position (the norm over the blocks); `inexact`: root
    layer name -> the norms and attention its group passes through (only with exact=False: cutting it is
    not masking it); `unwrapped`: the bare parameters cut with the channels they scale or shift, {name: dim}.
    """

    kept: dict[str, torch.Tensor] = field(default_factory=dict)
    widths: dict[str, int] = field(default_factory=dict)
    members: dict[str, str] = field(default_factory=dict)
    left_alone: dict[str, str] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    blocks: dict[str, int] = field(default_factory=dict)
    inexact: dict[str, str] = field(default_factory=dict)
    unwrapped: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{name}: keep {len(idx)} of {self.widths[name]}" + (f" (not exact: through {self.inexact[name]})"
                 if name in self.inexact else "") for name, idx in self.kept.items()]
        lines += [f"{name}: left alone ({why})" for name, why in self.left_alone.items()]
        return "\n".join(lines)


def _shapes(inputs: tuple[torch.Tensor, ...]) -> str:
    return ", ".join(str(list(t.shape)) for t in inputs)


def _checked_forward(inputs: tuple[torch.Tensor, ...]):
    """The `forward_fn` for Torch-Pruning's trace, so that the one traced forward also runs eigenprune's checks.

    In this order, each one line naming the model: `model(*inputs)` fails; a layer with parameters is called more
    than once (a shared layer); the output has no autograd graph. Torch-Pruning calls it in eval mode (a check must
    not move BatchNorm statistics).
    """
    def forward(model: nn.Module, _inputs: object) -> object:
        name = type(model).__name__
        calls: dict[str, int] = {}
        weighted = [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
        handles = [m.register_forward_pre_hook(lambda mod, args, n=n: calls.__setitem__(n, calls.get(n, 0) + 1)) for n, m in weighted]
        try:
            out = model(*inputs)
        except Exception as err:  # noqa: BLE001 - any failure means these inputs do not fit this model
            raise PruneError(f"example_inputs of shape {_shapes(inputs)} do not fit {name}: "
                             f"{type(err).__name__}: {first_line(err)}") from None
        finally:
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
        return out
    return forward


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


def _leaves(obj) -> list:
    """The tensors (and other leaves) inside nested tuples, lists and dicts."""
    if isinstance(obj, (tuple, list)):
        return [leaf for o in obj for leaf in _leaves(o)]
    if isinstance(obj, dict):
        return [leaf for o in obj.values() for leaf in _leaves(o)]
    return [obj]


class _TraceLog(TorchFunctionMode):
    """What Torch-Pruning's trace cannot see, recorded during its forward pass by the grad_fn of each result:
    `reshapes`, the input and output shapes of every view/reshape/flatten; `reads_input`, the operations that
    combine a model input (or a tensor computed from the inputs alone, which has no autograd graph) with others."""

    RESHAPES = frozenset({"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"})

    def __init__(self, inputs: tuple[torch.Tensor, ...]):
        super().__init__()
        self.reshapes: dict[object, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.reads_input: set[object] = set()
        self._derived = list(inputs)  # kept alive, so that their ids stay theirs
        self._ids = {id(t) for t in inputs}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = _leaves((args, kwargs))
        if any(isinstance(a, torch.Tensor) and id(a) in self._ids for a in leaves):
            for o in _leaves(out):
                if isinstance(o, torch.Tensor) and o.grad_fn is None:
                    self._derived.append(o)
                    self._ids.add(id(o))
                elif isinstance(o, torch.Tensor):
                    self.reads_input.add(o.grad_fn)
        if getattr(func, "__name__", "") in self.RESHAPES and isinstance(out, torch.Tensor) and out.grad_fn is not None \
                and args and isinstance(args[0], torch.Tensor):
            self.reshapes[out.grad_fn] = (tuple(args[0].shape), tuple(out.shape))
        return out


class _Graph(tp.DependencyGraph):
    """Torch-Pruning's DependencyGraph, told (as it tells itself for nn.Linear) when a spectral linear layer sees
    [batch, tokens, features] inputs: it then does not mistake token-flattening reshapes for channel ones."""

    def _trace(self, model, *args, **kwargs):
        dims: list[int] = []
        hooks = [m.register_forward_hook(lambda mod, inp, out: dims.append(out.dim())) for m in model.modules()
                 if isinstance(m, SpectralLinear)]
        try:
            traced = super()._trace(model, *args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        if 3 in dims:
            self._2d_4d = False
        return traced


def _unwrapped(model: nn.Module, refs: Sequence[tuple[object, int]] | None, names_of_original: dict[int, str]) -> dict[str, int]:
    """{parameter name: pruning dim} for `unwrapped_parameters` entries (parameter of the original model, or its name; dim)."""
    params = dict(model.named_parameters())
    out = {}
    for entry in refs or ():
        ref, dim = entry if isinstance(entry, (tuple, list)) and len(entry) == 2 else (entry, None)
        name = ref if isinstance(ref, str) else names_of_original.get(id(ref))
        if name not in params:
            raise PruneError(f"unwrapped_parameters entry {ref if isinstance(ref, str) else type(ref).__name__!r} is not a parameter of "
                             f"{type(model).__name__}; give (parameter or its name, dim) pairs, e.g. ({next(iter(params), '')!r}, 0)")
        if not isinstance(dim, int) or not -params[name].dim() <= dim < params[name].dim():
            raise PruneError(f"unwrapped_parameters: the dim of {name} must be an int in {-params[name].dim()}..{params[name].dim() - 1} "
                             f"(its shape is {list(params[name].shape)}); got {dim!r}")
        out[name] = dim % params[name].dim()
    return out


def _build(model: nn.Module, inputs: tuple[torch.Tensor, ...], unwrapped: dict[str, int] | None = None) -> tp.DependencyGraph:
    """The dependency graph of `model`, from one traced forward that also runs `_checked_forward`'s checks.

    Parameters used outside a layer Torch-Pruning knows (a layer scale, a class token) are its "unwrapped parameters":
    those in `unwrapped` ({name: dim}) are cut along that dim, the others along their last dimension longer than 1.
    The graph also keeps what `_TraceLog` saw (`dg.reads_input`, to find channels tied to a model input, and
    `dg.reshapes`, to find reshapes that split channels). `model`'s train/eval mode is restored, also when a check fails.
    """
    dg = _Graph()
    customized = {**SPECTRAL_PRUNERS, **{type(m): RMSNORM_PRUNER for m in model.modules() if is_rmsnorm(m)}}
    for cls, pruner in customized.items():
        dg.register_customized_layer(cls, pruner)
    params = dict(model.named_parameters())
    pairs = [(params[n], d) for n, d in (unwrapped or {}).items()]
    log = _TraceLog(inputs)
    training = model.training
    try:
        with torch.enable_grad(), log:  # Torch-Pruning follows the autograd graph
            dg.build_dependency(model, example_inputs=inputs, forward_fn=_checked_forward(inputs), customized_pruners=customized,
                                unwrapped_parameters=pairs, verbose=False)
    except PruneError:
        raise
    except Exception as err:  # noqa: BLE001 - Torch-Pruning raises many kinds; all mean "cannot trace"
        raise PruneError(f"Torch-Pruning could not trace {type(model).__name__}: {type(err).__name__}: {err}") from None
    finally:
        model.train(training)  # Torch-Pruning's tracing switches to eval mode
    dg.reads_input, dg.reshapes = log.reads_input, log.reshapes
    return dg


_PARAM_OPS = frozenset({"MulBackward0", "AddBackward0", "SubBackward0", "CatBackward0"})
"""Operations through which a bare parameter's slice can be cut exactly: it scales, shifts or is concatenated to the channels."""


def _op(node) -> str:
    return type(node.grad_fn).__name__ if node.grad_fn is not None else type(node.module).__name__


def _splits(before: tuple[int, ...], after: tuple[int, ...]) -> bool:
    """Whether reshaping `before` into `after` splits a dimension other than the first into several longer than 1."""
    if 0 in before or math.prod(before) != math.prod(after):
        return False
    i = j = 0
    while i < len(before) and j < len(after):
        start_i, start_j, a, b = i, j, before[i], after[j]
        i, j = i + 1, j + 1
        while a != b:
            if a < b:
                a, i = a * before[i], i + 1
            else:
                b, j = b * after[j], j + 1
        if i - start_i == 1 and start_i > 0 and sum(d > 1 for d in after[start_j:j]) > 1:
            return True
    return False


def _param_reason(node, other: str) -> str | None:
    consumers = [n for c in node.outputs for n in (c.outputs if _op(c) == "ExpandBackward0" else [c])]
    bad = next((_op(c) for c in consumers if _op(c) not in _PARAM_OPS), None)
    return None if bad is None else (f"{other} a parameter read by {bad}, which cannot lose channels exactly (exact: a parameter "
                                     "that multiplies, is added to or is concatenated to the channels)")


def _op_reason(node, dg: tp.DependencyGraph, heads: bool) -> str | None:
    """Why a parameter-free operation keeps its group from being cut: it meets a model input, or it is a reshape that
    splits the channels (unless `heads`: the group is split into attention heads, which `_blocks` follows)."""
    if node.grad_fn in dg.reads_input:
        return "its channels meet a model input (e.g. a residual sum with the input), whose channels cannot be removed"
    if not heads and node.grad_fn in dg.reshapes and _splits(*dg.reshapes[node.grad_fn]):
        before, after = dg.reshapes[node.grad_fn]
        return (f"its channels pass through a reshape from {list(before)} to {list(after)} that splits a dimension (e.g. a channel "
                "shuffle), which Torch-Pruning cannot follow")
    return None


def _conv_reason(item, conv: nn.Module, out: bool, other: str) -> str | None:
    """Why the channels of a grouped or depthwise convolution (plain or spectral) in a group cannot be cut (None: they
    can). A spectral one is sliced per group by `SPECTRAL_PRUNERS` as Torch-Pruning slices a plain one."""
    if conv.groups == conv.out_channels:  # Torch-Pruning's depthwise convolution: its channels go with its input's
        return None if conv.in_channels == conv.out_channels else (
            f"{other} a depthwise convolution with a channel multiplier ({conv.in_channels} -> {conv.out_channels} channels)")
    width = conv.out_channels if out else conv.in_channels
    if list(item.idxs) != list(range(width)) or list(item.root_idxs) != list(range(width)):
        return f"{other} a grouped convolution (groups={conv.groups}) reached through a concatenation, split or slice"
    return None


def _reason(group, item, root: nn.Module, names: dict[int, str], ignored: set[str], dg: tp.DependencyGraph, exact: bool,
            through: list[str]) -> str | None:
    """Why one item of a group keeps the group from being cut out exactly (None: it does not). With `exact=False`, a
    norm or attention is no reason: it is appended to `through` instead."""
    target = item.dep.target
    mod, out = target.module, _is_out(group, item.dep)
    mname = names[id(mod)] if id(mod) in names else repr(mod)  # repr only when it has no name
    other = "it is" if mod is root else f"it shares channels with {mname}, which is"
    if isinstance(mod, ops._OutputOp) or (not target.outputs and out):
        return "its channels are model outputs"
    if out and any(mname == i or mname.startswith(i + ".") for i in ignored):
        return f"{other} in ignored_layers"
    if isinstance(mod, nn.Parameter):
        return _param_reason(target, other)
    if not exact and (kind := _inexact_kind(mod)):
        through.append(kind + ("" if isinstance(mod, ops._ElementWiseOp) else f" {mname}"))
        return None
    if type(mod).__module__ == ops.__name__:
        return _op_reason(target, dg, _attends(group))
    if getattr(mod, "groups", 1) != 1:
        if not isinstance(mod, _WEIGHTED):
            return f"{other} a grouped {type(mod).__name__} (groups={mod.groups})"
        return _conv_reason(item, mod, out, other)
    if not isinstance(mod, _EXACT):
        return (f"{other} a {type(mod).__name__}, which cannot lose channels exactly (exact: {plain_names()}, "
                "BatchNorm, their spectral forms, parameters that scale or shift channels, and parameter-free operations)")
    return None


def _groups(model: nn.Module, dg: tp.DependencyGraph, ignored: set[str], plan: ChannelPlan, exact: bool = True) -> dict[str, object]:
    """Prunable groups by root layer name; the others go to plan.left_alone with the reason.

    With `exact=False`, groups through norms and nn.MultiheadAttention are prunable too (listed in plan.inexact)."""
    modules = dict(model.named_modules())
    names = {id(m): n for n, m in modules.items()}
    names.update({id(p): n for n, p in model.named_parameters()})
    attention = [n + "." for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)]
    for name, m in model.named_modules():
        if isinstance(m, _WEIGHTED) and m not in dg.module2node:
            inside = next((a[:-1] for a in attention if name.startswith(a)), None)
            plan.left_alone[name] = ("not reached by the forward pass on example_inputs" if inside is None else
                                     f"MultiheadAttention {inside} reads its weight directly, never calling its forward" +
                                     ("" if exact else "; cut with its embed_dim when that group is pruned"))
    groups = {}
    for group in dg.get_all_groups(root_module_types=ROOT_TYPES):
        root = group[0].dep.target.module
        rname = names[id(root)]
        through: list[str] = []
        why = next((w for item in group if (w := _reason(group, item, root, names, ignored, dg, exact, through))), None)
        blocks, why = (1, why) if why else _blocks(modules, names, group, exact)
        producers = [names[id(item.dep.target.module)] for item in group
                     if isinstance(item.dep.target.module, _WEIGHTED) and _is_out(group, item.dep)]
        if why:
            plan.left_alone[rname] = why
            for name in producers:
                plan.left_alone.setdefault(name, why)
        else:
            groups[rname] = group
            plan.widths[rname] = len(group[0].idxs)
            if blocks > 1:
                plan.blocks[rname] = blocks
            if through:
                plan.inexact[rname] = ", ".join(dict.fromkeys(through))
            for name in producers:
                plan.members[name] = rname
    return groups


def _refuse_scripted(model: nn.Module) -> None:
    scripted = next((n for n, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)), None)
    if scripted is not None:
        raise PruneError(f"cannot prune {type(model).__name__}: {scripted or 'the model'} is a TorchScript module (torch.jit.script "
                         "or trace), which Torch-Pruning can neither trace nor cut; prune the Python module, then script it")


def _copy_with_grads(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters carry copies of `model`'s gradients (Taylor-like importances read .grad)."""
    work = copy.deepcopy(model)
    for p, q in zip(model.parameters(), work.parameters()):
        if p.grad is not None:
            q.grad = p.grad.detach().clone()
    return work


def _plan(
    model: nn.Module, work: nn.Module, keep: KeepLike | dict[str, KeepLike], inputs: tuple[torch.Tensor, ...],
    importance: tp.importance.Importance | None, global_ranking: bool, ignored_layers: Sequence[LayerRef] | None,
    exact: bool = True, unwrapped_parameters: Sequence[tuple[object, int]] | None = None,
) -> tuple[ChannelPlan, tp.DependencyGraph]:
    """The plan for `model`, scored on `work` (`model` itself or its copy) from one trace; that graph, to cut `work` with."""
    if not isinstance(exact, bool):
        raise PruneError(f"exact must be True or False, got {exact!r}")
    check_finite(model, *inputs)  # a diverged model (or NaN inputs) would rank garbage
    names_of_original = {id(m): n for n, m in model.named_modules()}
    ignored = _resolve(work, ignored_layers, names_of_original)
    names_of_original.update({id(p): n for n, p in model.named_parameters()})
    plan = ChannelPlan(unwrapped=_unwrapped(work, unwrapped_parameters, names_of_original))
    dg = _build(work, inputs, plan.unwrapped)
    groups = _groups(work, dg, ignored, plan, exact)
    if not groups:
        raise PruneError(f"{type(model).__name__} has no channels that can be pruned: " +
                         "; ".join(f"{n}: {w}" for n, w in plan.left_alone.items()))
    importance = importance or EigenImportance()
    for name, group in groups.items():
        s = importance(group)
        if s is None:
            raise PruneError(f"the importance {type(importance).__name__} gives no scores for the group of {name}")
        s = s.detach().flatten().double().cpu()
        blocks = plan.blocks.get(name, 1)  # one score per position, the norm over the blocks that share it
        plan.scores[name] = s.view(blocks, -1).norm(dim=0) if blocks > 1 else s
    return choose_channels(plan, keep, global_ranking=global_ranking), dg


def select_channels(
    model: nn.Module, keep: KeepLike | dict[str, KeepLike], example_inputs: Inputs, *,
    importance: tp.importance.Importance | None = None, global_ranking: bool = False,
    ignored_layers: Sequence[LayerRef] | None = None, exact: bool = True,
    unwrapped_parameters: Sequence[tuple[object, int]] | None = None,
) -> ChannelPlan:
    """Which output channels of each prunable group to keep (`model` is not modified: it is traced on a copy).

    `importance`: any Torch-Pruning `Importance` (default `EigenImportance`; gradient-based ones such as
    `TaylorImportance` read the gradients already in `model`'s parameters). The scores are kept in
    the plan (`plan.scores`), so `choose_channels(plan, other_keep)` re-decides without re-scoring.
    `keep` and `global_ranking`: see `choose_channels`. `exact` (default True): only groups whose
    pruned model equals `mask_graph`'s; False also prunes groups through LayerNorm, GroupNorm,
    RMSNorm-style modules and nn.MultiheadAttention (the network without those channels, each norm
    recomputed over the kept ones; listed in `plan.inexact`). Channels split into equal blocks (attention heads,
    GroupNorm groups, a grouped convolution's groups; `plan.blocks`) score by position (the norm over the blocks) so
    every block keeps the same positions. `unwrapped_parameters`: (parameter or its name, dim) pairs for bare
    parameters that scale or shift channels (a layer scale, a class token, a position embedding), cut along dim;
    any other bare parameter is cut along its last dimension longer than 1 (Torch-Pruning's default).
    """
    _refuse_scripted(model)
    inputs = input_tuple(example_inputs, PruneError)
    return _plan(model, _copy_with_grads(model), keep, inputs, importance, global_ranking, ignored_layers, exact,
                 unwrapped_parameters)[0]


def choose_channels(plan: ChannelPlan, keep: KeepLike | dict[str, KeepLike], *, global_ranking: bool = False) -> ChannelPlan:
    """A plan with the same groups and scores as `plan` keeping, by score, the channels `keep` asks for.

    `keep`: a count per group (int), a fraction (float or '10%'), a threshold '>t' on each group's
    score normalised by its maximum, or a dict {layer name: keep} (other groups untouched; any layer
    producing a group's channels names the group). With `global_ranking`, a count or a fraction is
    of all prunable channels together, ranked by score normalised by each group's maximum (each group
    keeps at least its top channel). A group split into equal blocks (`plan.blocks`) keeps the same
    positions in each block: a count is rounded up to a multiple of the blocks, and in global ranking a
    position counts once.
    """
    scores = plan.scores
    new = ChannelPlan(widths=dict(plan.widths), members=dict(plan.members), left_alone=dict(plan.left_alone), scores=scores,
                      blocks=dict(plan.blocks), inexact=dict(plan.inexact), unwrapped=dict(plan.unwrapped))
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
        total = sum(scores[n].numel() for n in specs)
        wanted = int(spec.value) if spec.kind == "count" else math.ceil(spec.value * total - 1e-9)
        if not len(specs) <= wanted <= total:
            raise PruneError(f"global keep={wanted} must be between the number of groups {len(specs)} and the "
                             f"number of prunable channels {total}")
        top = torch.cat([top_k_mask(scores[n], 1) for n in specs]).bool()  # each group's top channel first
        chosen = top_k_mask(torch.where(top, torch.full_like(flat, math.inf), flat), wanted).bool()
        start = 0
        for name in specs:
            n = scores[name].numel()
            new.kept[name] = _whole_positions(chosen[start : start + n], new.blocks.get(name, 1))
            start += n
        return new
    for name, spec in specs.items():
        blocks = new.blocks.get(name, 1)
        if spec.kind == "count" and blocks > 1:
            if spec.value > new.widths[name]:
                raise PruneError(f"keep={int(spec.value)} exceeds the width {new.widths[name]} of {name}; give a count in "
                                 f"1..{new.widths[name]}")
            spec = KeepSpec("count", math.ceil(spec.value / blocks))
        k = count_to_keep(spec, scores[name], name)
        new.kept[name] = _whole_positions(top_k_mask(scores[name], k).bool(), blocks)
    return new


def _whole_positions(chosen: torch.Tensor, blocks: int) -> torch.Tensor:
    """Kept channel indices: the chosen positions (a mask, one per position) in each of `blocks` equal blocks."""
    return chosen.bool().repeat(blocks).nonzero().flatten()


@torch.no_grad()
def _zero(layer: nn.Module, idxs: list[int], out: bool) -> None:
    if isinstance(layer, SpectralModule):  # a grouped one's input i = g * size + j is phi[o, j] for the outputs o of group g
        out = out or getattr(layer, "depthwise", False)  # a depthwise one's input c is its output c
        if out:
            layer.phi[idxs] = 0
        else:
            size, rows = layer.lam_in.shape[0] // layer.groups, layer.phi.shape[0] // layer.groups
            cut = torch.zeros(layer.groups, size, dtype=torch.bool, device=layer.phi.device)
            cut.view(-1)[idxs] = True  # [group, j]
            layer.phi[cut.repeat_interleave(rows, dim=0)] = 0
    elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
        if layer.affine:
            layer.weight[idxs] = 0
    elif out:
        layer.weight[idxs] = 0
    elif getattr(layer, "groups", 1) > 1:  # input channel i of a grouped conv: weight[:, i % per] of its group's outputs only
        per, out_per = layer.weight.shape[1], layer.weight.shape[0] // layer.groups
        for i in idxs:
            layer.weight[i // per * out_per : (i // per + 1) * out_per, i % per] = 0
    else:
        layer.weight[:, idxs] = 0
    if out and getattr(layer, "bias", None) is not None:
        layer.bias[idxs] = 0


def _apply(model: nn.Module, plan: ChannelPlan, inputs: tuple[torch.Tensor, ...], mask: bool,
           dg: tp.DependencyGraph | None = None) -> nn.Module:
    """Cut (or, with `mask`, zero) the channels `plan` drops, in place, on `dg` (the graph of `model`; None: trace it).

    Every group's width is checked against the plan before anything changes. Each group is taken from the graph
    right before it is cut, as Torch-Pruning's pruners do (cutting one group changes the index maps of the next).
    """
    if dg is None:
        dg = _build(model, inputs, plan.unwrapped)
    modules = dict(model.named_modules())
    drops = {}
    for name, kept in plan.kept.items():
        root = modules[name]
        width = dg.get_pruner_of_module(root).get_out_channels(root)
        if width != plan.widths[name]:
            raise PruneError(f"{name} has {width} channels, the plan was made for {plan.widths[name]}")
        drops[name] = sorted(set(range(width)) - set(kept.tolist()))
    for name, drop in drops.items():
        if not drop:
            continue
        root = modules[name]
        group = dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, drop)
        cut = {int(i) for item in group if item.dep.target.module is root and _is_out(group, item.dep) for i in item.idxs}
        if len(cut) != len(drop):  # Torch-Pruning ties some of the root's channels to others of its own (a fused qkv)
            raise PruneError(f"cutting {len(drop)} channels of {name} would cut {len(cut)}: Torch-Pruning ties its channels "
                             "among themselves in a way the plan does not follow; pass it in ignored_layers")
        if mask:
            for item in group:
                target = item.dep.target
                if isinstance(target.module, _EXACT):
                    _zero(target.module, list(item.idxs), _is_out(group, item.dep))
                elif isinstance(target.module, nn.Parameter):  # a layer scale, class token, position embedding
                    with torch.no_grad():
                        target.module.index_fill_(target.pruning_dim, torch.as_tensor(list(item.idxs)), 0)
        else:
            group.prune()
    return model


def mask_graph(model: nn.Module, plan: ChannelPlan, example_inputs: Inputs) -> nn.Module:
    """A same-size copy of `model` with every slice that `prune_graph` would remove set to zero (the reference).

    Refuses a plan that cuts a group through a norm or attention (`select_channels(..., exact=False)`): the
    pruned model recomputes those over the kept channels, which no same-size zeroed model computes."""
    cut = [n for n in plan.inexact if n in plan.kept and len(plan.kept[n]) < plan.widths[n]]
    if cut:
        raise PruneError(f"mask_graph has no masked model for this plan: it cuts {cut[0]}'s channels through {plan.inexact[cut[0]]} "
                         "(exact=False), where the pruned model normalises or attends over the kept channels only; "
                         "a plan from select_channels(..., exact=True) has a masked reference")
    work = copy.deepcopy(model)
    return _apply(work, plan, input_tuple(example_inputs, PruneError), mask=True)


def prune_graph(
    model: nn.Module, keep: KeepLike | dict[str, KeepLike] | ChannelPlan, example_inputs: Inputs, *,
    importance: tp.importance.Importance | None = None, global_ranking: bool = False,
    ignored_layers: Sequence[LayerRef] | None = None, unwrapped_parameters: Sequence[tuple[object, int]] | None = None,
    keep_spectral: bool = False, inplace: bool = False, exact: bool = True,
) -> nn.Module:
    """A physically smaller `model` with only the important channels of each prunable group.

    `keep` and the options as in `select_channels` (or a `ChannelPlan` it returned). Spectral layers
    are sliced by `SPECTRAL_PRUNERS`; with `keep_spectral` they stay spectral (train on after pruning),
    otherwise the result has plain `nn.Linear`/`nn.Conv*` layers. `model` is left unchanged unless
    `inplace`. The result computes what `mask_graph(model, plan, example_inputs)` computes, except with
    `exact=False` (see `select_channels`): then the groups in `plan.inexact` are cut out of the network and
    their norms and attention recomputed over the kept channels, which is NOT the masked model.
    One call copies `model` at most once (never with `inplace`) and traces it once: the channels are
    scored and cut on the same dependency graph.
    """
    if not isinstance(keep, ChannelPlan):
        _refuse_scripted(model)
    inputs = input_tuple(example_inputs, PruneError)
    if isinstance(keep, ChannelPlan):
        work = model if inplace else copy.deepcopy(model)
        _apply(work, keep, inputs, mask=False)
    else:
        work = model if inplace else _copy_with_grads(model)
        plan, dg = _plan(model, work, keep, inputs, importance, global_ranking, ignored_layers, exact, unwrapped_parameters)
        if not inplace:
            for p in work.parameters():  # the gradients were copied for scoring; a copy never carries them
                p.grad = None
        _apply(work, plan, inputs, mask=False, dg=dg)
    return work if keep_spectral else despectralize(work)
