"""eigenprune deletes or replaces only what it can prove it wrote (issue: data safety).

Every case runs on a real folder that also holds a user's `.git`, `.venv`, `.env` and files of their
own, and asserts that every name and byte of them is still there afterwards.
"""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import TINY
from eigenprune.cli import app
from eigenprune.experiments.config import parse_config
from eigenprune.experiments.runner import run_experiment


def _run(args, cwd=None):
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)
    return result.exit_code, result.stderr, result.stdout


def user_files(folder: Path) -> None:
    """What a user keeps in a project folder: a git repository, a virtual environment, secrets, notes."""
    (folder / ".git" / "objects").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / ".git" / "objects" / "ab").write_bytes(b"\x00blob")
    (folder / ".venv" / "bin").mkdir(parents=True)
    (folder / ".venv" / "bin" / "python").write_text("#!/bin/sh\n")
    (folder / ".env").write_text("S=1\n")
    (folder / ".gitignore").write_text("*.pyc\n")
    (folder / "notes.md").write_text("my notes\n")
    (folder / "my_plots").mkdir()
    (folder / "my_plots" / "a.png").write_bytes(b"\x89PNG mine")


def snapshot(folder: Path, only: tuple[str, ...] | None = None) -> dict:
    """Every entry under `folder` (or under its top-level names `only`) -> sha256 of its bytes (None for folders)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if only is not None and rel.parts[0] not in only:
            continue
        out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    return out


USER = (".git", ".venv", ".env", ".gitignore", "notes.md", "my_plots")
SMALL = {**TINY, "trials": 1, "workers": 1, "methods": ["direct"], "student": {"widths": [5]}}


def one_line_error(code, err):
    return code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_run_into_a_users_project_folder_is_refused_and_touches_nothing(tmp_path):
    project = tmp_path / "p"
    project.mkdir()
    user_files(project)
    (project / "config.yaml").write_text(yaml.safe_dump(SMALL))
    before = snapshot(project)
    code, err, _ = _run(["run", "config.yaml", "--out", ".", "--quiet"], cwd=project)
    assert one_line_error(code, err) and "not made by eigenprune" in err, err
    assert "--fresh" not in err  # no destructive advice
    code, err, _ = _run(["run", "config.yaml", "--out", ".", "--quiet", "--fresh"], cwd=project)
    assert one_line_error(code, err), err
    assert snapshot(project) == before


def test_a_folder_of_another_tool_is_refused_and_fresh_does_not_delete_it(tmp_path):
    other = tmp_path / "paper"
    (other / "src").mkdir(parents=True)
    (other / "src" / "main.c").write_text("int main(){}\n")
    (other / "paper.tex").write_text("\\documentclass{article}\n")
    (other / "config.yaml").write_text("title: my paper\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    before = snapshot(other)
    for extra in ([], ["--fresh"]):
        code, err, _ = _run(["run", cfg, "--out", other, "--quiet", *extra])
        assert one_line_error(code, err) and "--fresh" not in err, err
    assert snapshot(other) == before


def test_a_committed_run_folder_keeps_git_on_rerun_and_fresh_keeps_the_users_files(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "run"
    code, err, _ = _run(["run", cfg, "--out", out, "--quiet"])
    assert code == 0, err
    user_files(out)  # the user commits the finished run to git and keeps notes and plots in it
    (out / "figures" / "mine.png").write_bytes(b"my figure")
    (out / "chunks" / ".keep").write_text("")
    kept = (*USER, "figures/mine.png", "chunks/.keep")
    before = {k: v for k, v in snapshot(out).items() if k.split("/")[0] in USER or k in kept}
    code, err, _ = _run(["run", cfg, "--out", out, "--quiet"])  # the same command again: a resume
    assert code == 0, err
    code, err, _ = _run(["run", cfg, "--out", out, "--quiet", "--fresh", "--set", "seed=5"])  # start over, another config
    assert code == 0, err
    after = snapshot(out)
    assert {k: after.get(k, "MISSING") for k in before} == before
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 5


def test_outputs_never_replace_their_input_or_a_file_eigenprune_did_not_write(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "run"
    assert _run(["run", cfg, "--out", out, "--quiet"])[0] == 0
    student = next(out.glob("chunks/*/students/*.safetensors"))
    table = tmp_path / "table.csv"
    table.write_text("a,b\n1,2\n")
    before = {p: p.read_bytes() for p in (student, table)}
    cases = [
        ["export", student, "--onnx", student],
        ["export", student, "--onnx", student, "--force"],
        ["export", student, "--onnx", table, "--force"],
        ["prune", student, "--keep", "3", "--out", student],
        ["prune", student, "--keep", "3", "--out", student, "--force"],
        ["prune", student, "--keep", "3", "--out", table],
        ["prune", student, "--keep", "3", "--out", table, "--force"],
    ]
    for args in cases:
        code, err, _ = _run(args)
        assert one_line_error(code, err), (args, err)
    assert {p: p.read_bytes() for p in before} == before
    small = tmp_path / "small.safetensors"
    assert _run(["prune", student, "--keep", "3", "--out", small])[0] == 0
    code, err, _ = _run(["prune", student, "--keep", "3", "--out", small])  # exists: only --force replaces it (it is ours)
    assert one_line_error(code, err) and "--force" in err
    assert _run(["prune", student, "--keep", "2", "--out", small, "--force"])[0] == 0


def test_compare_and_collapse_refuse_a_folder_that_is_not_theirs(tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    user_files(keep)
    (keep / "config.yaml").write_text("mine: true\n")
    before = snapshot(keep)
    code, err, _ = _run(["compare", "--out", keep, "--quiet", "--set", "trials=1"])
    assert one_line_error(code, err) and "not made by eigenprune" in err, err
    run = tmp_path / "run"
    run_experiment(parse_config(SMALL), run, quiet=True)
    code, err, _ = _run(["collapse", run, run, "--out", keep])
    assert one_line_error(code, err), err
    code, err, _ = _run(["report", keep])
    assert one_line_error(code, err) and "not a run folder made by eigenprune" in err, err
    assert snapshot(keep) == before


def _csv(path: Path, scale: float = 1.0) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 3))
    y = scale * (x @ np.array([1.0, -2.0, 0.5]))
    path.write_text("a,b,c,y\n" + "\n".join(",".join(f"{v:.6f}" for v in (*row, t)) for row, t in zip(x, y)) + "\n")


def test_a_resume_or_an_auto_prune_on_changed_csv_data_is_refused(tmp_path):
    data = tmp_path / "my.csv"
    _csv(data)
    body = {**TINY, "trials": 1, "workers": 1, "student": {"widths": [4, 6], "head": "linear"},
            "data": {"source": "csv", "csv": {"path": str(data), "target": "y", "task": "regression"}}}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(body))
    out = tmp_path / "run"
    assert _run(["run", cfg, "--out", out, "--quiet"])[0] == 0
    student = next(out.glob("chunks/*/students/*.safetensors"))
    results = (out / "results.parquet").read_bytes()
    _csv(data, scale=100.0)  # the user edits the file
    code, err, _ = _run(["run", cfg, "--out", out, "--quiet"])
    assert one_line_error(code, err) and "data changed" in err, err
    assert (out / "results.parquet").read_bytes() == results
    code, err, _ = _run(["prune", student, "--keep", "auto", "--out", tmp_path / "s.safetensors"])
    assert one_line_error(code, err) and "changed" in err, err
    assert not (tmp_path / "s.safetensors").exists()


# --- Signals: SIGTERM ends every worker; after a SIGKILL of the driver the workers end themselves ---------

LONG = {**TINY, "name": "long", "student": {"widths": [4, 40]}, "spectral": {"epochs": 4000, "batch_size": 50},
        "direct": {"epochs": 4000, "batch_size": 50}}


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(p)
    return alive


def _start_workers(tmp_path: Path):
    cfg = tmp_path / "long.yaml"
    cfg.write_text(yaml.safe_dump(LONG))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "eigenprune", "run", str(cfg), "--out", str(out), "--workers", "2", "--quiet"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 60
    kids: set[int] = set()
    while time.monotonic() < deadline and proc.poll() is None:
        kids = _descendants(proc.pid)
        if len(kids) >= 2:  # two workers (and, when they are spawned, not forked, multiprocessing's resource tracker)
            break
        time.sleep(0.1)
    time.sleep(3)  # the workers are training now
    kids |= _descendants(proc.pid)
    assert proc.poll() is None and len(kids) >= 2, proc.stderr.read().decode() if proc.poll() is not None else kids
    return proc, kids, out


def _signal_and_wait(proc, kids: set[int], sig: int, seconds: float) -> None:
    """Send `sig` to the driver alone, then assert that none of its children is alive after `seconds`."""
    os.kill(proc.pid, sig)
    proc.wait(10)
    deadline = time.monotonic() + seconds
    while _alive(kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(kids), f"still alive {seconds} s after {signal.Signals(sig).name} to the driver: {_alive(kids)}"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads processes from /proc")
def test_sigterm_to_the_driver_ends_every_worker_and_leaves_whole_chunks(tmp_path):
    proc, kids, out = _start_workers(tmp_path)
    try:
        _signal_and_wait(proc, kids, signal.SIGTERM, 5)  # the driver alone, not its process group
        assert proc.returncode == 128 + signal.SIGTERM
        assert "interrupted" in proc.stderr.read().decode()
        for chunk in (out / "chunks").iterdir():  # whole chunks or none
            assert chunk.name.startswith(".") or (chunk / "results.parquet").is_file()
    finally:
        for p in _alive(kids):
            os.kill(p, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads processes from /proc")
def test_workers_exit_by_themselves_after_a_sigkill_of_the_driver(tmp_path):
    proc, kids, _ = _start_workers(tmp_path)
    try:
        _signal_and_wait(proc, kids, signal.SIGKILL, 15)
    finally:
        for p in _alive(kids):
            os.kill(p, signal.SIGKILL)


def test_inside_a_folder_of_ours_a_users_file_is_neither_replaced_nor_removed(tmp_path):
    from eigenprune.experiments.store import OwnedFolder, RunFolderError

    folder = OwnedFolder(tmp_path / "cmp", "compare")
    folder.open(create=True)
    try:
        (folder.path / "config.yaml").write_text("mine\n")  # the user's file, under a name eigenprune would use
        (folder.path / "figures").mkdir()
        (folder.path / "figures" / "x.png").write_bytes(b"my plot")
        with pytest.raises(RunFolderError, match="not written by eigenprune"):
            folder.write("config.yaml", "theirs\n")
        with pytest.raises(RunFolderError, match="not written by eigenprune"):
            folder.write("figures/x.png", b"theirs")
        folder.write("figures/ours.png", b"ours")
        folder.remove_own(keep=(".lock",))
    finally:
        folder.release()
    assert (folder.path / "config.yaml").read_text() == "mine\n"
    assert (folder.path / "figures" / "x.png").read_bytes() == b"my plot"
    assert not (folder.path / "figures" / "ours.png").exists()


def test_a_marker_that_points_outside_its_folder_is_refused(tmp_path):
    import json

    from eigenprune.experiments.store import MARKER, RunFolder, RunFolderError

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    run = tmp_path / "run"
    run_experiment(parse_config(SMALL), run, quiet=True)
    marker = json.loads((run / MARKER).read_text())
    marker["entries"]["../victim.txt"] = "file"
    (run / MARKER).write_text(json.dumps(marker))
    with pytest.raises(RunFolderError, match="not a path inside the folder"):
        run_experiment(parse_config(SMALL), run, quiet=True, fresh=True)
    with pytest.raises(RunFolderError, match="not a path inside the folder"):
        RunFolder(run).open()
    assert victim.read_text() == "keep me\n"


def test_prune_writes_its_default_output_outside_the_run_folder(tmp_path):
    run = tmp_path / "run"
    run_experiment(parse_config(SMALL), run, quiet=True)
    student = next(run.glob("chunks/*/students/*.safetensors"))
    here = tmp_path / "here"
    here.mkdir()
    before = snapshot(run)
    code, err, _ = _run(["prune", student, "--keep", "2"], cwd=here)
    assert code == 0, err
    assert (here / f"{student.stem}-pruned.safetensors").is_file()
    assert snapshot(run) == before  # nothing written into eigenprune's chunk folder, which --fresh may replace


def test_a_users_file_under_a_name_the_run_writes_is_refused_before_training(tmp_path):
    from eigenprune.experiments.store import RunFolder

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "run"
    folder = RunFolder(out)  # a run that was started (the folder is ours, its config written) ...
    folder.prepare(parse_config(SMALL))
    folder.release()
    (out / "summary.json").write_text('{"mine": true}\n')  # ... and a file of the user's where its summary goes
    before = snapshot(out)
    for extra in ([], ["--fresh"]):
        code, err, _ = _run(["run", cfg, "--out", out, "--quiet", *extra])
        assert one_line_error(code, err) and "summary.json was not written by eigenprune" in err, err
    assert snapshot(out) == before  # refused before anything trained or was written
