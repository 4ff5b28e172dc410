"""The training loop: Adam on mini-batches, L2 regularization, divergence guard.

`train_ensemble` trains a stack of students; `train_alone` is the same loop for one ordinary
PyTorch model and is the oracle the batched path is tested against. Both draw every epoch's
shuffle from one `torch.Generator` per trial seeded by `shuffle_seed`, so they see identical batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from eigenprune.batched.ensemble import Ensemble, ManualStep
from eigenprune.batched.memory import EVAL_BLOCK
from eigenprune.core.losses import Task, task_loss, task_metric
from eigenprune.core.training import FusedAdam, KerasAdam, TrainSpec, adam, batches


@dataclass
class TrainLog:
    """What training left besides the parameters: per-student first non-finite step (-1 = none)
    and the loss value seen at that step (nan, inf or -inf; 0 where none failed)."""

    failed_step: torch.Tensor
    failed_loss: torch.Tensor
    steps: int


class _Epoch:
    """One epoch of `train_ensemble` over the shuffle in `self.perm` [T, P].

    Everything that lives from one epoch to the next (the alive mask, failure records, step counter,
    the epoch's summed loss) is a tensor updated in place and no step reads a value back to the host,
    so the whole epoch can be captured once in a CUDA graph and replayed.
    """

    def __init__(self, ens: Ensemble, x: torch.Tensor, y: torch.Tensor, trial_index: torch.Tensor, spec: TrainSpec,
                 opt: FusedAdam | KerasAdam) -> None:
        self.ens, self.x, self.y, self.trial_index, self.spec, self.opt = ens, x, y, trial_index, spec, opt
        self.manual = spec.backprop in ("manual", "fused")
        step = ManualStep(ens, spec.task, fused=spec.backprop == "fused", tile=spec.tile) if self.manual else None
        # the same step, its element-wise kernels fused by inductor (compiled once per shape, on first use)
        self.train_step = torch.compile(step, dynamic=False) if spec.compile_step else step
        self.autograd_loss = torch.compile(self._loss, dynamic=False) if spec.backprop == "autograd_compiled" else self._loss
        s, dev = ens.n_students, x.device
        self.batches = batches(x.shape[1], spec.batch_size)
        self.x_rows, self.y_rows = x.reshape(-1, x.shape[2]), y.reshape(-1)  # [T * P, D], [T * P] (copies if x, y are views)
        self.offsets = (trial_index * x.shape[1]).unsqueeze(1)  # student s reads rows t * P + perm[t]
        self.perm = torch.zeros(x.shape[:2], dtype=torch.long, device=dev)
        self.alive = torch.ones(s, dtype=torch.bool, device=dev)
        self.ok_steps = torch.zeros(s, dtype=torch.long, device=dev)  # steps before the first failing one
        self.last_loss = x.new_zeros(s)  # the loss of each student's last step while it was alive
        self.running = x.new_zeros(s)

    def __call__(self) -> None:
        rows = (self.perm[self.trial_index] + self.offsets).view(-1)  # one gather per tensor, of whole rows
        shape = (self.trial_index.shape[0], self.x.shape[1])
        xs, ys = self.x_rows.index_select(0, rows).view(*shape, -1), self.y_rows.index_select(0, rows).view(shape)
        self.running.zero_()
        for xb, yb in zip(xs.split(self.spec.batch_size, 1), ys.split(self.spec.batch_size, 1)):  # the batches' views
            if self.manual:
                loss, ok, grads = self.train_step(xb, yb, self.alive)
            else:
                self.opt.zero_grad()  # set to None (both optimizers)
                loss, ok, total = self.autograd_loss(xb, yb)
                total.backward()
                loss = loss.detach()
            # a student that fails stays failed (ok = alive & finite), so its count of ok steps is the index of
            # its failing step, and the loss recorded while it was still alive at the start of a step is that step's
            torch.where(self.alive, loss, self.last_loss, out=self.last_loss)
            self.ok_steps.add_(ok)
            self.alive.copy_(ok)  # no data gradient from the failing step on
            self.running.add_(torch.where(ok, loss, 0.0))
            if self.manual:
                self.opt.step_with(grads)
            else:
                self.opt.step()

    def _loss(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Autograd's step: (loss + penalty [S], ok [S]: alive and finite, the sum over ok students to differentiate)."""
        loss = task_loss(self.ens(xb), yb, self.spec.task) + self.ens.penalty()
        ok = self.alive & torch.isfinite(loss)
        return loss, ok, torch.where(ok, loss, torch.zeros_like(loss)).sum()

    def failures(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(first non-finite step, -1 for none; the loss at that step, 0 for none) per student."""
        return (torch.where(self.alive, -1, self.ok_steps), torch.where(self.alive, 0.0, self.last_loss))


def train_ensemble(
    ens: Ensemble,
    x: torch.Tensor,
    y: torch.Tensor,
    trial_index: torch.Tensor,
    spec: TrainSpec,
    shuffle_seeds: list[int],
    on_epoch: Callable[[int, float], None] | None = None,
) -> TrainLog:
    """Train every student of `ens` on its own trial's data, in place.

    x [T, P, D] and y [T, P] hold the training sets of T trials; `trial_index` [S] says which one
    each student uses; `shuffle_seeds[t]` seeds trial t's batch order. A student whose loss turns
    NaN/inf gets no data gradient from that step on and its parameters are frozen at their values at
    the end of that epoch (Adam's momentum may move them until then); it is reported in `failed_step`.
    The others are untouched by it. `on_epoch(epoch, mean_loss_of_live_students)` reports progress.

    With `spec.cuda_graph` on a CUDA device, epoch 0 runs eagerly (it warms up Adam's state) and
    epoch 1 is captured once in a CUDA graph that every later epoch replays: one launch per epoch
    instead of ~60 per step. The arithmetic is the same kernels in the same order.

    (Longer than 60 lines: the eager epochs, the graph's capture and its replays share one loop and one
    failure bookkeeping; split apart, each would need the other's state passed back and forth.)
    """
    params = [p for p in ens.parameters() if p.requires_grad]
    graph = spec.cuda_graph and x.device.type == "cuda"
    if spec.backprop == "fused":
        from eigenprune.batched import fused  # imported when used: importing triton takes 0.25 s

        fused.check(ens.layers, x.device)
    opt = adam(params, spec.lr, kind=spec.optimizer)  # the same Adam kernels with or without a graph
    run = _Epoch(ens, x, y, trial_index, spec, opt)
    gens = [torch.Generator().manual_seed(int(s)) for s in shuffle_seeds]
    n = x.shape[1]
    captured, frozen = None, None

    def shuffle() -> torch.Tensor:
        return torch.stack([torch.randperm(n, generator=g) for g in gens])

    perm = shuffle()
    for epoch in range(spec.epochs):
        run.perm.copy_(perm)  # on CUDA this waits for the previous epoch (a pageable host copy)
        if not graph:
            run()
        elif captured is None and epoch == 0:  # warm-up on a side stream, as CUDA graph capture requires
            side = torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                run()
            torch.cuda.current_stream(x.device).wait_stream(side)
        else:
            if captured is None:
                captured = torch.cuda.CUDAGraph()
                with torch.cuda.graph(captured):
                    run()
            captured.replay()
        if epoch + 1 < spec.epochs:
            perm = shuffle()  # the next epoch's order, drawn on the host while the device works
        alive = run.alive
        if not bool(alive.all()):
            with torch.no_grad():
                if frozen is not None:  # students that failed in an earlier epoch: back to their frozen values
                    for p, v in zip(params, frozen[1]):
                        p[frozen[0]] = v
                dead = torch.nonzero(~alive).squeeze(1)
                if frozen is None or len(dead) > len(frozen[0]):  # newly failed: keep their end-of-epoch values
                    frozen = (dead, [p.detach()[dead].clone() for p in params])
        if on_epoch is not None:
            live = run.running[alive]
            on_epoch(epoch, float(live.mean()) / len(run.batches) if live.numel() else float("nan"))
    failed_step, failed_loss = run.failures()
    return TrainLog(failed_step=failed_step.cpu(), failed_loss=failed_loss.cpu(), steps=spec.epochs * len(run.batches))


@torch.no_grad()
def evaluate(
    ens: Ensemble, x: torch.Tensor, y: torch.Tensor, trial_index: torch.Tensor, task: Task, chunk: int = EVAL_BLOCK,
    kept: dict[int, torch.Tensor] | None = None, metric: str = "loss",
) -> torch.Tensor:
    """Loss (or accuracy) of every student on its trial's set (x [T, P, D], y [T, P]) -> [S] (no penalty).

    `kept` removes hidden nodes as in `Ensemble.forward`.
    """
    total = x.new_zeros(ens.n_students)
    n = x.shape[1]
    for b in batches(n, chunk):
        total += task_metric(ens(x[trial_index, b], kept=kept), y[trial_index, b], task, metric) * (b.stop - b.start)
    return total / n
