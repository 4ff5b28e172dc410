"""Training one ordinary PyTorch model: Adam on shuffled mini-batches of the task loss plus the spectral penalty.

`train_alone` is also the oracle the batched trainer (`eigenprune.batched.train`) is tested against:
both draw every epoch's shuffle from a `torch.Generator` seeded by the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from eigenprune.core.convert import spectral_penalty
from eigenprune.core.losses import Task, task_loss

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


def train_alone(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: TrainSpec, shuffle_seed: int) -> nn.Module:
    """Train one ordinary PyTorch model with the same loop (x [P, D], y [P]); the batched path's oracle."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adam(params, spec.lr, kind=spec.optimizer)
    gen = torch.Generator().manual_seed(int(shuffle_seed))
    n = x.shape[0]
    for _ in range(spec.epochs):
        perm = torch.randperm(n, generator=gen).to(x.device)
        xs, ys = x[perm], y[perm]
        for b in batches(n, spec.batch_size):
            loss = task_loss(model(xs[b]), ys[b], spec.task) + spectral_penalty(model)
            opt.zero_grad()  # set to None (both optimizers)
            loss.backward()
            opt.step()
    return model
