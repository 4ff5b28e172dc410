"""The paper's networks: the frozen teacher and the shape of its student."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from eigenprune.core.layers import glorot_uniform_
from eigenprune.core.plans import LayerPlan


def paper_student(first: LayerPlan, rest: list[int], deep: bool = False, head: str = "sum", n_outputs: int = 1) -> list[LayerPlan]:
    """Plans of the paper's student: `first`, then hidden widths `rest` (dense and unregularized, or
    trained like `first` when `deep`), then the readout: the frozen all-ones sum ("sum") or a trainable
    dense layer with bias to `n_outputs` ("linear")."""
    hidden = [replace(first, width=w) if deep else LayerPlan(w, "direct", 0.0, 0.0) for w in rest]
    readout = LayerPlan(n_outputs, "direct", 0.0, 0.0, bias=True) if head == "linear" else LayerPlan(1, "fixed", 0.0, 0.0)
    return [first, *hidden, readout]


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
