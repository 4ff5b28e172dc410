"""Backends: a Ray run equals a local run; a missing Ray or an unreachable cluster is one clear line."""

import os
import shutil
import subprocess
import sys
import tempfile
from importlib.util import find_spec

import pandas as pd
import pytest
import ray
import torch
import yaml
from typer.testing import CliRunner

from conftest import TINY
from eigenprune.cli import app
from eigenprune.experiments.config import parse_config
from eigenprune.experiments.runner import run_experiment
from eigenprune.pruning.checkpoint import load_model

runner = CliRunner()


@pytest.fixture
def local_ray(monkeypatch):
    """A private Ray instance (2 CPUs, no dashboard), its files in a short temp dir (socket paths are limited)."""
    tmp = tempfile.mkdtemp(prefix="ray-")
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))  # workers import this eigenprune
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def test_ray_backend_gives_the_local_results(tmp_path, local_ray):
    cfg = parse_config({**TINY, "workers": 1})
    local = run_experiment(cfg, tmp_path / "local", quiet=True)
    remote = run_experiment(cfg, tmp_path / "ray", quiet=True, backend="ray")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local", "ray"]  # nothing written beside the run folders
    for name in ("results", "curves", "importance"):
        a, b = pd.read_parquet(local / f"{name}.parquet"), pd.read_parquet(remote / f"{name}.parquet")
        assert len(a) > 0
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, atol=1e-7)
    students = sorted(p.relative_to(local) for p in local.glob("chunks/*/students/*.safetensors"))
    assert len(students) == 8 and students == sorted(p.relative_to(remote) for p in remote.glob("chunks/*/students/*.safetensors"))
    for rel in students:
        for x, y in zip(load_model(local / rel)[0].parameters(), load_model(remote / rel)[0].parameters()):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    manifest = pd.read_json(remote / "manifest.json", typ="series")
    assert manifest["backend"] == "ray" and manifest["ray"] == ray.__version__


def test_cli_ray_run_writes_only_its_run_folder_and_temp_dirs(tmp_path):
    """`eigenprune run --backend ray` starting its own Ray: HOME and the working folder get nothing else."""
    home, cwd, ray_tmp = tmp_path / "home", tmp_path / "cwd", tempfile.mkdtemp(prefix="ray-")
    home.mkdir()
    cwd.mkdir()
    (cwd / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    env = {**os.environ, "HOME": str(home), "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        proc = subprocess.run([sys.executable, "-m", "eigenprune", "run", "tiny.yaml", "--backend", "ray", "--workers", "2",
                               "--out", "run", "--quiet"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr
    assert list(home.iterdir()) == [] and sorted(p.name for p in cwd.iterdir()) == ["run", "tiny.yaml"]
    assert len(pd.read_parquet(cwd / "run" / "results.parquet")) == 8


def test_missing_ray_and_unreachable_cluster_are_one_line_errors(tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["run", "--set", "trials=1", "--out", str(out), "--quiet", "--backend", "ray"]
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))  # as if not installed
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr == "error: the ray backend needs Ray, which is not installed: pip install 'eigenprune[ray]'\n"
    monkeypatch.undo()
    result = runner.invoke(app, [*args, "--address", "127.0.0.1:1"])
    assert result.exit_code == 2 and result.stderr.startswith("error: cannot reach Ray at 127.0.0.1:1") and result.stderr.count("\n") == 1
    result = runner.invoke(app, [*args, "--address", "not-an-address"])
    assert result.exit_code == 2 and "Ray address must be auto, HOST:PORT or ray://HOST:PORT" in result.stderr
    result = runner.invoke(app, ["run", "--out", str(out), "--address", "127.0.0.1:6379"])
    assert result.exit_code == 2 and result.stderr == "error: --address is only used with --backend ray\n"
    assert not out.exists()


_FORK_WHILE_WRITING = r"""
import os, sys, threading, time
from eigenprune.experiments.backends import _fresh_streams

r, w = os.pipe()
os.dup2(w, 2)  # stderr is a pipe nobody reads yet: a thread's big write blocks inside it, holding the stream's lock
sys.stderr = open(2, "w", buffering=1, closefd=False)
threading.Thread(target=lambda: sys.stderr.write("x" * (1 << 20) + "\n"), daemon=True).start()
time.sleep(0.5)
pid = os.fork()
if pid == 0:
    threading.Thread(target=lambda: [os.read(r, 1 << 16) for _ in iter(int, 1)], daemon=True).start()  # drain
    _fresh_streams()
    done = []
    t = threading.Thread(target=lambda: (sys.stderr.write("a warning\n"), sys.stderr.flush(), done.append(1)), daemon=True)
    t.start()
    t.join(5)
    os._exit(0 if done else 3)
os.write(1, str(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])).encode())
os._exit(0)  # not a normal exit: it would flush stderr, whose lock the blocked thread holds
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are forked on Linux only")
def test_fresh_streams_let_a_child_forked_during_a_write_write():
    """The progress bar's thread may be inside a write to stderr when the workers fork. The child's copy of the
    stream keeps that write's lock, held by a thread the child does not have: without `_fresh_streams` the same
    script exits 3 (blocked) on CPython 3.11 (measured); with it the child writes."""
    out = subprocess.run([sys.executable, "-c", _FORK_WHILE_WRITING], capture_output=True, timeout=120)
    assert out.stdout.decode() == "0", out.stderr.decode()[-2000:]


def _stderr_descriptor(chunk, progress):
    return sys.stderr.fileno()


class _Unit:
    def __init__(self, name):
        self.id = name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are forked on Linux only")
def test_forked_workers_write_through_their_own_streams():
    from eigenprune.experiments.backends import run_local
    from eigenprune.experiments.progress import Progress

    seen = []
    run_local(_stderr_descriptor, [_Unit("a"), _Unit("b")], seen.append, Progress(quiet=True), workers=2)
    assert len(seen) == 2 and sys.stderr.fileno() not in seen  # not the stream object the driver had at the fork
