"""Spectral layers and the math every other layer uses: the layers, converting any model to and from them, the
penalty, reading a model's structure, losses, training one model, students from layer plans, writing files."""

from eigenprune.core.convert import SpectralizeError, SpectralizeReport, despectralize, plan_spectralize, spectral_penalty, spectralize
from eigenprune.core.errors import EigenpruneError
from eigenprune.core.io import OutputError
from eigenprune.core.layers import (
    DEPTHWISE_LAYERS,
    PLAIN_LAYERS,
    SPECTRAL_LAYERS,
    SpectralConv1d,
    SpectralConv2d,
    SpectralConv3d,
    SpectralDepthwiseConv1d,
    SpectralDepthwiseConv2d,
    SpectralDepthwiseConv3d,
    SpectralLinear,
    SpectralModule,
    spectral_twin,
    spectral_weight,
)
from eigenprune.core.losses import Task, task_loss
from eigenprune.core.plans import LayerPlan, make_student
from eigenprune.core.structure import as_sequential, layer_sizes, linear_layers
from eigenprune.core.training import TrainingError, TrainSpec, evaluate, fit, train_alone

__all__ = [
    "DEPTHWISE_LAYERS",
    "PLAIN_LAYERS",
    "SPECTRAL_LAYERS",
    "EigenpruneError",
    "LayerPlan",
    "OutputError",
    "SpectralConv1d",
    "SpectralConv2d",
    "SpectralConv3d",
    "SpectralDepthwiseConv1d",
    "SpectralDepthwiseConv2d",
    "SpectralDepthwiseConv3d",
    "SpectralLinear",
    "SpectralModule",
    "SpectralizeError",
    "SpectralizeReport",
    "Task",
    "TrainSpec",
    "TrainingError",
    "as_sequential",
    "despectralize",
    "evaluate",
    "fit",
    "layer_sizes",
    "linear_layers",
    "make_student",
    "plan_spectralize",
    "spectral_penalty",
    "spectral_twin",
    "spectral_weight",
    "spectralize",
    "task_loss",
    "train_alone",
]
