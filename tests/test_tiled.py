"""The tiled first layer (`batched.tiled`, `tile` in the config) against the eager hand-written step."""

import copy

import pytest
import torch

from eigenprune.batched import tiled
from eigenprune.batched.ensemble import Ensemble, ManualStep, bmm
from eigenprune.batched.train import train_ensemble
from eigenprune.core.plans import LayerPlan, make_student
from eigenprune.core.training import TrainSpec, train_alone
from eigenprune.experiments.builders import make_teacher
from eigenprune.experiments.config import ConfigError, load_config, parse_config
from eigenprune.experiments.data import TrialData
from eigenprune.experiments.grid import plan_chunks
from eigenprune.experiments.measure import TILE_FROM, chunk_tile, prepare_chunk


def _plans(width, kind):
    return [LayerPlan(width, kind), LayerPlan(10, "direct", 0.0, 0.0), LayerPlan(1, "fixed", 0.0, 0.0)]


def _data(trials=2, n=120):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(trials, n, 10, generator=g)
    return x, make_teacher(10, [20, 10], 3, torch.float32)(x).squeeze(-1)


def _eager_first_layer(x, w1, w2, d2):
    h = bmm(x, w1.transpose(1, 2)).relu_()
    dh = torch.ops.aten.threshold_backward(bmm(d2, w2, like=h), h, 0)
    return bmm(h, w2.transpose(1, 2)), bmm(dh.transpose(1, 2), x), bmm(d2.transpose(1, 2), h)


@pytest.mark.parametrize("size,exact", [(10**9, True), (2 * 24 * 40, True), (24 * 40, True), (100, False), (1, False)])
def test_tiles_compute_the_eager_first_layer(size, exact):
    """Tiles of whole students equal the eager products bit for bit; tiles of part of the rows to float32 rounding.
    The gradient of W1 keeps the eager step's (transposed) layout."""
    g = torch.Generator().manual_seed(0)
    x, d2 = torch.randn(5, 24, 10, generator=g), torch.randn(5, 24, 10, generator=g)
    w1, w2 = torch.randn(5, 40, 10, generator=g), torch.randn(5, 10, 40, generator=g)
    want = _eager_first_layer(x, w1, w2, d2)
    t = tiled.Tiled(size)
    got = (t.forward(x, w1, w2), *t.backward(x, w1, w2, d2))
    for a, b in zip(got, want):
        assert a.stride() == b.stride()
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_tile_shapes():
    assert tiled.tiles(30, 300, 1500, tiled.TILE) == (1, 300)  # the paper's widest spectral chunk: a student a tile
    assert tiled.tiles(30, 500, 1500, tiled.TILE) == (1, 250)  # direct: two blocks of rows
    assert tiled.tiles(60, 300, 60, tiled.TILE) == (29, 300)
    assert tiled.tiles(3, 7, 5, 1) == (1, 1)


@pytest.mark.parametrize("kind", ["spectral", "direct"])
@pytest.mark.parametrize("size", [2 * 24 * 40, 50])
def test_tiled_training_equals_training_each_student_alone(kind, size):
    """The existing oracle (rel. error <= 1e-5 after 50 Adam steps), with the first layer in tiles of two whole
    students, and in tiles of 2 rows of one student."""
    x, y = _data()
    students = [make_student(10, _plans(w, kind), seed=w) for w in (5, 17, 40)]
    trial_index, shuffle = torch.tensor([0, 1, 0]), [101, 202]
    spec = TrainSpec(lr=0.01, batch_size=24, epochs=10, tile=size)
    ens = Ensemble([copy.deepcopy(s) for s in students])
    train_ensemble(ens, x, y, trial_index, spec, shuffle)
    for s, student in enumerate(students):
        train_alone(student, x[trial_index[s]], y[trial_index[s]], spec, shuffle[trial_index[s]])
        for (name, alone), (_, other) in zip(student.named_parameters(), ens.student(s).named_parameters()):
            err = (alone - other).norm() / alone.norm().clamp_min(1e-12)
            assert err <= 1e-5, f"student {s} {name}: rel. error {err:.2e}"


def test_tiled_training_of_whole_students_is_the_eager_training_bit_for_bit_with_a_failing_student():
    x, y = _data()
    students = [make_student(10, _plans(w, "spectral"), seed=w) for w in (6, 9, 12)]
    with torch.no_grad():  # student 1's loss overflows to inf at once
        students[1][0].lam_out.fill_(1e30)
    logs, ens = [], []
    for tile in (0, 24 * 12):
        e = Ensemble([copy.deepcopy(s) for s in students])
        logs.append(train_ensemble(e, x, y, torch.tensor([0, 0, 1]), TrainSpec(0.01, 24, 3, tile=tile), [1, 2]))
        ens.append(e)
    assert logs[0].failed_step.tolist() == logs[1].failed_step.tolist() == [-1, 0, -1]
    for a, b in zip(ens[0].parameters(), ens[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_a_tiled_step_needs_two_layers_without_a_first_bias():
    with pytest.raises(ValueError, match="at least two layers"):
        ManualStep(Ensemble([make_student(10, [LayerPlan(1, "direct")], 0)]), "regression", tile=100)
    with pytest.raises(ValueError, match="fused or tiled"):
        ManualStep(Ensemble([make_student(10, _plans(4, "spectral"), 0)]), "regression", fused=True, tile=100)
    with pytest.raises(ValueError, match="tile applies to backprop='manual'"):
        TrainSpec(0.01, 8, 1, backprop="autograd", tile=100)


def test_tile_auto_picks_the_wide_cpu_chunks_only():
    paper = load_config("paper", {})
    cpu = torch.device("cpu")
    layers = Ensemble([make_student(10, _plans(4, "spectral"), 0)]).layers
    assert chunk_tile(paper, 30, 1500, 300, cpu, layers) == tiled.TILE
    assert chunk_tile(paper, 30, 500, 500, cpu, layers) == tiled.TILE
    assert chunk_tile(paper, 30, 200, 300, cpu, layers) == 0 and 30 * 200 * 300 <= TILE_FROM
    assert chunk_tile(paper, 30, 1500, 300, torch.device("cuda"), layers) == 0
    assert chunk_tile(parse_config({"compile_step": True}), 30, 1500, 300, cpu, layers) == 0
    assert chunk_tile(parse_config({"tile": 0}), 30, 1500, 300, cpu, layers) == 0
    assert chunk_tile(parse_config({"tile": 777}), 1, 2, 3, cpu, layers) == 777
    for name in (None, "cpu-paper"):  # the quick run's and cpu-paper's chunks keep the eager step
        cfg = load_config(name, {})
        x = torch.randn(cfg.trials, cfg.data.n_train, 10)
        data = TrialData(x, x[..., 0], x[:, :1], x[:, :1, 0], "regression", 1)
        for chunk in plan_chunks(cfg):
            assert prepare_chunk(cfg, chunk, data, cpu).spec.tile == 0, chunk.id


def test_tile_config_is_checked_and_leaves_the_digest():
    assert parse_config({"tile": 4096}).digest() == parse_config({}).digest() == parse_config({"tile": "auto"}).digest()
    for bad in ({"tile": 4096, "compile_step": True}, {"tile": 4096, "backprop": "autograd"}, {"tile": -1}, {"tile": "big"}):
        with pytest.raises(ConfigError):
            parse_config(bad)
