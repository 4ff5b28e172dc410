import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from conftest import TINY
from eigenprune.cli import app
from eigenprune.core.plans import LayerPlan, make_student
from eigenprune.core.structure import layer_sizes
from eigenprune.experiments.config import Config
from eigenprune.experiments.data import make_data
from eigenprune.experiments.runner import run_experiment
from eigenprune.pruning.chain import mask_nodes, select_nodes
from eigenprune.pruning.checkpoint import CheckpointError, load_model, save_model

runner = CliRunner()


def _run(args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stderr, result.stdout


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny finished run (2 trials x widths 6, 12 x spectral/direct), trained in this process."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = Config.model_validate({**TINY, "name": "tiny", "workers": 1, "spectral": {"epochs": 8, "batch_size": 50}})
    run_experiment(cfg, out, quiet=True)
    return out


def _student_path(run_dir, method="spectral", width=12, trial=1):
    return next(run_dir.glob(f"chunks/*/students/{method}-N{width}-t{trial}.safetensors"))


def _student(tmp_path, width=40):
    student = make_student(10, [LayerPlan(width), LayerPlan(10, "direct"), LayerPlan(1, "fixed")], seed=2)
    return student, save_model(student, tmp_path / "student.safetensors", {"trial": 0})


def test_prune_by_count_writes_a_smaller_model_equal_to_the_masked_one(tmp_path):
    student, path = _student(tmp_path)
    code, err, out = _run(["prune", path, "--keep", "7", "--layers", "0", "--out", tmp_path / "small.safetensors"])
    assert code == 0, err
    assert "10→40→10→1 pruned to 10→7→10→1" in out
    small, extra = load_model(tmp_path / "small.safetensors")
    assert layer_sizes(small) == [10, 7, 10, 1] and extra["keep"] == "7" and extra["trial"] == 0
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in small)
    x = torch.randn(300, 10)
    with torch.no_grad():
        want = mask_nodes(student, select_nodes(student, {0: 7}))(x)
        assert float((small(x) - want).norm() / want.norm()) <= 1e-6
    code, _, out = _run(["prune", path, "--keep", ">0.5", "--out", tmp_path / "t.safetensors"])
    assert code == 0 and "pruned to 10→" in out


def test_prune_auto_regenerates_the_runs_data(run_dir, tmp_path):
    path = _student_path(run_dir)
    code, err, out = _run(["prune", path, "--keep", "auto", "--layers", "0", "--rtol", "0.1", "--out", tmp_path / "a.safetensors"])
    assert code == 0, err
    assert "validation loss" in out
    small, _ = load_model(tmp_path / "a.safetensors")
    model, _ = load_model(path)
    cfg = Config.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    data = make_data(cfg)
    kept = select_nodes(model, "auto", layers=[0], x_val=data.x_test[1], y_val=data.y_test[1], rtol=0.1)
    assert layer_sizes(small)[1] == len(kept[0]) <= 12
    with torch.no_grad():
        full = float(((model(data.x_test[1]).squeeze(-1) - data.y_test[1]) ** 2).mean())
        pruned = float(((small(data.x_test[1]).squeeze(-1) - data.y_test[1]) ** 2).mean())
    assert pruned <= full * 1.1 + 1e-6
    code, err, out2 = _run(["prune", path, "--keep", "auto", "--layers", "0", "--rtol", "0.1", "--data", run_dir,
                            "--out", tmp_path / "b.safetensors"])
    assert code == 0, err
    assert out2.split(";")[0] == out.split(";")[0]  # the same decision with --data given explicitly


def test_prune_auto_with_a_data_file_and_without_data(tmp_path):
    student, path = _student(tmp_path)
    x = torch.randn(500, 10)
    with torch.no_grad():
        y = student(x).squeeze(-1)
    save_file({"x": x, "y": y}, str(tmp_path / "val.safetensors"))
    code, err, out = _run(["prune", path, "--keep", "auto", "--atol", "0.05", "--data", tmp_path / "val.safetensors",
                           "--out", tmp_path / "s.safetensors"])
    assert code == 0, err
    small, _ = load_model(tmp_path / "s.safetensors")
    with torch.no_grad():
        assert float(((small(x).squeeze(-1) - y) ** 2).mean()) <= 0.05 + 1e-6
    assert layer_sizes(small)[1] < 40
    code, err, _ = _run(["prune", path, "--keep", "auto"])
    assert code == 2 and err.startswith("error: --keep auto needs validation data") and err.count("\n") == 1
    save_file({"x": x}, str(tmp_path / "bad.safetensors"))
    code, err, _ = _run(["prune", path, "--keep", "auto", "--data", tmp_path / "bad.safetensors"])
    assert code == 2 and "needs tensors named x [P, D] and y [P], found ['x']" in err
    save_file({"x": torch.randn(50, 7), "y": torch.randn(50)}, str(tmp_path / "narrow.safetensors"))
    code, err, _ = _run(["prune", path, "--keep", "auto", "--data", tmp_path / "narrow.safetensors"])
    assert code == 2 and "validation data must be x [P, 10] and y [P], got x [50, 7]" in err and err.count("\n") == 1
    save_file({"x": x.double(), "y": y.double()}, str(tmp_path / "f64.safetensors"))  # another dtype is cast, not a crash
    code, err, _ = _run(["prune", path, "--keep", "auto", "--atol", "0.05", "--data", tmp_path / "f64.safetensors",
                         "--out", tmp_path / "f64-small.safetensors"])
    assert code == 0, err
    code, err, _ = _run(["prune", path, "--keep", "3", "--out", tmp_path / "nowhere" / "s.safetensors"])
    assert code == 2 and "folder" in err and "does not exist" in err
    code, err, _ = _run(["export", path, "--onnx", tmp_path / "nowhere" / "m.onnx"])
    assert code == 2 and "does not exist" in err


@pytest.mark.parametrize("args, message", [
    (["--keep", "0"], "keep must be a count >= 1"),
    (["--keep", "50", "--layers", "0"], "keep=50 exceeds the width 40 of layer 0"),
    (["--keep", "5", "--layers", "0,x"], "--layers takes comma-separated hidden layer indices"),
    (["--keep", "5", "--layers", "3"], "hidden layer index in 0..1, got 3"),
])
def test_bad_prune_arguments_are_one_line_errors(tmp_path, args, message):
    _, path = _student(tmp_path)
    code, err, _ = _run(["prune", path, *args])
    assert code == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1


def _corruptions(path, tmp_path):
    raw = path.read_bytes()
    cases = {"truncated data": raw[: len(raw) - 100], "truncated header": raw[:20], "garbage": b"\x00\x01not a file" * 50, "empty": b""}
    for name, data in cases.items():
        bad = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        bad.write_bytes(data)
        yield name, bad


def test_corrupted_or_truncated_checkpoints_are_one_line_errors(tmp_path):
    _, path = _student(tmp_path)
    for name, bad in _corruptions(path, tmp_path):
        with pytest.raises(CheckpointError):
            load_model(bad)
        for cmd in (["prune", bad, "--keep", "3"], ["export", bad, "--onnx", tmp_path / "x.onnx"]):
            code, err, _ = _run(cmd)
            assert code == 2, (name, cmd[0], err)
            assert err.startswith("error: ") and err.count("\n") == 1 and str(bad) in err, (name, err)
    code, err, _ = _run(["prune", tmp_path / "missing.safetensors", "--keep", "3"])
    assert code == 2 and "checkpoint not found" in err


def test_export_onnx_matches_torch_with_a_dynamic_batch(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    student, path = _student(tmp_path)
    code, err, _ = _run(["prune", path, "--keep", "9", "--out", tmp_path / "small.safetensors"])
    assert code == 0, err
    for source in (path, tmp_path / "small.safetensors"):
        code, err, out = _run(["export", source, "--onnx", tmp_path / "m.onnx", "--force"])  # the second replaces our first
        assert code == 0, err
        assert "max relative difference" in out
        model, _ = load_model(source)
        session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].shape == ["batch", 10]
        for batch in (1, 37, 2048):
            x = torch.randn(batch, 10)
            got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
            with torch.no_grad():
                torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)


def test_export_refuses_what_onnx_cannot_express(tmp_path):
    pytest.importorskip("onnx")
    path = save_model(nn.Sequential(nn.Linear(3, 4), nn.Softplus(), nn.Linear(4, 1)), tmp_path / "sp.safetensors")
    code, err, _ = _run(["export", path, "--onnx", tmp_path / "sp.onnx"])
    assert code == 2 and "cannot export Softplus" in err and not (tmp_path / "sp.onnx").exists()


def test_prune_auto_uses_the_checkpoints_teacher_and_held_out_validation_part(tmp_path):
    """A regularization-path run with two teachers: auto must use teacher 1's held-out validation patterns."""

    cfg = Config.model_validate({
        **TINY, "name": "path", "workers": 1, "trials": 1, "methods": ["spectral"], "student": {"widths": [8]},
        "regularization": {"mode": "path", "multipliers": [1.0, 2.0]},
        "teachers": [{"widths": [20, 10]}, {"widths": [5, 4], "seed": 7}],
    })
    run = tmp_path / "path"
    run_experiment(cfg, run, quiet=True)
    path = next(run.glob("chunks/*-t1/students/spectral-N8-t0-s2.safetensors"))
    code, err, out = _run(["prune", path, "--keep", "auto", "--layers", "0", "--out", tmp_path / "p.safetensors"])
    assert code == 0, err
    model, _ = load_model(path)
    want = {}
    for teacher in (0, 1):
        c = cfg.for_teacher(teacher)
        data = make_data(c)
        n_fit = c.regularization.n_fit(data.x_train.shape[1])
        assert n_fit < data.x_train.shape[1]
        with torch.no_grad():
            want[teacher] = float(((model(data.x_train[0, n_fit:]).squeeze(-1) - data.y_train[0, n_fit:]) ** 2).mean())
    assert f"validation loss {want[1]:.4g} →" in out
    assert f"{want[0]:.4g}" != f"{want[1]:.4g}"  # teacher 0's data would have given another number
