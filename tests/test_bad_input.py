"""Bad input, everywhere: one `error:` line, exit code 2, and nothing already stored is touched."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import TINY, edit_safetensors_header
from eigenprune.cli import app
from eigenprune.core.plans import LayerPlan, make_student
from eigenprune.experiments.config import ConfigError, parse_config
from eigenprune.experiments.grid import plan_chunks
from eigenprune.experiments.plan import check_memory, chunk_memory
from eigenprune.experiments.runner import run_experiment
from eigenprune.pruning.checkpoint import CheckpointError, load_model, save_model

runner = CliRunner()


def snapshot(folder):
    """Every file under `folder` -> (bytes, mtime_ns)."""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory):
    """A finished tiny run folder (never modified: tests copy it)."""
    return run_experiment(parse_config({**TINY, "workers": 1}), tmp_path_factory.mktemp("stored") / "run", quiet=True)


@pytest.mark.parametrize("text, message", [
    ("trials: 0", "trials: Input should be greater than 0 (got 0)"),
    ("student: {widths: []}", "student.widths: List should have at least 1 item"),
    ("data: {n_train: -5}", "data.n_train: Input should be greater than 0 (got -5)"),
    ("spectral: {lr: .nan}", "spectral.lr: Input should be a finite number (got nan)"),
    ("direct: {lr: .inf}", "direct.lr: Input should be a finite number (got inf)"),
    ("seed: -1", "seed: Input should be greater than or equal to 0 (got -1)"),
    ("name: ../escape", "name: String should match pattern"),
    ("data: 3", "data: Input should be a valid dictionary"),
    ("dtype: float16", "dtype: Input should be 'float32' or 'float64'"),
    ("methods: []", "methods: List should have at least 1 item"),
    ("max_memory_gb: 0", "max_memory_gb: Input should be greater than 0"),
    ("workers: -2", "workers: Input should be greater than or equal to 0"),
    ("spectral: {epochs: 2.5}", "spectral.epochs: Input should be a valid integer, got a number with a fractional part"),
    ("!!python/object/apply:os.system ['echo hacked']", "not valid YAML at line 1: could not determine a constructor"),
    (b"trials: \xff\xfe", "not a UTF-8 text file (byte 8 is b'\\xff')"),
])
def test_bad_configs_are_one_line_and_create_nothing(tmp_path, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert message in one_line_error(["run", cfg, "--out", tmp_path / "run", "--quiet"])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["run", "--bogus"], "No such option: --bogus"),
    (["run", "--workers", "-1"], "Invalid value for '--workers'"),
    (["run", "--workers", "two"], "Invalid value for '--workers'"),
    (["run", "a.yaml", "b.yaml"], "unexpected extra argument"),
    (["run", "--backend", "spark"], "--backend must be local or ray, got 'spark'"),
    (["run", "--set", "trials"], "--set takes KEY=VALUE"),
    (["run", "--set", "trials=2", "--set", "trials.x=1"], "cannot set trials.x: trials is not a section (it holds 2)"),
    (["run", "--set", "student.x=1"], "student.x: unknown key (got 1)"),
    (["run", "--set", "bogus=1"], "bogus: unknown key (got 1)"),
    (["run", "--device", "tpu"], "device: must be cpu, cuda, cuda:N or auto (got 'tpu')"),
    (["run", "."], "config path . is a folder, not a file"),
    (["report"], "Missing argument"),
    (["nosuch"], "No such command 'nosuch'"),
])
def test_bad_command_lines_are_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert message in one_line_error(args)
    assert list(tmp_path.iterdir()) == []


def test_memory_planner_refuses_before_training_and_touches_nothing(tmp_path, stored_run):
    cfg = parse_config({**TINY, "max_memory_gb": 0.01})
    with pytest.raises(ConfigError, match=r"chunk spectral-w6_12 \(4 students\) needs about 0\.4\d* GB, more than the 0\.01 GB limit"):
        check_memory(cfg, plan_chunks(cfg), 1, __import__("torch").device("cpu"))
    err = one_line_error(["run", "--set", "student.widths=[10000000]", "--set", "trials=30", "--out", tmp_path / "huge", "--quiet"])
    # the time bound splits the chunk into single trials first; one of them does not fit either
    assert "chunk spectral-w10000000-tr0_0 (1 students) needs about" in err and "% of the" in err and "available on cpu" in err
    assert not (tmp_path / "huge").exists()
    copy = tmp_path / "run"
    shutil.copytree(stored_run, copy)
    shutil.rmtree(copy / "chunks" / "direct-w6_12")  # an interrupted run: one chunk left to train
    before = snapshot(copy)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    err = one_line_error(["run", tmp_path / "tiny.yaml", "--out", copy, "--set", "max_memory_gb=0.001", "--quiet"])
    assert "chunk direct-w6_12" in err and "max_memory_gb 0.001" in err
    assert snapshot(copy) == before


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak memory")
def test_memory_estimate_is_within_a_factor_of_two_of_the_measured_peak():
    body = {"trials": 8, "methods": ["spectral"], "student": {"widths": [800]}, "data": {"n_train": 3000, "n_test": 3000},
            "spectral": {"epochs": 1, "batch_size": 100}, "save_students": False}
    child = """
import json, sys, torch
from eigenprune.experiments.config import parse_config
from eigenprune.experiments.data import make_data
from eigenprune.experiments.grid import plan_chunks
from eigenprune.experiments.measure import train_chunk
from eigenprune.experiments.progress import Progress
torch.set_num_threads(1)
cfg = parse_config(json.loads(sys.argv[1]))
open("/proc/self/clear_refs", "w").write("5")  # reset the resident-set high-water mark
train_chunk(cfg, plan_chunks(cfg)[0], make_data(cfg), torch.device("cpu"), Progress(quiet=True))
print([int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")][0])
"""
    out = subprocess.run([sys.executable, "-c", child, json.dumps(body)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    peak = int(out.stdout)
    cfg = parse_config(body)
    estimate = chunk_memory(cfg, plan_chunks(cfg)[0])
    assert 0.5 < estimate / peak < 2, (estimate, peak)


def _model_file(tmp_path):
    model = make_student(10, [LayerPlan(6, "spectral"), LayerPlan(4, "direct", 0.0, 0.0), LayerPlan(1, "fixed", 0.0, 0.0)], seed=1)
    return save_model(model, tmp_path / "good.safetensors").read_bytes()


def _meta(key, value):
    return lambda h: h["__metadata__"].__setitem__(key, value)


def _arch(change):
    def edit(h):
        arch = json.loads(h["__metadata__"]["eigenprune"])
        change(arch)
        h["__metadata__"]["eigenprune"] = json.dumps(arch)
    return edit


DAMAGE = {
    "empty file": (lambda b: b"", "not a readable safetensors file (Error while deserializing header: header too small)"),
    "cut in the header": (lambda b: b[:40], "not a readable safetensors file"),
    "cut in the data": (lambda b: b[:-16], "not a readable safetensors file"),
    "garbage bytes": (lambda b: bytes(range(256)) * 4, "not a safetensors file (it does not start with a safetensors header)"),
    "text file": (lambda b: b"hello, not a checkpoint\n", "not a safetensors file (it starts with text)"),
    "architecture not JSON": (lambda b: edit_safetensors_header(b, _meta("eigenprune", "[{")),
                              "corrupted checkpoint ('eigenprune' metadata: Expecting"),
    "architecture not a list": (lambda b: edit_safetensors_header(b, _meta("eigenprune", "{}")), "architecture is not a list of layers"),
    "unknown layer": (lambda b: edit_safetensors_header(b, _meta("eigenprune", '[{"type": "conv"}]')),
                      "unknown layer type in architecture: 'conv'"),
    "layer lacks a key": (lambda b: edit_safetensors_header(b, _arch(lambda a: a[0].pop("in"))),
                          "layer 0 (spectral): 'in' must be a positive integer, got None"),
    "layer wider than its tensors": (lambda b: edit_safetensors_header(b, _arch(lambda a: a[0].update(out=7))),
                                     "layer 0 (spectral) is 10→7, but the tensor 0.phi is [6, 10]"),
    "extra not JSON": (lambda b: edit_safetensors_header(b, _meta("extra", "{")), "corrupted checkpoint"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoints_are_one_line_errors_and_stay_as_they_were(tmp_path, case):
    damage, message = DAMAGE[case]
    path = tmp_path / "student.safetensors"
    path.write_bytes(damage(_model_file(tmp_path)))
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)
    assert snapshot(tmp_path) == before


def test_foreign_missing_and_folder_checkpoints(tmp_path):
    save_file({"w": __import__("torch").zeros(3)}, str(tmp_path / "plain.safetensors"))
    for path, message in ((tmp_path / "plain.safetensors", "a safetensors file without eigenprune's architecture"),
                          (tmp_path / "nope.safetensors", "checkpoint not found"), (tmp_path, "is a folder, not a file")):
        with pytest.raises(CheckpointError, match=message.replace("(", r"\(")):
            load_model(path)


def _parquet_without_columns(p):
    pd.DataFrame({"x": [1]}).to_parquet(p)


REPORT_DAMAGE = {
    "results.parquet missing": (lambda d: (d / "results.parquet").unlink(), "is incomplete: results.parquet is missing"),
    "curves.parquet missing": (lambda d: (d / "curves.parquet").unlink(), "is incomplete: curves.parquet is missing"),
    "importance.parquet missing": (lambda d: (d / "importance.parquet").unlink(), "is incomplete: importance.parquet is missing"),
    "config.yaml missing": (lambda d: (d / "config.yaml").unlink(), "is incomplete: config.yaml is missing"),
    "summary.json missing": (lambda d: (d / "summary.json").unlink(), "is incomplete: summary.json is missing"),
    "results.parquet truncated": (lambda d: (d / "results.parquet").write_bytes((d / "results.parquet").read_bytes()[:300]),
                                  "results.parquet is unreadable"),
    "results.parquet of another tool": (lambda d: _parquet_without_columns(d / "results.parquet"), "lacks columns ['teacher_index'"),
    "config.yaml garbage": (lambda d: (d / "config.yaml").write_text("trials: [1,\n"), "config.yaml is unreadable (ParserError)"),
    "config.yaml invalid": (lambda d: (d / "config.yaml").write_text("trials: -1\n"), "config.yaml is unreadable (ValidationError)"),
    "summary.json not JSON": (lambda d: (d / "summary.json").write_text("{"), "summary.json is not valid JSON"),
    "summary.json a list": (lambda d: (d / "summary.json").write_text("[]"), "summary.json should hold a JSON object, got list"),
    "summary.json without groups": (lambda d: (d / "summary.json").write_text("{}"), "summary.json has no list of groups"),
}


@pytest.mark.parametrize("case", list(REPORT_DAMAGE))
def test_report_on_a_damaged_run_folder_is_one_line_and_touches_nothing(tmp_path, stored_run, case):
    damage, message = REPORT_DAMAGE[case]
    run = tmp_path / "run"
    shutil.copytree(stored_run, run)
    damage(run)
    before = snapshot(run)
    assert message in one_line_error(["report", run])
    assert snapshot(run) == before


def test_report_on_no_folder_and_run_on_a_damaged_chunk(tmp_path, stored_run):
    assert "run folder not found" in one_line_error(["report", tmp_path / "nope"])
    (tmp_path / "file").write_text("x")
    assert "run folder not found" in one_line_error(["report", tmp_path / "file"])
    run = tmp_path / "run"
    shutil.copytree(stored_run, run)
    (run / "chunks" / "direct-w6_12" / "curves.parquet").write_bytes(b"PAR1 damaged on disk")
    before = snapshot(run)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    err = one_line_error(["run", tmp_path / "tiny.yaml", "--out", run, "--quiet", "--workers", "1"])
    assert "chunks/direct-w6_12/curves.parquet is unreadable" in err and "delete" in err
    assert snapshot(run) == before


def test_fused_backprop_on_a_cpu_is_refused_before_anything_is_written(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # no interpreter: a real CPU run
    proc = subprocess.run([sys.executable, "-m", "eigenprune", "run", "--set", "backprop=fused", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and not (tmp_path / "run").exists()
    expected = "error: backprop 'fused' runs on a CUDA device, not cpu (TRITON_INTERPRET=1 emulates it, slowly)"
    assert proc.stderr.strip().splitlines() == [expected]
    assert one_line_error(["run", "--set", "backprop=fused", "--set", "dtype=float64", "--out", tmp_path / "r2"]).startswith(
        "error: default config: invalid config: config: backprop: fused runs in float32, not float64")
    device = ["--device", "cuda"] if torch.cuda.is_available() else []  # without a GPU, conftest turns on Triton's interpreter
    wide = one_line_error(["run", "--set", "backprop=fused", "--set", "data.input_dim=200", *device, "--out", tmp_path / "r3"])
    assert wide == "error: backprop 'fused' supports up to 128 inputs and second-layer nodes, got 200 and 10; use backprop: manual\n"
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()


def test_fused_backprop_is_checked_before_a_ray_run_starts(tmp_path):
    cfg = parse_config({**TINY, "backprop": "fused", "data": {**TINY["data"], "input_dim": 200}})
    with pytest.raises(ConfigError, match="up to 128 inputs and second-layer nodes, got 200"):
        run_experiment(cfg, tmp_path / "run", backend="ray")
    assert not (tmp_path / "run").exists()
