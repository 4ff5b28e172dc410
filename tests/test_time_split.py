"""Chunks longer than `max_chunk_minutes` (by the cost model) train as groups of trials; results do not change."""

import json
import os
import shutil

import pandas as pd
import pytest
import torch

from conftest import TINY
from eigenprune.experiments import experiment_seeds
from eigenprune.experiments.config import load_config, parse_config
from eigenprune.experiments.data import make_data
from eigenprune.experiments.grid import Chunk, plan_chunks
from eigenprune.experiments.measure import prepare_chunk
from eigenprune.experiments.plan import chunk_seconds, split_long_chunks
from eigenprune.experiments.runner import run_experiment
from eigenprune.experiments.store import RunFolder

TABLES = ("results", "curves", "importance", "layers")
KEYS = {"results": ["method", "width", "trial"], "curves": ["method", "width", "trial", "layer", "kept"],
        "importance": ["method", "width", "trial", "node"], "layers": ["method", "width", "trial", "layer"]}
# They name the chunk a student was trained in (and its checkpoint's folder), which is what a split changes.
WHERE = ["chunk", "checkpoint"]
TINY3 = {**TINY, "trials": 3, "workers": 1}


def test_the_paper_grid_is_split_within_the_bound_into_balanced_groups_of_trials():
    cfg = load_config("paper")
    whole = plan_chunks(cfg)
    parts = split_long_chunks(cfg, whole)
    assert max(chunk_seconds(cfg, c) for c in whole) > 50 * 60  # the widest chunk: about an hour by the model
    assert max(chunk_seconds(cfg, c) for c in parts) <= 10 * 60
    for c in whole:
        mine = [p for p in parts if (p.method, p.widths) == (c.method, c.widths)]
        assert sum((p.trials for p in mine), ()) == c.trials  # every trial once, in order
        assert max(len(p.trials) for p in mine) - min(len(p.trials) for p in mine) <= 1
        if len(mine) > 1:
            assert all(p.split and p.id == f"{c.id}-tr{p.trials[0]}_{p.trials[-1]}" for p in mine)
            fewer = -(-len(c.trials) // (len(mine) - 1))  # one part fewer would need this many trials in one
            assert chunk_seconds(cfg, Chunk(c.method, c.widths, c.trials[:fewer])) > 10 * 60
    w1500 = [p.id for p in parts if p.method == "spectral" and p.widths == (1500,)]
    assert w1500[:2] == ["spectral-w1500-tr0_3", "spectral-w1500-tr4_7"] and len(w1500) == 8


def test_the_quick_run_and_unbounded_or_authors_configs_are_not_split():
    quick = parse_config({})
    assert split_long_chunks(quick, plan_chunks(quick)) == plan_chunks(quick)
    paper = load_config("paper")
    for change in ({"max_chunk_minutes": None}, {"parity": {"effective_dim": "authors"}}):
        cfg = parse_config({**paper.model_dump(), **change})
        assert split_long_chunks(cfg, plan_chunks(cfg)) == plan_chunks(cfg)
    assert paper.digest() == parse_config({**paper.model_dump(), "max_chunk_minutes": 1}).digest()


def _tables(out):
    return {name: pd.read_parquet(out / f"{name}.parquet").drop(columns=WHERE, errors="ignore")
            .sort_values(KEYS[name], kind="stable").reset_index(drop=True) for name in TABLES}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny grid run whole, and split into one trial per chunk (the bound forced tiny)."""
    base = tmp_path_factory.mktemp("split")
    whole = parse_config({**TINY3, "max_chunk_minutes": None})
    split = parse_config({**TINY3, "max_chunk_minutes": 1e-9})
    run_experiment(whole, base / "whole", quiet=True)
    run_experiment(split, base / "split", quiet=True)
    return base / "whole", base / "split", split


def test_a_split_part_starts_every_student_exactly_as_the_whole_chunk_does():
    cfg = parse_config(TINY3)
    data = make_data(cfg)
    whole = plan_chunks(cfg)[0]
    full = prepare_chunk(cfg, whole, data, torch.device("cpu"))
    assert full.shuffle == experiment_seeds.shuffle_seeds(cfg.seed, cfg.trials)  # batch order: one seed per trial, whatever the chunk
    for part in split_long_chunks(cfg.model_copy(update={"max_chunk_minutes": 1e-9}), [whole]):
        prep = prepare_chunk(cfg, part, data, torch.device("cpu"))
        assert prep.shuffle == full.shuffle and prep.n_fit == full.n_fit
        for s, key in enumerate(part.keys()):
            w = whole.keys().index(key)
            assert int(prep.trial_index[s]) == int(full.trial_index[w]) == key[1]
            for a, b in zip(prep.ens.parameters(), full.ens.parameters(), strict=True):
                assert a.shape[1:] == b.shape[1:]  # the same padded width
                assert torch.equal(a[s], b[w])


def test_a_run_split_by_trials_gives_the_unsplit_results(runs):
    """Equal to rounding: a student's place in the stack changes the memory alignment of its readout's
    matrix-vector product, which x86 BLAS sums in an alignment-dependent order (see `split_long_chunks`)."""
    whole, split, _ = runs
    manifest = json.loads((split / "manifest.json").read_text())
    assert sorted(manifest["chunks"]) == sorted(f"{m}-w6_12-tr{t}_{t}" for m in ("spectral", "direct") for t in range(3))
    a, b = _tables(whole), _tables(split)
    for name in TABLES:  # integer columns (effective dimension, critical point, search widths) exactly
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=False, rtol=1e-6, atol=1e-6)
    assert len(a["results"]) == 2 * 2 * 3 and not a["results"].duplicated(KEYS["results"]).any()
    assert a["results"].effective_dim.tolist() == b["results"].effective_dim.tolist()


def test_a_folder_with_some_split_parts_committed_resumes_only_the_missing_ones(tmp_path, runs):
    _, reference, cfg = runs
    out = tmp_path / "run"
    folder = RunFolder(out)
    folder.prepare(cfg)
    ids = json.loads((reference / "manifest.json").read_text())["chunks"]
    kept = ids[::2]  # what a killed run had committed: whole parts, each renamed into place
    for cid in kept:
        folder.record(f"chunks/{cid}", "tree")
        shutil.copytree(reference / "chunks" / cid, tmp_path / cid)
        os.replace(tmp_path / cid, out / "chunks" / cid)
    folder.release()
    run_experiment(cfg, out, quiet=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["chunks_resumed"]) == sorted(kept)
    assert sorted(manifest["chunks"]) == sorted(ids)
    assert sorted(manifest["chunk_seconds"]) == sorted(ids)
    trained = {c: json.loads((out / "chunks" / c / "timing.json").read_text()) for c in ids}
    assert all(trained[c] == json.loads((reference / "chunks" / c / "timing.json").read_text()) for c in kept)
    a, b = _tables(reference), _tables(out)
    for name in TABLES:  # the same split, the same positions: exactly
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True)


def test_whole_chunks_an_earlier_run_finished_are_kept_whole_under_a_new_bound(tmp_path, runs):
    whole, _, split = runs
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    run_experiment(split, out, quiet=True)  # the tiny bound would split every chunk: none is retrained
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["chunks_resumed"]) == sorted(manifest["chunks"]) == ["direct-w6_12", "spectral-w6_12"]


def test_run_times_tables_every_committed_chunk_against_the_cost_model(runs, tmp_path):
    """benchmarks/run_times.py (issue #25's record of a long run): one row per committed chunk, in the plan's chunks."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "run_times.py"
    spec = importlib.util.spec_from_file_location("run_times", path)
    run_times = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_times)
    _, split, _ = runs
    t = run_times.chunk_times(split)
    assert [r["chunk"] for r in t["done"]] and not t["left"]
    assert sorted(r["chunk"] for r in t["done"]) == sorted(p.name for p in (split / "chunks").iterdir())
    assert all(r["seconds"] > 0 and r["model_min"] > 0 and r["ratio"] > 0 for r in t["done"])
    assert t["chunk_seconds_done"] == pytest.approx(sum(r["seconds"] for r in t["done"]))
    copy = tmp_path / "copy"
    shutil.copytree(split, copy)
    shutil.rmtree(copy / "chunks" / t["done"][0]["chunk"])  # a chunk not committed yet is left, not an error
    assert [r["chunk"] for r in run_times.chunk_times(copy)["left"]] == [t["done"][0]["chunk"]]
    with pytest.raises(SystemExit, match="config.yaml is missing"):
        run_times.chunk_times(split / "chunks")
    mine = tmp_path / "mine.json"
    mine.write_text("a user's file")
    with pytest.raises(SystemExit):
        run_times.main([str(split), "--json", str(mine)])
    assert mine.read_text() == "a user's file"
    run_times.main([str(split), "--json", str(tmp_path / "new.json")])
    assert json.loads((tmp_path / "new.json").read_text())["done"] == t["done"]
