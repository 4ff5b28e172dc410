"""The memory planner splits a chunk that does not fit into groups of trials that do."""

import json
from dataclasses import replace

import pandas as pd
import torch

from conftest import TINY
from eigenprune.experiments.config import parse_config
from eigenprune.experiments.data import DataSpec, data_spec
from eigenprune.experiments.grid import plan_chunks
from eigenprune.experiments.plan import check_memory, chunk_memory
from eigenprune.experiments.runner import run_experiment


def _limit_between_one_and_two_trials(cfg):
    chunk = plan_chunks(cfg)[0]
    one = chunk_memory(cfg, replace(chunk, trials=chunk.trials[:1], split=True))
    two = chunk_memory(cfg, chunk)
    assert two > one
    return (one + two) / 2 / 1e9


def test_a_chunk_too_large_is_split_by_trials():
    cfg = parse_config({**TINY, "workers": 1})
    cfg = cfg.model_copy(update={"max_memory_gb": _limit_between_one_and_two_trials(cfg)})
    chunks, info = check_memory(cfg, plan_chunks(cfg), 1, torch.device("cpu"))
    assert [c.id for c in chunks] == ["spectral-w6_12-tr0_0", "spectral-w6_12-tr1_1", "direct-w6_12-tr0_0", "direct-w6_12-tr1_1"]
    assert all(b <= info["memory_limit_bytes"] for b in info["memory_estimate_bytes"].values())


def test_a_split_run_equals_an_unsplit_one_and_resumes(tmp_path):
    base = parse_config({**TINY, "workers": 1, "save_students": False})
    run_experiment(base, tmp_path / "whole", quiet=True)
    split = base.model_copy(update={"max_memory_gb": _limit_between_one_and_two_trials(base)})
    run_experiment(split, tmp_path / "split", quiet=True)
    a = pd.read_parquet(tmp_path / "whole" / "results.parquet").drop(columns="chunk")
    b = pd.read_parquet(tmp_path / "split" / "results.parquet").drop(columns="chunk")
    pd.testing.assert_frame_equal(a, b, rtol=1e-5, atol=1e-7)
    manifest = json.loads((tmp_path / "split" / "manifest.json").read_text())
    assert sorted(manifest["chunks"]) == sorted(f"{m}-w6_12-tr{t}_{t}" for m in ("spectral", "direct") for t in (0, 1))
    run_experiment(split, tmp_path / "split", quiet=True)  # the same command again: nothing left to train
    again = json.loads((tmp_path / "split" / "manifest.json").read_text())
    assert sorted(again["chunks_resumed"]) == sorted(manifest["chunks"])


def test_the_estimate_uses_the_real_data_shape():
    cfg = parse_config({"data": {"source": "digits"}, "student": {"head": "linear", "rest": []}})
    chunk = plan_chunks(cfg)[0]
    default = chunk_memory(cfg, chunk, DataSpec("regression", 10, 1, 8000, 8000, 4000))  # the teacher defaults
    digits = chunk_memory(cfg, chunk, DataSpec("classification", 64, 10, 1347, 1347, 450))
    wide = chunk_memory(cfg, chunk, DataSpec("classification", 5000, 10, 1347, 1347, 450))
    assert digits < default < wide
    real = data_spec(cfg)  # without a spec: the config's data, here digits' real shape
    assert (real.task, real.inputs, real.outputs, real.n_train + real.n_test) == ("classification", 64, 10, 1797)
    assert chunk_memory(cfg, chunk) == chunk_memory(cfg, chunk, real)
