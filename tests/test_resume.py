"""Never lose a result: SIGKILL and resume, leftovers, config guard, --fresh, lock, determinism."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from conftest import TINY
from eigenprune.cli import app
from eigenprune.core.io import TMP_PREFIX
from eigenprune.experiments.config import parse_config
from eigenprune.experiments.grid import plan_chunks
from eigenprune.experiments.runner import run_experiment
from eigenprune.experiments.store import RunFolder, RunFolderError

# 4 chunks (spectral/direct x widths {4, 8} and {16, 32}), each long enough to be killed between commits
FOUR_CHUNKS = {**TINY, "name": "four", "student": {"widths": [4, 8, 16, 32]},
               "spectral": {"epochs": 40, "batch_size": 50}, "direct": {"epochs": 40, "batch_size": 50}}
TABLES = ("results", "curves", "importance")


def snapshot(folder):
    """Every file under `folder` -> (bytes, mtime_ns)."""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def committed(out):
    return sorted(p.name for p in (out / "chunks").iterdir() if not p.name.startswith(".")) if (out / "chunks").is_dir() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of FOUR_CHUNKS (in this process, one worker)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run_experiment(parse_config({**FOUR_CHUNKS, "workers": 1}), out, quiet=True)
    return out


def test_sigkill_then_rerun_completes_the_grid_without_lost_or_repeated_rows(tmp_path, reference):
    cfg = tmp_path / "four.yaml"
    cfg.write_text(yaml.safe_dump(FOUR_CHUNKS))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "eigenprune", "run", str(cfg), "--out", str(out), "--workers", "1", "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not committed(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    n_chunks = len(plan_chunks(parse_config(FOUR_CHUNKS)))
    done_before = committed(out)
    assert 1 <= len(done_before) < n_chunks, done_before  # killed between the first commit and the last
    assert not (out / "results.parquet").exists()

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["chunks_resumed"]) == done_before
    assert len(committed(out)) == n_chunks
    res = pd.read_parquet(out / "results.parquet")
    assert len(res) == 2 * 4 * 2 and not res.duplicated(["method", "width", "trial"]).any()
    for name in TABLES:
        pd.testing.assert_frame_equal(pd.read_parquet(out / f"{name}.parquet"), pd.read_parquet(reference / f"{name}.parquet"),
                                      check_exact=True)


def test_leftover_temporaries_and_stray_chunks_are_ignored_and_cleaned(tmp_path, reference):
    out = tmp_path / "run"
    cfg = parse_config({**FOUR_CHUNKS, "workers": 1})
    folder = RunFolder(out)
    folder.prepare(cfg)
    chunks = [c.id for c in plan_chunks(cfg)]
    for done in chunks[1:]:  # all but one finished before the kill (a commit records the chunk, then renames it in) ...
        folder.record(f"chunks/{done}", "tree")
        os.replace(_copy_chunk(reference, done, tmp_path), out / "chunks" / done)
    folder.mkdir("figures")  # a kill while the report was being written
    folder.release()
    junk = out / "chunks" / f"{TMP_PREFIX}{chunks[0]}.k1ll3d"  # ... which was being written when it came
    junk.mkdir()
    (junk / "results.parquet").write_bytes(b"half a parquet file")
    (out / f"{TMP_PREFIX}results.parquet.x1").write_bytes(b"partial")
    (out / "figures" / f"{TMP_PREFIX}losses.png.x2").write_bytes(b"partial")
    os.replace(_copy_chunk(reference, chunks[1], tmp_path), out / "chunks" / "spectral-w999")  # a folder the plan lacks
    users = {out / ".keep": b"mine", out / "chunks" / ".notes": b"mine too", out / "figures" / ".draft.png": b"my plot"}
    for path, data in users.items():  # the user's own dot-files look like old-style temporaries: they must stay
        path.write_bytes(data)

    run_experiment(cfg, out, quiet=True)
    assert not any(p.name.startswith(TMP_PREFIX) for d in (out, out / "chunks", out / "figures") for p in d.iterdir())
    assert all(path.read_bytes() == data for path, data in users.items())
    assert (out / "chunks" / "spectral-w999" / "results.parquet").is_file()  # not ours: neither read nor deleted
    assert sorted(json.loads((out / "manifest.json").read_text())["chunks_resumed"]) == sorted(chunks[1:])
    for name in TABLES:
        pd.testing.assert_frame_equal(pd.read_parquet(out / f"{name}.parquet"), pd.read_parquet(reference / f"{name}.parquet"),
                                      check_exact=True)


def _copy_chunk(run, chunk_id, tmp_path):
    dst = tmp_path / f"copy-{chunk_id}-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(run / "chunks" / chunk_id, dst)
    return dst


def test_a_folder_of_another_config_is_refused_and_left_untouched(tmp_path, reference):
    before = snapshot(reference)
    cfg = tmp_path / "other.yaml"
    cfg.write_text(yaml.safe_dump({**FOUR_CHUNKS, "trials": 3}))
    result = CliRunner().invoke(app, ["run", str(cfg), "--out", str(reference), "--quiet"])
    assert result.exit_code == 2
    assert "holds a run of a different config" in result.stderr and "--fresh" in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert snapshot(reference) == before


def test_fresh_starts_over_and_a_locked_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    small = {**TINY, "workers": 1, "trials": 1, "methods": ["direct"], "student": {"widths": [5]}}
    run_experiment(parse_config(small), out, quiet=True)
    old_seed = pd.read_parquet(out / "results.parquet").seed.iloc[0]
    other = parse_config({**small, "seed": 1})
    with pytest.raises(RunFolderError, match="different config"):
        run_experiment(other, out, quiet=True)
    holder = RunFolder(out)
    holder.prepare(parse_config(small))  # another run working in the folder
    try:
        with pytest.raises(RunFolderError, match="in use by another eigenprune process"):
            run_experiment(other, out, fresh=True, quiet=True)
        assert (out / "results.parquet").is_file()  # refused before deleting anything
    finally:
        holder.release()
    (out / "chunks" / "direct-w5" / "results.parquet").write_bytes(b"damaged")  # --fresh must not reuse old chunks
    run_experiment(other, out, fresh=True, quiet=True)
    res = pd.read_parquet(out / "results.parquet")
    assert len(res) == 1 and res.seed.iloc[0] != old_seed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config_digest"] == other.digest() and manifest["chunks_resumed"] == []


def test_same_config_and_seed_give_bit_identical_files_and_a_complete_manifest(tmp_path):
    cfg = parse_config({**TINY, "workers": 1})
    a, b = run_experiment(cfg, tmp_path / "a", quiet=True), run_experiment(cfg, tmp_path / "b", quiet=True)
    for name in TABLES:
        assert (a / f"{name}.parquet").read_bytes() == (b / f"{name}.parquet").read_bytes(), name
    students = sorted(p.relative_to(a) for p in a.glob("chunks/*/students/*.safetensors"))
    assert len(students) == 2 * 2 * 2
    for rel in students:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    res = pd.read_parquet(a / "results.parquet")
    assert not [c for c in res.columns if "second" in c or "time" in c]
    manifest = json.loads((a / "manifest.json").read_text())
    for key in ("eigenprune", "python", "torch", "numpy", "pandas", "pyarrow", "safetensors", "platform", "cpu_count",
                "torch_threads", "threads_per_worker", "workers", "backend", "device", "seed", "data_seed", "teacher_seed",
                "config_digest", "command", "memory_limit_bytes"):
        assert manifest[key] is not None, key
    assert manifest["config_digest"] == cfg.digest() and manifest["workers"] == 1
    ids = {c.id for c in plan_chunks(cfg)}
    assert set(manifest["chunk_seconds"]) == set(manifest["chunk_train_seconds"]) == ids
    assert all(0 < manifest["chunk_train_seconds"][c] < manifest["chunk_seconds"][c] for c in ids)  # training is part of the chunk


def test_a_chunk_timed_before_training_and_measuring_were_kept_apart_reports_its_whole_time(tmp_path):
    folder = RunFolder(tmp_path / "run")
    for cid, timing in (("old", {"train_seconds": 7.5}), ("new", {"seconds": 9.0, "train_seconds": 6.0})):
        (folder.chunks_dir / cid).mkdir(parents=True)
        (folder.chunks_dir / cid / "timing.json").write_text(json.dumps(timing))
    assert folder.chunk_seconds(["old", "new", "missing"]) == {"chunk_seconds": {"old": 7.5, "new": 9.0},
                                                               "chunk_train_seconds": {"new": 6.0}}
