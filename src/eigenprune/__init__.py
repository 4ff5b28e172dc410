"""eigenprune: spectral training and eigenvalue-ranked structural pruning of MLPs."""

from eigenprune.importance import node_importance
from eigenprune.layers import SpectralLinear, spectral_weight
from eigenprune.nets import as_sequential, despectralize, make_student, make_teacher, spectral_penalty, spectralize
from eigenprune.prune import prune_nodes

__version__ = "0.1.0"

__all__ = [
    "SpectralLinear",
    "as_sequential",
    "despectralize",
    "make_student",
    "make_teacher",
    "node_importance",
    "prune_nodes",
    "spectral_penalty",
    "spectral_weight",
    "spectralize",
]
