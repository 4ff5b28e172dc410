"""eigenprune: spectral training and eigenvalue-ranked structural pruning.

`import eigenprune` loads the library alone (torch, numpy, safetensors, torch-pruning): spectral layers, conversion,
importance, pruning and checkpoints; `eigenprune.core` and `eigenprune.pruning` are its two faces, with more. The
paper's experiment runner (teachers, students of the paper's shape, the grid) lives in `eigenprune.experiments` and
is loaded only when imported.
"""

from eigenprune.core import (
    EigenpruneError,
    SpectralConv1d,
    SpectralConv2d,
    SpectralConv3d,
    SpectralLinear,
    as_sequential,
    despectralize,
    plan_spectralize,
    spectral_penalty,
    spectral_weight,
    spectralize,
)
from eigenprune.pruning import (
    EigenImportance,
    KeepSpec,
    PruneError,
    ShrinkResult,
    load_model,
    node_importance,
    prune_nodes,
    save_model,
    shrink,
)

__version__ = "0.1.0"

__all__ = [
    "EigenImportance",
    "EigenpruneError",
    "KeepSpec",
    "PruneError",
    "ShrinkResult",
    "SpectralConv1d",
    "SpectralConv2d",
    "SpectralConv3d",
    "SpectralLinear",
    "as_sequential",
    "despectralize",
    "load_model",
    "node_importance",
    "plan_spectralize",
    "prune_nodes",
    "save_model",
    "shrink",
    "spectral_penalty",
    "spectral_weight",
    "spectralize",
]
