"""Data safety, round 3 (issue #22, section 1), on real folders.

- A symbolic link found inside a run, compare or collapse folder is never read, written or deleted
  through: every place a run folder has (figures, chunks, a chunk, its students, each table, the
  marker, the lock, a temporary) is replaced by a link to a folder or file of the user's, and every
  command that touches the folder (report, resume, --fresh, collapse) is refused in one line naming
  the link, with the user's files byte-identical afterwards.
- A driver killed with SIGKILL in any phase (training, committing a chunk, drawing the report) leaves
  no process behind after 15 s, and no lock: the same command then finishes the run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import TINY
from test_data_safety import _alive, _descendants, _run, one_line_error, snapshot

RUN = {**TINY, "trials": 1, "workers": 1, "student": {"widths": [6]}}


@pytest.fixture(scope="module")
def made_run(tmp_path_factory) -> Path:
    """A finished run folder `r` (one spectral and one direct chunk), copied by each test before it plants a link."""
    root = tmp_path_factory.mktemp("made")
    (root / "c.yaml").write_text(yaml.safe_dump(RUN))
    code, err, _ = _run(["run", root / "c.yaml", "--out", root / "r", "--quiet"])
    assert code == 0, err
    return root


def victim(root: Path) -> Path:
    """The user's folder, outside the run folder, holding files under the names a run writes."""
    v = root / "victim"
    (v / "students").mkdir(parents=True)
    for name in ("losses.png", "results.parquet", "summary.json", "mine.txt", "students/x.safetensors", "config.yaml"):
        (v / name).write_text(f"MINE {name}\n")
    (v / "spectral-w6").mkdir()
    (v / "spectral-w6" / "mine.txt").write_text("MINE\n")
    return v


def _chunk(run: Path) -> str:
    return next(p.name for p in (run / "chunks").iterdir() if p.name.startswith("spectral"))


# where the link is planted (relative to the run folder) -> what it points to in the victim folder (None: the folder)
PLACES = {
    "figures": None,
    "chunks": None,
    "CHUNK": None,
    "CHUNK/students": "students",
    "results.parquet": "results.parquet",
    "summary.json": "summary.json",
    "config.yaml": "config.yaml",
    "figures/losses.png": "losses.png",
    ".eigenprune.json": "summary.json",
    ".lock": "mine.txt",
    "report.html": "mine.txt",
}


def _plant(tmp_path: Path, made: Path, place: str) -> tuple[Path, Path]:
    run = tmp_path / "r"
    shutil.copytree(made / "r", run, symlinks=True)
    shutil.copy(made / "c.yaml", tmp_path / "c.yaml")
    v = victim(tmp_path)
    rel = place.replace("CHUNK", f"chunks/{_chunk(run)}")
    target = v if PLACES[place] is None else v / PLACES[place]
    entry = run / rel
    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    entry.symlink_to(target)
    return run, v


@pytest.mark.parametrize("command", ["report", "resume", "fresh"])
@pytest.mark.parametrize("place", list(PLACES))
def test_a_link_inside_a_run_folder_is_refused_and_its_target_untouched(tmp_path, made_run, place, command):
    run, v = _plant(tmp_path, made_run, place)
    name = Path(place).name.replace("CHUNK", _chunk(made_run / "r"))
    before, links = snapshot(v), {str(p.relative_to(run)): os.readlink(p) for p in run.rglob("*") if p.is_symlink()}
    args = {"report": ["report", run], "resume": ["run", tmp_path / "c.yaml", "--out", run, "--quiet"],
            "fresh": ["run", tmp_path / "c.yaml", "--out", run, "--quiet", "--fresh"]}[command]
    code, err, _ = _run(args)
    assert snapshot(v) == before, f"{command} with {place} a link changed the user's files"
    assert {str(p.relative_to(run)): os.readlink(p) for p in run.rglob("*") if p.is_symlink()} == links  # the link stays
    if place == "report.html" and command != "report":  # a resume or --fresh refuses before training, naming the link
        assert one_line_error(code, err) and "symbolic link" in err, err
        return
    assert one_line_error(code, err), err
    assert "symbolic link" in err and Path(err.split()[1]).name == name, err


def test_a_link_named_like_a_temporary_is_removed_as_a_link_only(tmp_path, made_run):
    run = tmp_path / "r"
    shutil.copytree(made_run / "r", run, symlinks=True)
    v = victim(tmp_path)
    before = snapshot(v)
    (run / "chunks" / ".eigenprune-tmp-x").symlink_to(v)  # what a cleanup may remove: the link, never its target
    code, err, _ = _run(["run", made_run / "c.yaml", "--out", run, "--quiet"])
    assert code == 0, err
    assert not (run / "chunks" / ".eigenprune-tmp-x").is_symlink() and snapshot(v) == before


def test_collapse_and_compare_refuse_links_in_their_folders(tmp_path, made_run):
    v = victim(tmp_path)
    before = snapshot(v)
    out = tmp_path / "col"
    out.mkdir()
    (out / ".eigenprune.json").symlink_to(v / "summary.json")
    code, err, _ = _run(["collapse", made_run / "r", made_run / "r", "--out", out])
    assert one_line_error(code, err) and "symbolic link" in err, err
    cmp_out = tmp_path / "cmp"
    cmp_out.mkdir()
    (cmp_out / ".eigenprune.json").write_text('{"format": "eigenprune-folder/1", "kind": "compare", "entries": {}}\n')
    (cmp_out / "compare.md").symlink_to(v / "mine.txt")
    code, err, _ = _run(["compare", "--out", cmp_out, "--set", "trials=1", "--set", "widths=[6]", "--set", "train.epochs=2",
                           "--set", "train.batch_size=50", "--set", "data.n_train=200", "--set", "data.n_test=100"])
    assert one_line_error(code, err) and "symbolic link" in err, err
    assert snapshot(v) == before


# --- SIGKILL of the driver in every phase ------------------------------------------------------------------

SLOW = {**TINY, "trials": 2, "student": {"widths": [6, 40]}, "spectral": {"epochs": 60, "batch_size": 20},
        "direct": {"epochs": 60, "batch_size": 20}}


def _until(condition, seconds: float, what: str, proc) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read().decode()[-500:]}"
        assert time.monotonic() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.01)


PHASES = {
    "training": lambda run, kids: len(kids) >= 2 and (run / "chunks").is_dir(),
    "committing": lambda run, kids: any(p.name[0] != "." for p in (run / "chunks").iterdir()) if (run / "chunks").is_dir() else False,
    "report": lambda run, kids: (run / "summary.json").is_file() and len(kids) >= 1,  # the figure drawer is forked
}


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads processes from /proc")
@pytest.mark.parametrize("phase", list(PHASES))
def test_a_sigkill_of_the_driver_leaves_no_process_and_no_lock(tmp_path, phase):
    cfg = tmp_path / "slow.yaml"
    cfg.write_text(yaml.safe_dump(SLOW))
    run = tmp_path / "run"
    args = [sys.executable, "-m", "eigenprune", "run", str(cfg), "--out", str(run), "--workers", "2", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    seen: set[int] = set()
    try:
        def ready() -> bool:
            kids = _alive(_descendants(proc.pid))
            seen.update(kids)
            return PHASES[phase](run, kids)
        _until(ready, 120, phase, proc)
        seen |= _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 15
        while _alive(seen) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(seen), f"alive 15 s after a SIGKILL of the driver ({phase}): {_alive(seen)}"
    finally:
        for p in _alive(seen):
            os.kill(p, signal.SIGKILL)
    committed = sorted(p.name for p in (run / "chunks").iterdir() if p.name[0] != ".") if (run / "chunks").is_dir() else []
    code, err, _ = _run(["run", cfg, "--out", run, "--quiet", "--workers", "1"])  # the lock went with the driver
    assert code == 0, err
    assert (run / "report.html").is_file()
    # the kill lost only the chunks in flight: every chunk committed before it is resumed, not retrained
    assert set(committed) <= set(json.loads((run / "manifest.json").read_text())["chunks_resumed"])


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads processes from /proc")
def test_ctrl_c_with_a_stopped_worker_ends_the_run_at_once(tmp_path):
    """A worker stopped with SIGSTOP (Ctrl-Z in its terminal) does not hold up the driver's interrupt."""
    cfg = tmp_path / "slow.yaml"
    cfg.write_text(yaml.safe_dump({**SLOW, "spectral": {"epochs": 4000, "batch_size": 20}, "direct": {"epochs": 4000, "batch_size": 20}}))
    args = [sys.executable, "-m", "eigenprune", "run", str(cfg), "--out", str(tmp_path / "run"), "--workers", "2", "--quiet"]
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    kids: set[int] = set()
    try:
        def two_workers() -> bool:
            kids.update(_alive(_descendants(proc.pid)))
            return len(kids) >= 2
        _until(two_workers, 60, "two workers", proc)
        time.sleep(1)
        os.kill(min(kids), signal.SIGSTOP)
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(4) == 130  # without waking it, the driver waited 5 s for the stopped worker to end
        assert "interrupted" in proc.stderr.read().decode()
        deadline = time.monotonic() + 10
        while _alive(kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(kids)
    finally:
        for p in _alive(kids):
            os.kill(p, signal.SIGKILL)


def test_a_chunk_that_runs_out_of_memory_is_one_line_and_keeps_finished_chunks(tmp_path, monkeypatch):
    import eigenprune.experiments.runner as runner

    real, calls = runner.train_chunk, []

    def second_fails(cfg, chunk, *args):
        calls.append(chunk.id)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 196608000 bytes. Error code 12 (Cannot allocate memory)")
        return real(cfg, chunk, *args)

    monkeypatch.setattr(runner, "train_chunk", second_fails)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(RUN))
    code, err, _ = _run(["run", tmp_path / "c.yaml", "--out", tmp_path / "r", "--quiet"])
    assert one_line_error(code, err) and f"chunk {calls[1]} ran out of memory" in err and "rerun" in err, err
    assert [p.name for p in (tmp_path / "r" / "chunks").iterdir()] == [calls[0]]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_to_compare_says_interrupted_with_128_plus_its_number(tmp_path, sig):
    args = [sys.executable, "-m", "eigenprune", "compare", "--out", str(tmp_path / "cmp"), "--quiet", "--set", "train.epochs=100000"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _until(lambda: (tmp_path / "cmp" / "config.yaml").is_file(), 60, "compare's config.yaml", proc)
    time.sleep(0.5)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=20)
    assert (proc.returncode, err.decode(), out) == (128 + sig, "interrupted\n", b"")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_while_the_command_loads_says_interrupted(sig):
    """The console script's entry point (eigenprune_entry) catches a signal while torch and the CLI load (before: a
    KeyboardInterrupt traceback for Ctrl-C, a silent end for SIGTERM and SIGHUP)."""
    code = "import sys, eigenprune_entry; sys.argv = ['eigenprune', 'config']; eigenprune_entry.main()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.4)  # importing torch alone takes longer
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, err.decode(), out) == (128 + sig, "interrupted\n", b"")
