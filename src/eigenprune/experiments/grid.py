"""A config's grid as chunks, and what every chunk needs: its students' plans, seeds and files, the device and the data.

A chunk is one method and a bucket of similar widths, with all trials: every student in it shares
learning rate, batch size and epochs, so the chunk trains as one `Ensemble`. Widths are bucketed
so that padding never more than `pack_factor`-folds the work, and only in chunks of small
steps (`PAD_LIMIT`), unless it adds less work than a step's fixed cost (`STEP_OVERHEAD`; see `plan_chunks`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from eigenprune.batched import tiled
from eigenprune.core.io import check_path
from eigenprune.core.plans import LayerPlan
from eigenprune.experiments import seeds
from eigenprune.experiments.builders import paper_student
from eigenprune.experiments.config import Config, ConfigError, DataConfig
from eigenprune.experiments.data import DataError, TrialData, csv_data, digits_data, file_sha256, teacher_data


@dataclass(frozen=True)
class Chunk:
    """Students trained together: one teacher, one method, some widths, all L2 strengths and all trials, or a
    group of them (`split`: by the chunk time bound or the memory planner; every trial keeps its seeds, data,
    batch order and padded width, so a split changes only the rounding of a student's arithmetic: see
    `plan.split_long_chunks`)."""

    method: str
    widths: tuple[int, ...]
    trials: tuple[int, ...]
    teacher: int = 0
    strengths: tuple[float, ...] = (1.0,)
    split: bool = False  # a subset of the trials, split off by the time bound or the memory planner (see plan.py)

    @functools.cached_property
    def id(self) -> str:
        name = f"{self.method}-w{'_'.join(map(str, self.widths))}" + (f"-t{self.teacher}" if self.teacher else "")
        return name + (f"-tr{self.trials[0]}_{self.trials[-1]}" if self.split else "")

    @property
    def size(self) -> int:
        """The number of students (`len(keys())` without listing them: a million trials are planned in milliseconds)."""
        return len(self.widths) * len(self.trials) * len(self.strengths)

    def keys(self) -> list[tuple[int, int, float]]:
        """(width, trial, strength) of every student, in ensemble order."""
        return [(w, t, k) for w in self.widths for t in self.trials for k in self.strengths]


PAD_LIMIT = 2**22
"""Padding is allowed only in chunks whose step holds at most this many first-layer activations
(students x batch rows x padded nodes: 16 MB in float32).

A small step is bound by its ~50 kernel launches and their Python (~0.35 ms on this project's 2-core
CPU) and its padding is nearly free; a step beyond a few million activations is bound by memory
bandwidth (~4 ns per activation element on the paper's widest chunks), where each padded zero costs
what a real node costs and the widths train faster apart. Measured with `eigenprune plan`
(docs/benchmarks.md): paper.yaml's estimate 3.1 h -> 2.4 h of training; the quick run and
cpu-paper keep their buckets."""

TILE_FROM = 2**22
"""With `tile: auto`, the first layer runs tiled (`batched.tiled`) in chunks whose step holds more than this
many first-layer activations (students x batch rows x padded nodes), on a CPU: where the step is bound by
memory traffic (see `PAD_LIMIT`). Measured on this project's 2-core CPU (docs/benchmarks.md, speed round 5):
1.13-1.49x faster a step on the wide chunks (30 x 500..1500); no gain on a narrow one (60 x 60 x 300).
The narrow chunks keep the eager step (the quick run's and cpu-paper's chunks are all below this)."""


def chunk_tile(cfg: Config, students: int, width: int, batch: int, device: torch.device, layers) -> int:
    """The `TrainSpec.tile` of a chunk of `students` padded to `width`, trained in batches of `batch` rows on
    `device`; `layers`: its stacked layers (a first layer with bias, or a single layer, is never tiled by auto)."""
    if cfg.tile != "auto":
        return cfg.tile
    if cfg.backprop != "manual" or cfg.compile or device.type != "cpu" or tiled.applies(layers) is not None:
        return 0
    return tiled.TILE if students * batch * width > TILE_FROM else 0


STEP_OVERHEAD = 80_000
"""What a training step's fixed cost is worth in first-layer activations (students x batch rows x nodes).

A step costs about 0.16 ms + 1.9 ns per activation on this project's 2-core CPU (docs/benchmarks.md,
speed round 3; round 2's ~0.35 ms + ~4 ns at the paper's widest chunks gives the same ratio), so padding
that adds fewer activations than this to a step costs less than the step a width would add in a chunk
of its own: such a width joins its neighbours whatever the pack factor says, within `PAD_LIMIT`
(cpu-paper's widths 10, 20, 40, 60 train as one chunk, and digits.yaml's 64 and 256)."""


MAX_CHUNKS = 5000
"""The most chunks a run may have (each trains on its own; the paper's grid has 20): more is a grid no machine
finishes, and planning them would take seconds."""


def pack_widths(widths: Sequence[int], pack_factor: float, floor: int = 0, max_padded: float = float("inf"),
                cheap: float = 0) -> list[list[int]]:
    """Group sorted distinct widths greedily: a width joins the current group while padding every width of the
    group to it makes at most `max_padded` nodes in all and costs <= pack_factor x the real work or adds (the
    group's size x the width's excess over the group's widest) at most `cheap` nodes; widths <= `floor` always
    share a group (there the per-step overhead dominates)."""
    buckets: list[list[int]] = []
    total = 0  # sum(buckets[-1]), kept as it grows: 10,000 widths in one bucket are packed in milliseconds
    for w in sorted(set(widths)):
        group = buckets[-1] if buckets else []
        padded = (len(group) + 1) * w
        if group and (w <= floor or (padded <= max_padded and (padded <= pack_factor * (total + w)
                                                               or len(group) * (w - group[-1]) <= cheap))):
            buckets[-1].append(w)
            total += w
        else:
            buckets.append([w])
            total = w
    return buckets


def plan_chunks(cfg: Config, pack_factor: float = 1.5, pad_limit: float = PAD_LIMIT, overhead: float = STEP_OVERHEAD) -> list[Chunk]:
    """Group widths (`pack_widths`) while a step of the padded chunk holds at most `pad_limit` first-layer
    activations at the method's batch size and the padded size stays <= pack_factor x the real size or the
    padding adds at most `overhead` activations to a step; one chunk per (teacher, method, bucket of widths)."""
    trials, strengths = tuple(range(cfg.trials)), tuple(cfg.strengths())
    per_width = len(trials) * len(strengths)
    buckets = {}
    for method in cfg.methods:
        rows = per_width * cfg.method(method).batch_size  # a step's rows of activations per width
        buckets[method] = pack_widths(cfg.student.widths, pack_factor, max_padded=pad_limit / rows, cheap=overhead / rows)
    teachers = len(cfg.teacher_list())
    count = teachers * sum(len(b) for b in buckets.values())
    if count > MAX_CHUNKS:
        raise ConfigError(f"the grid makes {count:,} chunks ({teachers} teacher(s) x {len(cfg.methods)} method(s) x "
                          f"{len(set(cfg.student.widths))} widths, in buckets), more than the {MAX_CHUNKS:,} eigenprune plans; "
                          "use fewer teachers or widths")
    return [Chunk(method, tuple(b), trials, teacher, strengths)
            for teacher in range(teachers) for method in cfg.methods for b in buckets[method]]


def student_plans(cfg: Config, method: str, width: int, strength: float = 1.0, n_outputs: int = 1) -> list[LayerPlan]:
    """The paper's student: width N (spectral or direct, L2 x strength) -> rest (dense, no L2) -> sum readout.

    With `student.deep` the rest trains like the first layer (its own eigenvalues and L2); with
    `student.head: linear` the readout is a trainable dense layer with bias to `n_outputs`.
    """
    m = cfg.method(method)
    l2_phi, l2_lam = m.l2_phi * strength, m.l2_lam * strength
    if cfg.parity.l2_float32:  # Keras rounds its coefficients to float32 even in float64 runs
        l2_phi, l2_lam = float(np.float32(l2_phi)), float(np.float32(l2_lam))
    first = LayerPlan(width, method, l2_phi, l2_lam)
    return paper_student(first, list(cfg.student.rest), cfg.student.deep, cfg.student.head, n_outputs)


def student_file(method: str, width: int, trial: int, strength: float) -> str:
    """File name of a student's checkpoint inside its chunk's students/ folder."""
    return f"{method}-N{width}-t{trial}" + (f"-s{strength:g}" if strength != 1.0 else "") + ".safetensors"


def student_seed(cfg: Config, trial: int, width: int) -> int:
    """Spectral and direct students of one (trial, width) start from the same parameters."""
    return seeds.student_seed(cfg.seed, trial, width)


def resolve_device(name: str) -> torch.device:
    """The device a config names ("auto": CUDA where available); ConfigError for CUDA without a CUDA device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but no CUDA device is available; use --device cpu")
    return torch.device(name)


def make_data(cfg: Config) -> TrialData:
    """The trials' train/test sets: teacher data, or a per-trial split of digits or a CSV file."""
    d = cfg.data
    seed = seeds.data_seed(cfg.seed, d.seed)
    if d.source == "digits":
        return digits_data(cfg.trials, seed, d.test_fraction, getattr(torch, cfg.dtype))
    if d.source == "csv":  # the file's bytes are part of the run's identity: hashed as they are read
        check_path(d.csv.path, "data.csv.path", DataError)  # before is_file(), which raises on a name too long
        digest = file_sha256(d.csv.path) if Path(d.csv.path).is_file() else None
        data = csv_data(d.csv.path, d.csv.target, d.csv.features, d.csv.task, cfg.trials, seed, d.test_fraction,
                        getattr(torch, cfg.dtype))
        return replace(data, source_sha256=digest)
    return teacher_set(d, seed, cfg.trials, getattr(torch, cfg.dtype))


def teacher_set(d: DataConfig, seed: int, trials: int, dtype: torch.dtype) -> TrialData:
    """Teacher-labelled train/test sets of `trials` trials for a data config (see `data.teacher_data`)."""
    t = d.teacher
    return teacher_data(t.kind, d.input_dim, list(t.widths), t.seed, seed, trials, d.n_train, d.n_test, t.latent_dim,
                        d.standardize_targets, dtype)


def validation_split(cfg: Config, n_train: int | None = None) -> int:
    """Training patterns actually trained on (on a regularization path, the rest of the training set is
    held out as the validation set that chooses the strength)."""
    n_train = cfg.data.n_train if n_train is None else n_train
    if cfg.regularization.mode != "path":
        return n_train
    n_fit = n_train - round(n_train * cfg.regularization.validation_fraction)
    if n_fit < 1 or n_fit == n_train:
        raise ConfigError(f"regularization.validation_fraction {cfg.regularization.validation_fraction} leaves no "
                          f"training or no validation patterns out of {n_train} training patterns")
    return n_fit


def check_same_data(cfg: Config, data: TrialData, data_sha256: str | None) -> None:
    """Refuse (`DataError`) data whose source file is no longer the one the run started on."""
    if data.source_sha256 != data_sha256:
        raise DataError(f"{cfg.data.csv.path} changed while the run was going (sha256 {str(data_sha256)[:12]} at the start, "
                        f"{str(data.source_sha256)[:12]} now); finished chunks are kept, rerun once the file is final")


def data_shape(cfg: Config) -> tuple[tuple[int, int, int, int] | None, str | None]:
    """(inputs, training patterns, test patterns, outputs) of real data (None for teacher data, whose
    shape is the config's), and the sha256 of the user's file it came from (None if none); loading it
    here makes bad data fail before a run folder exists."""
    shape, digest = None, None
    if cfg.data.source != "teacher":
        real = make_data(cfg)
        shape = (real.x_train.shape[-1], real.x_train.shape[1], real.x_test.shape[1], real.n_outputs)
        digest = real.source_sha256
    n_train = shape[1] if shape else cfg.data.n_train
    n_fit = validation_split(cfg, n_train)
    for method in cfg.methods:
        batch = cfg.method(method).batch_size
        if batch > n_fit:
            held = f" ({n_train - n_fit} of the {n_train} are held out for validation)" if n_fit < n_train else ""
            raise ConfigError(f"{method}.batch_size {batch} is larger than the {n_fit} training patterns{held}; "
                              f"use a batch_size of at most {n_fit}")
    return shape, digest
