"""A config's grid as chunks: which students train together.

A chunk is one method and a bucket of similar widths, with all trials: every student in it shares
learning rate, batch size and epochs, so the chunk trains as one `Ensemble`. Widths are bucketed
so that padding never more than `pack_factor`-folds the work, and only in chunks of small
steps (`PAD_LIMIT`), unless it adds less work than a step's fixed cost (`STEP_OVERHEAD`; see `plan_chunks`).
What a chunk's students are (`builders.student_plans`), its data (`data.make_data`) and how it trains and
is measured (`measure`) live elsewhere: this module only groups.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from eigenprune.experiments.config import Config, ConfigError


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

A small step is bound by its kernel launches and their Python, and its padding is nearly free; a large
step is bound by memory bandwidth, where each padded zero costs what a real node costs and the widths
train faster apart (measurements: docs/benchmarks.md, `grid.PAD_LIMIT`)."""

STEP_OVERHEAD = 80_000
"""What a training step's fixed cost is worth in first-layer activations (students x batch rows x nodes).

Padding that adds fewer activations than this to a step costs less than the step a width would add in a
chunk of its own, so such a width joins its neighbours whatever the pack factor says, within `PAD_LIMIT`
(the cost model and its measurements: docs/benchmarks.md, `grid.STEP_OVERHEAD`)."""


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
    trials, strengths = tuple(range(cfg.trials)), tuple(cfg.regularization.strengths())
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
