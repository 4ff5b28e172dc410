"""`shrink`: one call from a model and its data to the smallest model within a tolerance; and `fit`, the trainer under it."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from torch import nn

from eigenprune import PruneError, ShrinkResult, prune_nodes, shrink
from eigenprune.core import TrainingError, TrainSpec, evaluate, fit

QUICK = TrainSpec(lr=1e-2, batch_size=64, epochs=6)
FT = TrainSpec(lr=5e-3, batch_size=64, epochs=1)
FRACTIONS = (0.5, 0.25, 0.12)


def _blobs(n, seed):
    """4 classes from the signs of two feature sums: a small network suffices, a wide one is given."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long() + 2 * (x[:, 2] > 0).long()


def _mlp(width=32, out=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, out))


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                                      nn.Conv2d(12, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(48, 4)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def _images(n, seed):
    """8x8 noise with one bright quadrant; the class is which one."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.5 * torch.randn(n, 1, 8, 8, generator=g)
    for c, (r, q) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
        x[y == c, :, r : r + 4, q : q + 4] += 1.0
    return x, y


def _rows_are_scans(result: ShrinkResult, strengths, fractions):
    """Each strength's rows: the unpruned model, then the fractions largest first up to the first one out of tolerance."""
    assert result.rows[0]["training"] == "reference"
    for s in strengths:
        rows = [r for r in result.rows[1:] if r["strength"] == s]
        kept = [r["kept"] for r in rows]
        assert kept == [1.0, *sorted(fractions, reverse=True)][: len(kept)]
        assert all(r["within"] for r in rows[1:-1]) and (rows[-1]["within"] or len(rows) > 1)
        if len(kept) < len(fractions) + 1:
            assert not rows[-1]["within"]
        assert all(r["params"] < result.params_full for r in rows[1:])  # physically smaller at every fraction
    within = [r for r in result.rows if r["within"]]
    assert result.params == min(r["params"] for r in within)


def test_mlp_comes_out_smaller_within_tolerance_and_the_users_model_is_untouched():
    train, val = _blobs(600, 0), _blobs(300, 1)
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    lines = []
    result = shrink(model, train, val, tolerance=0.02, training=QUICK, finetune=FT, strengths=(0.3, 3.0), fractions=FRACTIONS,
                    progress=lines.append)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in model)  # not spectralized in place
    assert result.kept < 1 and result.params < result.params_full == sum(p.numel() for p in model.parameters())
    assert result.params == sum(p.numel() for p in result.model.parameters())
    assert result.value == pytest.approx(evaluate(result.model, val)["accuracy"], abs=1e-12)
    assert result.value >= result.reference - 0.02 and result.target == pytest.approx(result.reference - 0.02)
    assert not result.model.training and all(type(m) in (nn.Linear, nn.ReLU) for m in result.model)  # plain layers
    _rows_are_scans(result, (0.3, 3.0), FRACTIONS)
    table = result.to_markdown().splitlines()
    assert table[0].startswith("| training | strength | kept | params | val accuracy, pruned") and len(table) == 2 + len(result.rows)
    assert any("kept 0.5" in line for line in lines) and lines[-1].startswith("chose strength")


def test_the_chosen_model_is_what_prune_nodes_gives_for_its_plan():
    train, val = _blobs(600, 0), _blobs(300, 1)
    result = shrink(_mlp(), train, val, tolerance=0.05, training=QUICK, finetune=None, strengths=(3.0,), fractions=FRACTIONS)
    assert result.plan is not None and result.kept < 1
    again = prune_nodes(result.trained, result.plan, example_inputs=train[0][:2])
    assert sum(p.numel() for p in again.parameters()) == result.params
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(val[0]), result.model(val[0]), rtol=0, atol=0)
    assert all(r["finetuned"] is None for r in result.rows)


def test_cnn_with_batchnorm_from_dataloaders():
    train, val = _images(512, 0), _images(256, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train), batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    val_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*val), batch_size=100)
    torch.manual_seed(0)
    model = TinyCNN()
    before = copy.deepcopy(model.state_dict())  # BatchNorm's running statistics included
    result = shrink(model, loader, val_loader, tolerance=0.03, training=TrainSpec(lr=1e-2, batch_size=64, epochs=4), finetune=FT,
                    strengths=(1.0,), fractions=FRACTIONS)
    assert result.value >= result.reference - 0.03 and result.reference > 0.9
    assert result.value == pytest.approx(evaluate(result.model, val)["accuracy"], abs=1e-12)
    assert result.kept < 1 and result.params < result.params_full
    assert result.model.features[0].out_channels < 12 and result.model.head.out_features == 4  # outputs left alone
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    _rows_are_scans(result, (1.0,), FRACTIONS)


def test_regression_uses_a_relative_tolerance_on_the_loss():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(800, 10, generator=g)
    y = torch.relu(x[:, 0] + x[:, 1]) - 0.5 * x[:, 2]
    train, val = (x[:500], y[:500]), (x[500:], y[500:])
    result = shrink(_mlp(out=1), train, val, tolerance=0.3, task="regression", training=QUICK, finetune=FT, strengths=(1.0,),
                    fractions=FRACTIONS)
    assert result.metric == "loss" and result.value <= result.reference * 1.3 and result.target == pytest.approx(result.reference * 1.3)
    assert result.value == pytest.approx(evaluate(result.model, val, "regression")["loss"], rel=1e-9)


def test_a_numeric_reference_out_of_reach_is_an_error_not_a_result():
    train, val = _blobs(300, 0), _blobs(100, 1)
    with pytest.raises(PruneError, match=r"no model came within tolerance 0 of the reference 1 .*the closest: strength 1, kept"):
        shrink(_mlp(), train, val, tolerance=0.0, reference=1.0, training=TrainSpec(lr=1e-2, batch_size=64, epochs=1), finetune=None,
               strengths=(1.0,), fractions=(0.5,))


def _bad(name):
    x, y = _blobs(64, 0)
    cases = {
        "negative tolerance": ({"tolerance": -0.1}, "tolerance must be a finite number >= 0, got -0.1"),
        "nan tolerance": ({"tolerance": float("nan")}, "tolerance must be a finite number >= 0, got nan"),
        "tolerance in points": ({"tolerance": 1.0}, "tolerance is a share of accuracy (0.01 = one point), so it must be < 1; got 1.0"),
        "task": ({"task": "ranking"}, "task must be 'classification' or 'regression', got 'ranking'"),
        "reference in percent": ({"reference": 95}, "reference is an accuracy in [0, 1] (0.95 = 95%), got 95"),
        "no strengths": ({"strengths": []}, "strengths must be a non-empty list"),
        "bad strength": ({"strengths": [-1.0]}, "a strength must be a finite number >= 0, a dict of spectralize options or 'standard', "
                         "got -1.0"),
        "unknown option": ({"strengths": [{"l2_phi": 0.01, "l2_lamda": 1e-3}]}, "a strength's spectralize options must be among "
                           "train_phi, train_lam_in, train_lam_out, train_bias, l2_phi, l2_lam, l1_lam, group_lasso, include, "
                           "exclude; got l2_lamda"),
        "bad fraction": ({"fractions": [1.5]}, "fractions must be a non-empty list of floats in (0, 1) (kept shares), got [1.5]"),
        "empty data": ({"train": (x[:0], y[:0])}, "the training data is empty"),
        "unequal lengths": ({"train": (x, y[:10])}, "the training data has 64 inputs but 10 targets"),
        "wrong width": ({"val": (x[:, :7], y)}, "the validation data: inputs of shape [64, 7] do not fit Sequential: RuntimeError"),
        "float labels": ({"train": (x, y.float())}, "classification needs integer class targets of shape [B] and logits [B, C]"),
        "label out of range": ({"val": (x, y + 3)}, "class targets must lie in [0, 4) (Sequential has 4 outputs), got 3..6"),
        "one tensor": ({"train": x}, "must be a pair of tensors (x, y) or a DataLoader of (x, y) batches, got one tensor"),
        "progress": ({"progress": "yes"}, "progress must be True, False or a callable taking one line of text, got str"),
        "nan input": ({"train": (x.clone().index_fill_(0, torch.tensor([3]), float("nan")), y)},
                      "spectral training at strength 1: the training loss is nan at epoch 1, batch 1"),
        "nan validation": ({"val": (x.clone().index_fill_(0, torch.tensor([3]), float("nan")), y)},
                           "the validation loss of the as-given model is nan: the validation data hold NaN/inf"),
    }
    return cases[name]


@pytest.mark.parametrize("case", [
    "negative tolerance", "nan tolerance", "tolerance in points", "task", "reference in percent", "no strengths", "bad strength",
    "unknown option", "bad fraction", "empty data", "unequal lengths", "wrong width", "float labels", "label out of range",
    "one tensor", "progress", "nan input", "nan validation"])
def test_bad_input_is_one_line_naming_the_value(case):
    """Each case changes one argument of a valid call; NaN validation inputs give a finite accuracy (argmax of NaN logits)
    but a NaN loss, which stops it."""
    change, message = _bad(case)
    x, y = _blobs(64, 0)
    model = _mlp()
    args = {"train": (x, y), "val": (x, y), "tolerance": 0.01, "training": TrainSpec(lr=1e-2, batch_size=32, epochs=1),
            "finetune": None, "strengths": (1.0,), "fractions": (0.5,), "reference": "as-given", **change}
    with pytest.raises(PruneError) as info:
        shrink(model, args.pop("train"), args.pop("val"), **args)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_fit_calls_its_hooks_and_takes_torch_prunings_sparsity_training():
    """`after_backward=pruner.regularize` (Torch-Pruning's group-norm sparsity training) changes what is learned; `after_epoch`
    sees every epoch's mean loss; the same data as tensors or as a DataLoader of the same batches train alike."""
    x, y = _blobs(256, 0)
    plain, regularized = _mlp(), _mlp()
    pruner = tp.pruner.GroupNormPruner(regularized, x[:2], tp.importance.GroupMagnitudeImportance(p=2), reg=0.1,
                                       ignored_layers=[regularized[4]])
    epochs = []
    fit(plain, (x, y), epochs=3, lr=1e-2, seed=1)
    fit(regularized, (x, y), epochs=3, lr=1e-2, seed=1, after_backward=pruner.regularize,
        after_epoch=lambda e, loss: epochs.append((e, loss)))
    assert [e for e, _ in epochs] == [0, 1, 2] and epochs[2][1] < epochs[0][1]
    assert regularized[0].weight.norm() < plain[0].weight.norm()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)  # unshuffled: the same batches
    a, b = _mlp(), _mlp()
    fit(a, loader, epochs=2, lr=1e-2)
    fit(b, list(loader), epochs=2, lr=1e-2)  # a list of batches is a DataLoader's form too
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_fit_stops_on_a_non_finite_loss_before_it_changes_the_model():
    x, y = _blobs(128, 0)
    x[70] = float("inf")
    model = _mlp()
    start = copy.deepcopy(model.state_dict())
    with pytest.raises(TrainingError, match=r"^the training loss is nan at epoch 1, batch 2 \(lr 0.01\): training diverged"):
        fit(model, (x, y), epochs=1, lr=1e-2, batch_size=64, seed=0, after_epoch=lambda e, loss: None)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(start[k], v)]
    assert changed  # the first batch trained; the NaN batch did not step: every parameter is finite
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_digits_example_runs_in_tiny_form():
    pytest.importorskip("sklearn")
    examples = Path(__file__).resolve().parents[1] / "examples"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(examples.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(examples / "shrink_digits.py"), "--tiny"], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| training | strength | kept | params") and {"reference", "spectral", "standard"} <= {
        r.split(" | ")[0][2:] for r in table[1:]}
    assert "shrink: strength 0.1, kept 0.5" in done.stderr and "test accuracy: chosen" in done.stdout


def test_spectral_training_is_on_the_layers_whose_channels_are_pruned_and_the_default_path_ends_with_standard():
    """The benchmark's winning variant (docs/pruning.md): the head, whose outputs are the model's, stays plain."""
    from eigenprune import SpectralLinear
    from eigenprune.pruning.shrink import DEFAULT_STRENGTHS

    train, val = _blobs(600, 0), _blobs(300, 1)
    result = shrink(_mlp(), train, val, tolerance=0.05, training=QUICK, finetune=None, strengths=(3.0,), fractions=FRACTIONS)
    kinds = [type(m) for m in result.trained.modules() if isinstance(m, (nn.Linear, SpectralLinear))]
    assert kinds == [SpectralLinear, SpectralLinear, nn.Linear]
    everything = shrink(_mlp(), train, val, tolerance=0.05, training=QUICK, finetune=None,
                        strengths=({"l2_phi": 0.03, "l2_lam": 1.5e-3, "include": ["0", "2", "4"]},), fractions=(0.5,))
    assert all(isinstance(m, SpectralLinear) for m in everything.trained.modules() if isinstance(m, (nn.Linear, SpectralLinear)))
    assert DEFAULT_STRENGTHS[-1] == "standard"
