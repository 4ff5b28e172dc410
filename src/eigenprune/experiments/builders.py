"""The paper's networks: the frozen teacher and the shape of its student (`paper_student`), and a run's
student as its config describes it (`student_plans`)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn

from eigenprune.core.layers import glorot_uniform_
from eigenprune.core.plans import LayerPlan
from eigenprune.experiments.config import Config


def paper_student(first: LayerPlan, rest: list[int], deep: bool = False, head: str = "sum", n_outputs: int = 1) -> list[LayerPlan]:
    """Plans of the paper's student: `first`, then hidden widths `rest` (dense and unregularized, or
    trained like `first` when `deep`), then the readout: the frozen all-ones sum ("sum") or a trainable
    dense layer with bias to `n_outputs` ("linear")."""
    hidden = [replace(first, width=w) if deep else LayerPlan(w, "direct", 0.0, 0.0) for w in rest]
    readout = LayerPlan(n_outputs, "direct", 0.0, 0.0, bias=True) if head == "linear" else LayerPlan(1, "fixed", 0.0, 0.0)
    return [first, *hidden, readout]


def student_plans(cfg: Config, method: str, width: int, strength: float = 1.0, n_outputs: int = 1) -> list[LayerPlan]:
    """A run's student: width N (spectral or direct, L2 x strength) -> rest (dense, no L2) -> sum readout.

    With `student.deep` the rest trains like the first layer (its own eigenvalues and L2); with
    `student.head: linear` the readout is a trainable dense layer with bias to `n_outputs`.
    """
    m = cfg.method(method)
    l2_phi, l2_lam = m.l2_phi * strength, m.l2_lam * strength
    if cfg.parity.l2_float32:  # Keras rounds its coefficients to float32 even in float64 runs
        l2_phi, l2_lam = float(np.float32(l2_phi)), float(np.float32(l2_lam))
    first = LayerPlan(width, method, l2_phi, l2_lam)
    return paper_student(first, list(cfg.student.rest), cfg.student.deep, cfg.student.head, n_outputs)


def make_teacher(input_dim: int, widths: list[int], seed: int, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """A frozen MLP teacher: input -> widths... (ReLU, no bias, Glorot from `seed`) -> sum of the last layer."""
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    n_in = input_dim
    for width in widths:
        linear = nn.Linear(n_in, width, bias=False, dtype=dtype)
        glorot_uniform_(linear.weight, generator)
        layers += [linear, nn.ReLU()]
        n_in = width
    readout = nn.Linear(n_in, 1, bias=False, dtype=dtype)
    nn.init.ones_(readout.weight)
    layers.append(readout)
    teacher = nn.Sequential(*layers)
    teacher.requires_grad_(False)
    return teacher
