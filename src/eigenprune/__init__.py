"""eigenprune: spectral training and eigenvalue-ranked structural pruning of MLPs."""

from eigenprune.layers import SpectralLinear, spectral_weight
from eigenprune.nets import despectralize, make_student, make_teacher, spectral_penalty, spectralize

__version__ = "0.1.0"

__all__ = [
    "SpectralLinear",
    "despectralize",
    "make_student",
    "make_teacher",
    "spectral_penalty",
    "spectral_weight",
    "spectralize",
]
