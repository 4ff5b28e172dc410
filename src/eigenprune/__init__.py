"""eigenprune: spectral training and eigenvalue-ranked structural pruning.

`import eigenprune` loads the library alone (torch, numpy, safetensors): spectral layers, conversion,
importance and pruning. The paper's experiment runner lives in `eigenprune.experiments` and is loaded
only when used (`make_teacher` below loads it on first access).
"""

from eigenprune.core.convert import despectralize, plan_spectralize, spectral_penalty, spectralize
from eigenprune.core.layers import SpectralConv1d, SpectralConv2d, SpectralLinear, spectral_weight
from eigenprune.core.plans import make_student
from eigenprune.core.structure import as_sequential
from eigenprune.pruning.importance import node_importance
from eigenprune.pruning.prune import prune_nodes

__version__ = "0.1.0"

__all__ = [
    "SpectralConv1d",
    "SpectralConv2d",
    "SpectralLinear",
    "as_sequential",
    "despectralize",
    "make_student",
    "make_teacher",
    "node_importance",
    "plan_spectralize",
    "prune_nodes",
    "spectral_penalty",
    "spectral_weight",
    "spectralize",
]


def __getattr__(name: str):
    if name == "make_teacher":  # the paper's teacher belongs to the experiment runner
        from eigenprune.experiments.builders import make_teacher

        return make_teacher
    raise AttributeError(f"module 'eigenprune' has no attribute {name!r}")
