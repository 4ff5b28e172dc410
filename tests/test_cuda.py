"""CUDA paths: skipped without a GPU (CI has none); `benchmarks/gpu_check.py` runs them on one."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from eigenprune.batched.ensemble import Ensemble
from eigenprune.batched.train import _Epoch, train_ensemble
from eigenprune.core.plans import LayerPlan, make_student
from eigenprune.core.training import TrainSpec, adam
from eigenprune.experiments.builders import make_teacher

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _setup(bad_target: bool = False):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 130, 10, generator=g, dtype=torch.float64)
    y = make_teacher(10, [20, 10], 3, torch.float64)(x).squeeze(-1).detach()
    if bad_target:
        y[1, 7] = float("inf")  # trial 1's students fail in epoch 0 and must stay frozen
    plans = [[LayerPlan(w, "spectral"), LayerPlan(10, "direct", 0.0, 0.0), LayerPlan(1, "fixed", 0.0, 0.0)] for w in (5, 17, 40)]
    students = [make_student(10, p, seed=i, dtype=torch.float64) for i, p in enumerate(plans)]
    return x, y, students, torch.tensor([0, 1, 0])


def _train(device: str, graph: bool, bad_target: bool = False, epochs: int = 6, poison_at: int | None = None):
    """Train 3 students; `poison_at`: after that epoch, student 2's first layer is set to inf (it fails in the next)."""
    x, y, students, index = _setup(bad_target)
    ens = Ensemble(copy.deepcopy(students)).to(device)
    spec = TrainSpec(lr=0.01, batch_size=40, epochs=epochs, cuda_graph=graph)  # 4 batches, the last one short
    losses = []

    def on_epoch(epoch, loss):
        losses.append(loss)
        if epoch == poison_at:
            with torch.no_grad():
                ens.layers[0].phi[2].fill_(float("inf"))

    log = train_ensemble(ens, x.to(device), y.to(device), index.to(device), spec, [11, 12], on_epoch)
    return ens.cpu(), log, losses


def test_cuda_graph_needs_the_manual_backprop():
    with pytest.raises(ValueError, match="cuda_graph needs backprop=.manual. or .fused."):
        TrainSpec(0.01, 10, 1, backprop="autograd", cuda_graph=True)


def test_cuda_graph_is_ignored_on_the_cpu():
    a, log_a, loss_a = _train("cpu", graph=False)
    b, log_b, loss_b = _train("cpu", graph=True)
    assert loss_a == loss_b and all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@cuda
@pytest.mark.parametrize("bad_target", [False, True])
def test_cuda_training_matches_the_cpu(bad_target):
    ref, ref_log, ref_loss = _train("cpu", graph=False, bad_target=bad_target)
    for graph in (False, True):
        ens, log, losses = _train("cuda", graph=graph, bad_target=bad_target)
        assert torch.equal(log.failed_step, ref_log.failed_step)
        torch.testing.assert_close(losses, ref_loss, rtol=1e-9, atol=1e-12)
        for (name, a), (_, b) in zip(ref.named_parameters(), ens.named_parameters()):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=f"graph={graph} {name}")


@cuda
def test_a_graph_replays_what_eager_cuda_computes():
    eager, _, loss_e = _train("cuda", graph=False, epochs=9)
    graph, _, loss_g = _train("cuda", graph=True, epochs=9)
    torch.testing.assert_close(loss_g, loss_e, rtol=1e-12, atol=0)
    for (name, a), (_, b) in zip(eager.named_parameters(), graph.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15, msg=name)


@cuda
def test_a_failure_inside_a_replayed_epoch_matches_eager():
    """Student 1 fails in epoch 0 (eager warm-up), student 2 in epoch 4 (a replayed graph)."""
    eager, log_e, _ = _train("cuda", graph=False, bad_target=True, epochs=8, poison_at=3)
    graph, log_g, _ = _train("cuda", graph=True, bad_target=True, epochs=8, poison_at=3)
    assert torch.equal(log_e.failed_step, log_g.failed_step) and log_g.failed_step[2] >= 16
    for (name, a), (_, b) in zip(eager.named_parameters(), graph.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15, msg=name, equal_nan=True)


class _Record(TorchDispatchMode):
    """The ATen calls of a region: name, tensor shapes and every non-tensor argument."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        def describe(a):
            if isinstance(a, torch.Tensor):
                return ("tensor", tuple(a.shape), a.dtype)
            if isinstance(a, (torch.UntypedStorage, torch.TypedStorage)):  # memory plumbing: its size, not its bytes
                return ("storage", a.nbytes())
            return repr(a)

        flat = [*args, *(kwargs or {}).values()]
        if func.namespace == "aten":  # not the profiler's markers
            self.calls.append((str(func), [describe(a) if not isinstance(a, (list, tuple)) else [describe(b) for b in a] for a in flat]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backprop", ["manual", "fused"])
def test_an_epoch_is_the_same_calls_every_time_and_never_reads_back(backprop):
    """What a CUDA graph needs, checked on any device: epoch 2 issues exactly the calls of epoch 1 (a
    replay of epoch 1 is epoch 2), with no host read-back (.item(), bool(), nonzero) inside."""
    if backprop == "fused":
        pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # on a CPU the fused kernels run in Triton's interpreter (conftest)
    x, y, students, index = _setup(bad_target=True)
    ens = Ensemble(copy.deepcopy(students)).float().to(dev)
    x, y, index = x.float().to(dev), y.float().to(dev), index.to(dev)
    params = [p for p in ens.parameters() if p.requires_grad]
    run = _Epoch(ens, x, y, index, TrainSpec(0.01, 40, 3, backprop=backprop), adam(params, 0.01))
    calls = []
    for _ in range(3):
        run.perm.copy_(torch.stack([torch.randperm(x.shape[1]) for _t in range(x.shape[0])]).to(dev))
        with _Record() as rec:
            run()
        calls.append(rec.calls)
    assert calls[1] == calls[2] and len(calls[1]) > 100
    assert not [c for c in calls[1] if any(s in c[0] for s in ("_local_scalar_dense", "nonzero", "item"))]
    failed_step, _ = run.failures()  # a student failed, and the state still ran in place: the others counted 12 steps
    assert failed_step[1] >= 0 and int(run.ok_steps.max()) == 12
