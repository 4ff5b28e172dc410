"""Training one ordinary PyTorch model: Adam on shuffled mini-batches of the task loss plus a penalty (`fit`).

`train_alone` (the task loss plus the spectral penalty, data as tensors) is `fit` with a `TrainSpec`; it is the
oracle the batched trainer (`eigenprune.batched.train`) is tested against: both draw every epoch's shuffle from a
`torch.Generator` seeded by the same seed. `evaluate` measures a model's loss (and accuracy) on a data set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, Union

import numpy as np
import torch
from torch import nn

from eigenprune.core.convert import spectral_penalty
from eigenprune.core.errors import EigenpruneError
from eigenprune.core.losses import Task, task_loss, task_metric

Data = Union[tuple[torch.Tensor, torch.Tensor], Iterable]
"""Training or validation data: a pair of tensors (x [P, ...], y [P, ...]) or an iterable of (x, y) batches (a DataLoader)."""


class TrainingError(EigenpruneError, ValueError):
    """Training that cannot go on (a non-finite loss) or data it cannot use, stated in one line."""

BACKPROPS = ("manual", "fused", "autograd", "autograd_compiled")
"""How a batched step computes its gradients (`TrainSpec.backprop`)."""


@dataclass(frozen=True)
class TrainSpec:
    """How a group of students trains: all share learning rate, batch size and epoch count."""

    lr: float
    batch_size: int
    epochs: int
    task: Task = "regression"
    # the ensemble's hand-written gradients, the same with the first layer in fused kernels, autograd, or
    # autograd of the forward compiled by torch.compile (AOTAutograd compiles its backward too)
    backprop: Literal["manual", "fused", "autograd", "autograd_compiled"] = "manual"
    cuda_graph: bool = False  # on CUDA: capture an epoch once and replay it (see `train_ensemble`)
    compile_step: bool = False  # backprop manual: the hand-written step under torch.compile (inductor fuses its element-wise kernels)
    tile: int = 0  # backprop manual: the first layer in tiles of this many activations (`batched.tiled`); 0: off
    optimizer: Literal["adam", "keras_adam"] = "adam"  # torch's fused Adam, or `KerasAdam` (the authors' form)

    def __post_init__(self) -> None:
        if self.backprop not in BACKPROPS:
            renamed = " (renamed 'autograd_compiled')" if self.backprop == "compile" else ""
            raise ValueError(f"backprop must be one of {', '.join(map(repr, BACKPROPS))}, got {self.backprop!r}{renamed}")
        if self.cuda_graph and self.backprop in ("autograd", "autograd_compiled"):
            raise ValueError("cuda_graph needs backprop='manual' or 'fused' (autograd's backward is not captured)")
        if self.compile_step and self.backprop != "manual":
            raise ValueError(f"compile_step applies to backprop='manual', not {self.backprop!r}")
        if self.tile and self.backprop != "manual":
            raise ValueError(f"tile applies to backprop='manual', not {self.backprop!r}")


class KerasAdam(torch.optim.Optimizer):
    """Adam in the form Keras 3 computes it (the authors' optimizer), for parity runs.

    Per step t (from 1), with g the gradient:
        m += (g - m) (1 - beta1);  v += (g^2 - v) (1 - beta2)
        alpha = lr sqrt(1 - beta2^t) / (1 - beta1^t);  p -= m alpha / (sqrt(v) + eps)
    Two differences from `torch.optim.Adam`: eps is added to sqrt(v) *before* the bias correction
    (torch adds it to sqrt(v / (1 - beta2^t))), and beta^t is computed from beta rounded to float32,
    like the learning rate, which Keras holds in float32 even when the parameters are float64. Keras'
    default eps is 1e-7 (torch's 1e-8). The step count is a tensor, so a step never reads back to the
    host and can be captured in a CUDA graph.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-7) -> None:
        if not lr > 0 or not eps >= 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"KerasAdam needs lr > 0, eps >= 0 and betas in [0, 1), got lr={lr}, eps={eps}, betas={betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch.optim.Optimizer's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (b1, b2), eps = group["betas"], group["eps"]
            b1_32, b2_32, lr_32 = (float(np.float32(v)) for v in (b1, b2, group["lr"]))
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=p.dtype, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                t, m, v, g = state["step"], state["exp_avg"], state["exp_avg_sq"], p.grad
                t.add_(1)
                m.add_((g - m) * (1 - b1))
                v.add_((g * g - v) * (1 - b2))
                alpha = lr_32 * torch.sqrt(1 - torch.pow(b2_32, t)) / (1 - torch.pow(b1_32, t))
                p.sub_(m * alpha / (v.sqrt() + eps))
        return loss

    def step_with(self, grads: list[torch.Tensor]) -> None:
        """`step()` with these gradients of the parameters (in their order) instead of `.grad`."""
        for p, g in zip(self.param_groups[0]["params"], grads):
            p.grad = g
        self.step()


class FusedAdam:
    """Adam in torch's fused kernel (`torch._fused_adam_`: what `torch.optim.Adam(fused=True)` runs, in its order,
    with its defaults), over one list of parameters of one device and dtype; equal to it bit for bit (tested).

    `step_with(grads)` takes the gradients directly, `step()` reads them from `.grad` (the autograd variants).
    It is not a `torch.optim.Optimizer`: building one of those imports torch._dynamo in every worker process, and
    its `step()` spends more time in Python than in the kernels for the small tensors of the teacher-student runs
    (measured in docs/benchmarks.md, "Speed round 3"). The state is made at construction.
    """

    def __init__(self, params: list[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = list(params)
        kinds = {(p.device, p.dtype) for p in self.params}
        if len(kinds) > 1:
            raise ValueError(f"FusedAdam needs parameters of one device and dtype, got {sorted(map(str, kinds))}")
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.exp_avgs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in self.params]  # as torch's fused Adam

    def step_with(self, grads: list[torch.Tensor]) -> None:
        """One Adam step of the parameters (in their order) with these gradients."""
        self._update(self.params, grads, self.exp_avgs, self.exp_avg_sqs, self.steps)

    def step(self) -> None:
        """One Adam step with the gradients in `.grad`; parameters without one are left as they are (as in torch)."""
        have = [i for i, p in enumerate(self.params) if p.grad is not None]
        self._update(*([items[i] for i in have] for items in (self.params, [p.grad for p in self.params], self.exp_avgs,
                                                              self.exp_avg_sqs, self.steps)))

    @torch.no_grad()
    def _update(self, params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, steps: list) -> None:
        if params:
            torch._foreach_add_(steps, 1)
            torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=self.lr, beta1=self.betas[0],
                               beta2=self.betas[1], weight_decay=0.0, eps=self.eps, maximize=False)

    def zero_grad(self) -> None:
        """Drop the parameters' `.grad` (as `torch.optim.Optimizer.zero_grad(set_to_none=True)`)."""
        for p in self.params:
            p.grad = None


def adam(params: list[torch.Tensor], lr: float, kind: str = "adam") -> FusedAdam | KerasAdam:
    """The trainers' optimizer: torch's fused Adam (kind "adam", the default: `FusedAdam`), or `KerasAdam` ("keras_adam");
    both have `step_with(grads)`."""
    if kind == "keras_adam":
        return KerasAdam(params, lr=lr)
    if kind != "adam":
        raise ValueError(f"optimizer must be adam or keras_adam, got {kind!r}")
    return FusedAdam(params, lr=lr)


def batches(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _check_pair(data: tuple, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if len(data) != 2 or not all(isinstance(t, torch.Tensor) for t in data):
        raise TrainingError(f"{name} must be a pair of tensors (x, y) or a DataLoader of (x, y) batches, got a "
                            f"{type(data).__name__} of {len(data)} item(s)")
    x, y = data
    if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
        raise TrainingError(f"{name} is empty" if x.shape[0] == 0 else
                            f"{name} has {x.shape[0]} inputs but {y.shape[0]} targets (shapes {list(x.shape)}, {list(y.shape)})")
    return x, y


def data_batches(data: Data, name: str = "data", batch_size: int = 1024,
                 generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The (x, y) batches of `data`: a pair of tensors in `batch_size` slices (shuffled by `generator` when given, as
    `train_alone` always did: one permutation of the whole set, then slices), or the batches of a DataLoader (or of
    any iterable of pairs, e.g. a list of batches) as it gives them (its own order and size). TrainingError for empty
    data, unequal lengths or a batch that is no pair."""
    if isinstance(data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in data):  # tensors, not a list of batches
        x, y = _check_pair(tuple(data), name)
        n = x.shape[0]
        if generator is not None:
            perm = torch.randperm(n, generator=generator).to(x.device)
            x, y = x[perm], y[perm]
        for b in batches(n, batch_size):
            yield x[b], y[b]
        return
    if isinstance(data, torch.Tensor) or not hasattr(data, "__iter__"):
        what = "one tensor" if isinstance(data, torch.Tensor) else f"a {type(data).__name__}"
        raise TrainingError(f"{name} must be a pair of tensors (x, y) or a DataLoader of (x, y) batches, got {what}")
    count = 0
    for batch in data:
        if not isinstance(batch, (tuple, list)):
            raise TrainingError(f"each batch of {name} must be a pair (x, y), got a {type(batch).__name__}")
        count += 1
        yield _check_pair(tuple(batch), f"a batch of {name}")
    if count == 0:
        raise TrainingError(f"{name} is empty: its DataLoader gave no batch")


def fit(
    model: nn.Module, data: Data, *, epochs: int, lr: float, batch_size: int = 64, seed: int = 0,
    task: Task = "classification", penalty: Callable[[nn.Module], torch.Tensor] | None = None,
    after_backward: Callable[[nn.Module], object] | None = None, after_epoch: Callable[[int, float], object] | None = None,
    optimizer: Literal["adam", "keras_adam"] = "adam",
) -> nn.Module:
    """Train `model` in place (every parameter that requires grad) and return it, in the training mode it came in.

    Adam (`adam`: torch's fused kernel, or `KerasAdam`) on the mean task loss (`task_loss`: cross-entropy of the
    logits for classification, mean squared error for regression) plus `penalty(model)` (e.g. `spectral_penalty`).
    Tensors are reshuffled every epoch from a generator seeded by `seed` and cut into `batch_size` batches; a
    DataLoader is iterated as it is (its own order and batch size; `seed` and `batch_size` do not apply). Batches
    move to the model's device. `after_backward(model)` runs between backward and the step (Torch-Pruning's
    `pruner.regularize`); `after_epoch(epoch, mean_loss)` after each epoch (e.g. `lambda e, loss: pruner.update_reg()`).
    A non-finite loss stops training with a TrainingError (before that step changes the model).
    """
    if not (isinstance(epochs, int) and epochs >= 0 and isinstance(batch_size, int) and batch_size >= 1 and lr > 0):
        raise TrainingError(f"fit needs epochs >= 0, batch_size >= 1 (ints) and lr > 0, got epochs={epochs!r}, "
                            f"batch_size={batch_size!r}, lr={lr!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError(f"{type(model).__name__} has no parameter that requires grad: nothing to train")
    device = params[0].device
    opt = adam(params, lr, kind=optimizer)
    gen = torch.Generator().manual_seed(int(seed))
    training = model.training
    model.train()
    try:
        for epoch in range(epochs):
            total, steps = 0.0, 0
            for xb, yb in data_batches(data, "the training data", batch_size, gen):
                xb, yb = xb.to(device), yb.to(device)
                loss = task_loss(model(xb), yb, task)
                loss = loss.mean() if loss.dim() else loss  # a regression with several outputs: one mean over all
                if penalty is not None:
                    loss = loss + penalty(model)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingError(f"the training loss is {value} at epoch {epoch + 1}, batch {steps + 1} (lr {lr:g}): "
                                        "training diverged, or the data hold NaN/inf; try a smaller lr or penalty")
                opt.zero_grad()  # set to None (both optimizers)
                loss.backward()
                if after_backward is not None:
                    after_backward(model)
                opt.step()
                total, steps = total + value, steps + 1
            if after_epoch is not None:
                after_epoch(epoch, total / steps)
    finally:
        model.train(training)
    return model


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, task: Task = "classification", batch_size: int = 1024) -> dict[str, float]:
    """{"loss": mean task loss, "accuracy": share of correct argmax predictions (classification only)} of `model` on
    `data` (tensors or a DataLoader), in eval mode (the model's own mode is restored)."""
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums, n = {"loss": 0.0, "accuracy": 0.0}, 0
    try:
        for xb, yb in data_batches(data, "the evaluation data", batch_size):
            xb, yb = xb.to(device), yb.to(device)
            out = model(xb)
            sums["loss"] += float(task_loss(out, yb, task).mean()) * len(xb)
            if task == "classification":
                sums["accuracy"] += float(task_metric(out, yb, task, "accuracy")) * len(xb)
            n += len(xb)
    finally:
        model.train(training)
    return {k: v / n for k, v in sums.items() if task == "classification" or k == "loss"}


def train_alone(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: TrainSpec, shuffle_seed: int) -> nn.Module:
    """Train one ordinary PyTorch model with `spec` (x [P, D], y [P]; task loss + `spectral_penalty`): the batched
    path's oracle, and `fit` underneath."""
    return fit(model, (x, y), epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size, seed=shuffle_seed, task=spec.task,
               penalty=spectral_penalty, optimizer=spec.optimizer)
