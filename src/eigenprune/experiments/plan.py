"""Planning a run before anything is written: `plan_work` is the one plan of `eigenprune run` and `eigenprune plan`
(the config's chunks, those a run folder already holds, the time bound's and the memory planner's splits, the order
of the work, the device, workers and threads), and `plan_run` adds the timed estimate."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import pandas as pd
import torch

from eigenprune.batched.ensemble import Ensemble
from eigenprune.batched.memory import DEFAULT_FRACTION, available_bytes, chunk_bytes, gb
from eigenprune.batched.train import train_ensemble
from eigenprune.core.plans import make_student
from eigenprune.experiments.builders import student_plans
from eigenprune.experiments.config import Config, ConfigError
from eigenprune.experiments.data import DataSpec, TrialData, data_spec
from eigenprune.experiments.grid import MAX_CHUNKS, STEP_OVERHEAD, Chunk, plan_chunks
from eigenprune.experiments.measure import prepare_chunk


def resolve_device(name: str) -> torch.device:
    """The device a config names ("auto": CUDA where available); ConfigError for CUDA without a CUDA device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but no CUDA device is available; use --device cpu")
    return torch.device(name)


def check_memory(
    cfg: Config, chunks: list[Chunk], workers: int, device: torch.device, spec: DataSpec | None = None,
) -> tuple[list[Chunk], dict]:
    """Fit the chunks into memory before anything runs: split a chunk that is too large into groups of
    trials that fit, and refuse (ConfigError) one that does not fit even with a single trial.

    The limit is `max_memory_gb`, or DEFAULT_FRACTION of the memory available now (free GPU memory on
    CUDA), shared by the `workers` chunks that run at once, for data of `spec` (default: the config's,
    `data.data_spec`). Returns the chunks to run and the figures for the manifest.
    """
    if cfg.max_memory_gb is not None:
        limit, source = cfg.max_memory_gb * 1e9, f"max_memory_gb {cfg.max_memory_gb:g}"
    else:
        free = available_bytes(device)
        limit, source = DEFAULT_FRACTION * free, f"{DEFAULT_FRACTION:.0%} of the {gb(free)} available on {device.type}"
    spec = spec or data_spec(cfg)
    per_worker = limit / max(workers, 1)
    if workers > 1:
        source += f", shared by {workers} workers"
    if (teacher := teacher_memory(cfg)) > per_worker:
        raise ConfigError(f"the teacher needs about {gb(teacher)} to label the data, more than the {gb(per_worker)} limit "
                          f"({source}); lower data.teacher.widths (or data.n_train, n_test) or set max_memory_gb")
    fitted, needs = [], {}
    for c in chunks:
        need = chunk_memory(cfg, c, spec)
        if need <= per_worker:
            fitted.append(c)
            needs[c.id] = need
            continue
        size = _most_trials(lambda m, c=c: chunk_memory(cfg, replace(c, trials=c.trials[:m], split=True), spec) <= per_worker,
                            len(c.trials) - 1)
        if not size:
            raise ConfigError(
                f"chunk {c.id} ({c.size} students) needs about {gb(need)}, more than the "
                f"{gb(per_worker)} limit ({source}); lower trials, widths or n_train, use fewer workers, or set max_memory_gb"
            )
        parts = [replace(c, trials=c.trials[i : i + size], split=True) for i in range(0, len(c.trials), size)]
        fitted += parts
        full, last = chunk_memory(cfg, parts[0], spec), chunk_memory(cfg, parts[-1], spec)  # the parts but the last are alike
        needs.update({p.id: full for p in parts[:-1]} | {parts[-1].id: last})
    return fitted, {"memory_limit_bytes": int(per_worker), "memory_estimate_bytes": needs}


def teacher_memory(cfg: Config) -> int:
    """Estimated peak bytes of making teacher data (0 for real data): the largest teacher's weights and
    its activations on one trial's training and test inputs."""
    if cfg.data.source != "teacher":
        return 0
    d, size = cfg.data, getattr(torch, cfg.dtype).itemsize
    need = 0
    for t in cfg.teacher_list():
        sizes = [t.latent_dim if t.kind == "hidden_manifold" else d.input_dim, *t.widths, 1]
        params = sum(a * b for a, b in zip(sizes, sizes[1:]))
        need = max(need, size * (params + 2 * (d.n_train + d.n_test) * max(sizes)))
    return need


def _most_trials(fits: Callable[[int], bool], most: int) -> int:
    """The largest m in 1..most with fits(m) (memory grows with the trials in a chunk), or 0: a bisection,
    so that a chunk of 100,000 trials is planned in microseconds, not by trying every size."""
    low, high = 0, most
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def chunk_memory(cfg: Config, chunk: Chunk, spec: DataSpec | None = None) -> int:
    """Estimated peak bytes of training and measuring one chunk (see `memory.chunk_bytes`) on data of `spec`
    (default: the config's, `data.data_spec`)."""
    spec = spec or data_spec(cfg)
    widths = [spec.inputs, max(chunk.widths), *cfg.student.rest, spec.outputs]
    size = getattr(torch, cfg.dtype).itemsize
    return chunk_bytes(chunk.size, cfg.trials, widths, spec.n_train, spec.n_test, cfg.method(chunk.method).batch_size, size)


def chunk_cost(cfg: Config, chunk: Chunk, n_fit: int | None = None) -> float:
    """A relative training cost used to order the work: steps x (a step's fixed cost + its first-layer activations),
    the cost model of `grid.STEP_OVERHEAD`, training on `n_fit` patterns (default: the config's data.n_train)."""
    batch, steps = adam_steps(cfg, chunk.method, cfg.data.n_train if n_fit is None else n_fit)
    return steps * (STEP_OVERHEAD + batch * chunk.size * max(chunk.widths))


ACTIVATION_SECONDS = 4e-9
"""Seconds per unit of `chunk_cost` (a first-layer activation of a training step) in the cost model that bounds chunks
(`split_long_chunks`) without timing anything: set from the paper's widest, bandwidth-bound chunks on a CPU, so that
the model errs long on smaller ones (the measurements, machine and dates: docs/benchmarks.md, "The cost model's
constant"). `eigenprune plan --measure` times the machine at hand."""


def chunk_seconds(cfg: Config, chunk: Chunk, n_fit: int | None = None) -> float:
    """The cost model's training time of `chunk` in seconds: `chunk_cost` x `ACTIVATION_SECONDS`, training on
    `n_fit` patterns (default: the teacher config's, less a regularization path's validation part)."""
    return chunk_cost(cfg, chunk, cfg.regularization.n_fit(cfg.data.n_train) if n_fit is None else n_fit) * ACTIVATION_SECONDS


def split_long_chunks(cfg: Config, chunks: list[Chunk], n_fit: int | None = None) -> list[Chunk]:
    """Split every chunk whose modelled training (`chunk_seconds`) exceeds `max_chunk_minutes` into the fewest
    groups of consecutive trials, as equal as can be, that each stay within it (one trial at least), so that an
    interrupted run loses little, workers stay balanced and a cluster gets enough tasks.

    A part keeps its chunk's widths (and so its padded width) and strengths; every student keeps its initial
    parameters, data and batch order (all derived per trial), bit for bit. What a split changes is a student's
    position in the stack, and with it the last bits of some products: x86 BLAS sums a matrix-vector product
    (the one-output readout) in an order that depends on its operand's memory alignment (tests/test_time_split.py:
    equal to ~1e-7 after a few steps; like any change of summation order, many steps can amplify it). Not split:
    with `max_chunk_minutes: null`, and under `parity.effective_dim: authors`, whose normalisation spans all
    trials of a width in a chunk.
    """
    if cfg.max_chunk_minutes is None or cfg.parity.effective_dim == "authors":
        return list(chunks)
    bound = 60 * cfg.max_chunk_minutes
    sizes = [_most_trials(lambda m, c=c: chunk_seconds(cfg, replace(c, trials=c.trials[:m]), n_fit) <= bound, len(c.trials)) or 1
             for c in chunks]
    total = sum(-(-len(c.trials) // size) for c, size in zip(chunks, sizes))
    if total > MAX_CHUNKS:  # refused before the parts are made
        raise ConfigError(f"max_chunk_minutes {cfg.max_chunk_minutes:g} splits the grid's {sum(c.size for c in chunks)} students into "
                          f"{total:,} chunks, more than the {MAX_CHUNKS:,} eigenprune plans; lower trials or widths, "
                          "or raise max_chunk_minutes")
    out = []
    for c, size in zip(chunks, sizes):
        n = len(c.trials)
        parts = -(-n // size)
        if parts == 1:
            out.append(c)
            continue
        q, r = divmod(n, parts)  # the first r groups hold one trial more
        ends = [i * q + min(i, r) for i in range(parts + 1)]
        out += [replace(c, trials=c.trials[a:b], split=True) for a, b in zip(ends, ends[1:])]
    return out


def adam_steps(cfg: Config, method: str, n_fit: int) -> tuple[int, int]:
    """(batch size, Adam steps of the whole training) of a `method` student fitting `n_fit` patterns."""
    m = cfg.method(method)
    batch = min(m.batch_size, n_fit)
    return batch, m.epochs * -(-n_fit // batch)


@dataclass
class WorkPlan:
    """What a run trains and where: the chunks still to train, in the order the workers take them (the costliest
    first), the ids of those a run folder already holds (`finished`), the device, the worker processes (a Ray
    backend: its CPUs, 0 for all), torch threads per worker, and the memory figures for the manifest."""

    chunks: list[Chunk]
    finished: list[str]
    device: torch.device
    workers: int
    threads: int
    memory: dict


def plan_work(cfg: Config, spec: DataSpec, backend: str = "local", done: Callable[[str], bool] | None = None) -> WorkPlan:
    """The plan of a run of `cfg` on data of `spec`; ConfigError before anything is written.

    The config's chunks (`grid.plan_chunks`); those `done(chunk id)` says a run folder holds are kept whole (an
    earlier run under another time bound finished them); the rest are split by the time bound (`split_long_chunks`),
    ordered by cost, fitted into memory (`check_memory`, which may split them further), and parts already done are
    skipped. Local backend: the config's device, one worker per core (or `cfg.workers`) on a CPU, one on CUDA.
    Ray: each task resolves and checks its own device; memory is planned here only for a CPU or a set limit."""
    done = done or (lambda chunk_id: False)
    whole = plan_chunks(cfg)
    finished = [c.id for c in whole if done(c.id)]
    parts = split_long_chunks(cfg, [c for c in whole if not done(c.id)], spec.n_fit)
    finished += [c.id for c in parts if done(c.id)]  # parts of a chunk split by the same time bound
    todo = sorted((c for c in parts if c.id not in finished), key=lambda c: -chunk_cost(cfg, c))
    if backend == "ray":
        device, threads, memory = torch.device(cfg.device if cfg.device != "auto" else "cpu"), 1, {}
        if cfg.backprop == "fused":
            check_fused(cfg, None, spec)
        workers = cfg.workers
        if device.type == "cpu" or cfg.max_memory_gb:
            todo, memory = check_memory(cfg, todo, 1, torch.device("cpu"), spec)
    else:
        device = resolve_device(cfg.device)
        if cfg.backprop == "fused":
            check_fused(cfg, device, spec)
        workers = min(cfg.workers or os.cpu_count() or 1, len(todo)) if device.type == "cpu" else 1
        threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
        todo, memory = check_memory(cfg, todo, workers, device, spec)
    split_done = [c.id for c in todo if c.split and done(c.id)]  # parts of a chunk the memory planner split alike
    return WorkPlan([c for c in todo if c.id not in split_done], finished + split_done, device, workers, threads, memory)


def plan_run(cfg: Config, measure_steps: int = 0) -> tuple[pd.DataFrame, dict]:
    """What `run_experiment` would train, without writing anything: one row per chunk (after the time bound
    and the memory planner) with its students, padded width, Adam steps, memory estimate and the cost model's
    training minutes (`chunk_seconds`), and the run's device, workers and memory limit. With `measure_steps`,
    each chunk also trains at least that many steps (random data of the chunk's shape, on the config's device,
    with its threads per worker) and the steady time per step is extrapolated to the chunk's training: an
    estimate that leaves out evaluation and analysis, and the slowdown of workers running side by side.
    """
    spec = data_spec(cfg)
    n_fit = spec.n_fit
    work = plan_work(cfg, spec)
    device, workers, threads, memory = work.device, work.workers, work.threads, work.memory
    rows = []
    steps_of = {m: adam_steps(cfg, m, n_fit) for m in cfg.methods}
    for c in work.chunks:
        batch, steps = steps_of[c.method]
        row = {"chunk": c.id, "students": c.size, "padded_width": max(c.widths), "steps": steps,
               "memory_gb": memory["memory_estimate_bytes"][c.id] / 1e9, "model_min": chunk_seconds(cfg, c, n_fit) / 60}
        if measure_steps:
            with _torch_threads(threads):
                row["step_ms"] = 1e3 * _time_steps(cfg, c, spec, batch, measure_steps, device)
            row["train_s_estimate"] = row["steps"] * row["step_ms"] / 1e3
        rows.append(row)
    info = {"device": str(device), "workers": workers, "threads_per_worker": threads, "memory_limit_gb": memory["memory_limit_bytes"] / 1e9,
            "model_min_total": sum(r["model_min"] for r in rows), "max_chunk_minutes": cfg.max_chunk_minutes}
    if measure_steps:  # the workers take the chunks in this order (run_experiment's), each the next free one
        loads = [0.0] * workers
        for r in rows:
            loads[loads.index(min(loads))] += r["train_s_estimate"]
        info.update({"train_s_estimate_sequential": sum(r["train_s_estimate"] for r in rows), "train_s_estimate_wall": max(loads)})
    return pd.DataFrame(rows), info


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _time_steps(cfg: Config, chunk: Chunk, spec: DataSpec, batch: int, steps: int, device: torch.device) -> float:
    """Seconds per Adam step of `chunk` on random data of `spec`'s shape (at most its `n_fit` training
    patterns): at least `steps` steps are timed, after two epochs that are not (the first pays one-off
    costs, the second captures a CUDA graph where the config asks for one)."""
    per_epoch = min(max(1, -(-steps // 2)), -(-spec.n_fit // batch))
    timed = max(2, -(-steps // per_epoch))
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, cfg.dtype)
    x = torch.randn(cfg.trials, min(per_epoch * batch, spec.n_fit), spec.inputs, generator=gen, dtype=dtype)
    classify = spec.task == "classification"
    y = (torch.randint(0, spec.outputs, x.shape[:2], generator=gen) if classify
         else torch.randn(x.shape[:2], generator=gen, dtype=dtype))
    data = TrialData(x, y, x[:, :1], y[:, :1], spec.task, spec.outputs).to(device)
    prep = prepare_chunk(cfg, chunk, data, device)
    stamps: list[float] = []

    def on_epoch(epoch: int, loss: float) -> None:  # the loss was read back: the device has finished the epoch
        stamps.append(time.perf_counter())

    log = train_ensemble(prep.ens, data.x_train, data.y_train, prep.trial_index, replace(prep.spec, epochs=2 + timed, batch_size=batch),
                         prep.shuffle, on_epoch)
    return (stamps[-1] - stamps[1]) / (timed * log.steps // (2 + timed))


def check_fused(cfg: Config, device: torch.device | None, spec: DataSpec | None = None) -> None:
    """Refuse `backprop: fused` before anything is written where its kernels cannot run these students."""
    spec = spec or data_spec(cfg)
    input_dim, n_outputs = spec.inputs, spec.outputs
    method, width = cfg.methods[0], max(cfg.student.widths)
    from eigenprune.batched import fused  # imported when used: importing triton takes 0.25 s

    try:
        fused.check(Ensemble([make_student(input_dim, student_plans(cfg, method, width, 1.0, n_outputs), 0)]).layers, device)
    except ValueError as err:
        raise ConfigError(str(err)) from None
