"""Many students as one batched computation.

S students of the same depth are stacked along a leading dimension; narrower ones are zero-padded.
Padded entries have zero weight, zero activation and zero gradient, so they stay exactly zero under
Adam (an element-wise optimizer): training the stack equals training each student alone.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from eigenprune.batched import tiled
from eigenprune.core.layers import Penalty, SpectralLinear, eigen_gap, penalty, spectral_weight
from eigenprune.core.losses import task_loss_and_grad
from eigenprune.core.structure import as_sequential


def bmm(a: torch.Tensor, b: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """a [S, M, K] @ b [S, K, N], in the orientation the CPU's GEMM does faster, or in `like`'s layout if given.

    Producing few output columns (N < M) from a longer contraction (N < K) is 2-3x slower on x86
    BLAS than producing the transpose, (b^T a^T)^T, which has long rows (measured on this project's
    CPU for the shapes of a step, docs/benchmarks.md); the result is then a transposed view. `like`
    (a tensor the result will be combined with element-wise) asks for its layout instead: element-wise
    kernels on operands of two layouts are 2x slower than on one.
    """
    if like is not None:
        transposed = like.stride(-1) != 1
    else:
        transposed = b.shape[-1] < min(a.shape[-2], a.shape[-1])
    if transposed:
        return torch.bmm(b.transpose(1, 2), a.transpose(1, 2)).transpose(1, 2)
    return torch.bmm(a, b)


class StackedLayer(nn.Module):
    """One layer of S students: phi [S, O, I], lam_in [S, I], lam_out [S, O], bias [S, O] or None."""

    def __init__(self, layers: list[SpectralLinear]) -> None:
        super().__init__()
        first = layers[0]
        for layer in layers:
            if not isinstance(layer, SpectralLinear):
                raise TypeError(f"ensemble layers must be SpectralLinear, got {type(layer).__name__}")
            if (layer.bias is None, layer.trainable_parts()) != (first.bias is None, first.trainable_parts()):
                raise ValueError("students stacked in one ensemble must train the same parts of each layer")
        n_out = max(layer.out_features for layer in layers)
        n_in = max(layer.in_features for layer in layers)
        s, kw = len(layers), {"dtype": first.phi.dtype, "device": first.phi.device}
        stacked = {
            "phi": torch.zeros(s, n_out, n_in, **kw), "lam_in": torch.zeros(s, n_in, **kw),
            "lam_out": torch.zeros(s, n_out, **kw), "bias": torch.zeros(s, n_out, **kw),
        }
        for i, layer in enumerate(layers):
            o, n = layer.out_features, layer.in_features
            stacked["phi"][i, :o, :n] = layer.phi.detach()
            stacked["lam_in"][i, :n] = layer.lam_in.detach()
            stacked["lam_out"][i, :o] = layer.lam_out.detach()
            if first.bias is not None:
                stacked["bias"][i, :o] = layer.bias.detach()
        for name in ("phi", "lam_in", "lam_out"):
            setattr(self, name, nn.Parameter(stacked[name], getattr(first, name).requires_grad))
        self.bias = None if first.bias is None else nn.Parameter(stacked["bias"], first.bias.requires_grad)
        self.register_buffer("widths", torch.tensor([layer.out_features for layer in layers]))
        self.register_buffer("in_widths", torch.tensor([layer.in_features for layer in layers]))
        self.register_buffer("l2_phi", torch.tensor([layer.l2_phi for layer in layers], **kw))
        self.register_buffer("l2_lam", torch.tensor([layer.l2_lam for layer in layers], **kw))
        self.register_buffer("l1_lam", torch.tensor([layer.l1_lam for layer in layers], **kw))
        self.register_buffer("group_lasso", torch.tensor([layer.group_lasso for layer in layers], **kw))
        self.terms = tuple(any(layer.terms[i] for layer in layers) for i in range(4))  # see `core.layers.penalty`

    @property
    def weight(self) -> torch.Tensor:
        """Direct-space weights [S, O, I] (see `spectral_weight`)."""
        return spectral_weight(self.phi, self.lam_in, self.lam_out)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Pre-activations x W^T + b [S, B, O] of x [S, B, I] (`weight`: this layer's weight if already formed)."""
        z = bmm(x, (self.weight if weight is None else weight).transpose(1, 2))
        return z if self.bias is None else z + self.bias.unsqueeze(1)

    def penalty(self, total: torch.Tensor | None = None) -> torch.Tensor:
        """Per-student regularization [S] of the trainable parts (`core.layers.penalty` of the stack), added to `total`."""
        return penalty(self, lead=1, total=total)

    def student_layer(self, s: int) -> SpectralLinear:
        """Student `s`'s layer, unpadded, as a standalone `SpectralLinear`."""
        o, n = int(self.widths[s]), int(self.in_widths[s])
        layer = SpectralLinear(
            n, o, bias=self.bias is not None, train_phi=self.phi.requires_grad, train_lam_in=self.lam_in.requires_grad,
            train_lam_out=self.lam_out.requires_grad, train_bias=self.bias is not None and self.bias.requires_grad,
            l2_phi=float(self.l2_phi[s]), l2_lam=float(self.l2_lam[s]), l1_lam=float(self.l1_lam[s]),
            group_lasso=float(self.group_lasso[s]), dtype=self.phi.dtype, device=self.phi.device,
        )
        with torch.no_grad():
            layer.phi.copy_(self.phi[s, :o, :n])
            layer.lam_in.copy_(self.lam_in[s, :n])
            layer.lam_out.copy_(self.lam_out[s, :o])
            if self.bias is not None:
                layer.bias.copy_(self.bias[s, :o])
        return layer


class Ensemble(nn.Module):
    """S students (`nn.Sequential`s of `SpectralLinear` with ReLU between them, same depth) trained as one computation.

    Input x is [S, B, input_dim]; output [S, B, n_outputs]. A student with any other module (another
    activation, a normalization) is refused: the batched computation is written for this shape only.
    "Removing" a hidden node means what setting its eigenvalue to zero means (as in `pruning.chain`):
    its incoming weights are zero, so it outputs the constant relu(b) (0 without a bias).
    """

    def __init__(self, students: list[nn.Module]) -> None:
        super().__init__()
        if not students:
            raise ValueError("an ensemble needs at least one student")
        per_student = [_relu_chain(s, i) for i, s in enumerate(students)]
        depth = len(per_student[0])
        if any(len(layers) != depth for layers in per_student):
            raise ValueError("students stacked in one ensemble must have the same number of layers")
        self.layers = nn.ModuleList(StackedLayer([layers[i] for layers in per_student]) for i in range(depth))

    @property
    def n_students(self) -> int:
        return self.layers[0].phi.shape[0]

    def activate(self, i: int, z: torch.Tensor, kept: torch.Tensor | None = None, inplace: bool = False) -> torch.Tensor:
        """The activation after layer `i` of pre-activations z [S, B, O]: ReLU after every layer but the last.

        `kept` [S, O] (0/1) removes the other nodes: they output relu(b), their value with zero incoming weights.
        """
        if i == len(self.layers) - 1:
            return z
        a = z.relu_() if inplace else F.relu(z)
        if kept is None:
            return a
        bias = self.layers[i].bias
        if bias is None:
            return a * kept.unsqueeze(1)
        return torch.where(kept.unsqueeze(1) > 0, a, F.relu(bias).unsqueeze(1))

    def run(self, h: torch.Tensor, start: int = 0, stop: int | None = None, kept: dict[int, torch.Tensor] | None = None,
            pre: bool = False) -> torch.Tensor:
        """Layers start..stop-1 (each with its activation) applied to h, the input of layer `start`, or with
        `pre` its pre-activation (so layer `start` itself is not applied again). `kept` as in `forward`."""
        stop = len(self.layers) if stop is None else stop
        kept = kept or {}
        for i in range(start, stop):
            h = self.activate(i, h if pre and i == start else self.layers[i](h), kept.get(i))
        return h

    def forward(self, x: torch.Tensor, kept: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Batched forward; `kept` maps a hidden layer index to a [S, O] 0/1 mask of the nodes left in place."""
        return self.run(x, kept=kept)

    def hidden(self, x: torch.Tensor, upto: int) -> torch.Tensor:
        """Activations after hidden layer `upto` [S, B, O]."""
        return self.run(x, 0, upto + 1)

    def head(self, z: torch.Tensor, start: int) -> torch.Tensor:
        """The network from the *pre-activation* of layer `start` to the output."""
        return self.run(z, start, pre=True)

    def penalty(self) -> torch.Tensor:
        """Per-student regularization [S]."""
        total = None
        for layer in self.layers:
            total = layer.penalty(total)
        return total

    def student(self, s: int) -> nn.Sequential:
        """Student `s` as a standalone, unpadded `nn.Sequential` (a copy)."""
        mods: list[nn.Module] = []
        for i, layer in enumerate(self.layers):
            mods.append(layer.student_layer(s))
            if i < len(self.layers) - 1:
                mods.append(nn.ReLU())
        return nn.Sequential(*mods)


def _relu_chain(student: nn.Module, index: int) -> list[SpectralLinear]:
    """The `SpectralLinear` layers of a student that is exactly layer, ReLU, layer, ..., layer; ValueError otherwise."""
    chain = list(as_sequential(student))
    for j, m in enumerate(chain):
        want = SpectralLinear if j % 2 == 0 else nn.ReLU
        if type(m) is not want:
            raise ValueError(f"the batched ensemble trains SpectralLinear layers with ReLU between them; student {index} has "
                             f"{type(m).__name__} at position {j} where {want.__name__} belongs")
    if len(chain) % 2 == 0:
        raise ValueError(f"student {index} ends with an activation; the batched ensemble needs a SpectralLinear last")
    return chain[0::2]


class _LayerStep:
    """What `ManualStep` needs of one stacked layer, looked up once: the tensors it reads, what trains, and what
    does not change during training (the gap lam_in - lam_out when no eigenvalue trains; the weight when nothing does)."""

    __slots__ = ("layer", "phi", "lam_in", "lam_out", "bias", "gap", "weight",
                 "train_phi", "train_lam_in", "train_lam_out", "train_bias", "trains", "penalty")

    def __init__(self, layer: StackedLayer) -> None:
        self.layer, self.phi, self.lam_in, self.lam_out, self.bias = layer, layer.phi, layer.lam_in, layer.lam_out, layer.bias
        self.train_phi, self.train_lam_in, self.train_lam_out = (p.requires_grad for p in (layer.phi, layer.lam_in, layer.lam_out))
        self.train_bias = layer.bias is not None and layer.bias.requires_grad
        self.trains = self.train_phi or self.train_lam_in or self.train_lam_out
        with torch.no_grad():
            self.gap = None if self.train_lam_in or self.train_lam_out else eigen_gap(layer.lam_in, layer.lam_out)
            self.weight = None if self.trains else self.gap * layer.phi
        self.penalty = Penalty(layer, lead=1)

    def weight_and_gap(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(w [S, O, I], lam_in_j - lam_out_i [S, O, I] or None if nothing trains): the weight and d w / d phi."""
        if self.weight is not None:
            return self.weight, None
        gap = self.gap if self.gap is not None else eigen_gap(self.lam_in, self.lam_out)
        return gap * self.phi, gap

    def grads(self, grad_w: torch.Tensor, grad_bias: torch.Tensor | None, on: torch.Tensor, gap: torch.Tensor,
              out: dict[int, torch.Tensor]) -> None:
        """d(loss)/d(each trained parameter) into `out` (by id), given d(loss)/dW [S, O, I] and d(loss)/d(bias) [S, O]:
        the chain rule through w = gap * phi, plus the penalty's gradient (`core.layers.Penalty.grads`) of
        students with on = 1 (on [S] 0/1)."""
        if self.penalty.group is not None:
            grad_w = self.penalty.grads({"weight": grad_w}, on)["weight"]
        grads = {}
        if self.train_phi:
            grads["phi"] = gap * grad_w  # gap first: the gradient takes its (contiguous) layout
        if self.train_lam_out or self.train_lam_in:
            gp = grad_w * self.phi
            if self.train_lam_out:
                grads["lam_out"] = gp.sum(2).neg_()
            if self.train_lam_in:
                grads["lam_in"] = gp.sum(1)
        if self.penalty.active:
            grads = self.penalty.grads(grads, on)
        for name, grad in grads.items():
            out[id(getattr(self, name))] = grad
        if self.train_bias:
            out[id(self.bias)] = grad_bias


class ManualStep:
    """The hand-written training step of an `Ensemble`: per-student loss + penalty of one batch, and its gradients.

    Hand-written backpropagation (no autograd graph, and few kernels: a step's cost on a CPU or in a CUDA
    graph is mostly their count, and on a CPU the Python around them). Equal to autograd on
    `task_loss(ens(x), y) + penalty()` summed over the students that are `alive` and whose loss is finite;
    the others get zero gradients. What does not change while training (which parts train, frozen layers'
    weights and gaps) is looked up once, here: build a new step after changing
    the ensemble's frozen parameters or which parts train. `fused`: the first layer runs in the Triton
    kernels of `eigenprune.batched.fused` (its activations are never stored; see `fused.check` for when it applies).
    `tile` (activations, 0: off): the first layer runs tile by tile in `eigenprune.batched.tiled` (its activations
    exist one cache-sized tile at a time; `tiled.applies` says when it can).
    """

    def __init__(self, ens: Ensemble, task: str, fused: bool = False, tile: int = 0) -> None:
        self.ens, self.task = ens, task
        self.kernels = None
        if fused and tile:
            raise ValueError("a step runs its first layer either fused or tiled, not both")
        if fused:  # imported when used: importing triton takes 0.25 s
            from eigenprune.batched import fused as kernels
            self.kernels = kernels
        elif tile:
            reason = tiled.applies(ens.layers)
            if reason is not None:
                raise ValueError(reason)
            self.kernels = tiled.Tiled(tile)
        self.fused = self.kernels is not None  # the first layer's activations are not stored
        self.layers = [_LayerStep(layer) for layer in ens.layers]
        self.params = [p for p in ens.parameters() if p.requires_grad]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor, alive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(loss + penalty [S], ok [S]: alive and with a finite loss, the gradients of `self.params` in their order)
        of x [S, B, D], y [S, B]."""
        layers, fused = self.layers, self.fused
        weights, gaps = zip(*(step.weight_and_gap() for step in layers))
        acts = [x]  # the input of each layer; ReLU's gradient mask is act > 0 (as z > 0)
        h = x
        for i, (step, w) in enumerate(zip(layers, weights)):
            if fused and i == 0:
                acts.append(None)  # the first layer's activations stay inside the fused kernels
                continue
            if fused and i == 1:  # layers 0 and 1 in one kernel: pre-activations of layer 1
                h = self.kernels.forward(x, weights[0], w)
                h = h if step.layer.bias is None else h + step.layer.bias.unsqueeze(1)
            else:
                h = step.layer.forward(h, w)  # not through nn.Module.__call__ (hooks): less Python a step
            h = self.ens.activate(i, h, inplace=True)
            if i < len(layers) - 1:
                acts.append(h)
        loss, delta = task_loss_and_grad(h, y, self.task)
        for step in layers:
            if step.penalty.active:
                loss = step.penalty.value(loss)
        ok = alive & (loss * 0 == 0)  # finite: inf * 0 and nan * 0 are nan (one kernel less than isfinite)
        delta = torch.where(ok[:, None, None], delta, 0.0)
        on = ok.to(x.dtype)
        grads: dict[int, torch.Tensor] = {}
        for i in reversed(range(len(layers))):
            step = layers[i]
            grad_bias = delta.sum(1) if step.train_bias else None
            if fused and i == 1:
                grad_w0, grad_w = self.kernels.backward(x, weights[0], weights[1], delta)
                step.grads(grad_w, grad_bias, on, gaps[1], grads)
                layers[0].grads(grad_w0, None, on, gaps[0], grads)
                break
            if step.trains:
                step.grads(bmm(delta.transpose(1, 2), acts[i]), grad_bias, on, gaps[i], grads)
            elif grad_bias is not None:
                grads[id(step.bias)] = grad_bias
            if i > 0:
                delta = torch.ops.aten.threshold_backward(bmm(delta, weights[i], like=acts[i]), acts[i], 0)  # ReLU's gradient
        return loss, ok, [grads[id(p)] for p in self.params]
