"""Every seed of an experiment, derived in one place from the config's `seed` with `core.seeds.derive_seed`
(the hash; this module names what each seed is for).

`eigenprune run`, `compare` and `recovery` use the same functions, so the same seed gives the same data,
initial parameters and batch order in all three.
"""

from __future__ import annotations

from eigenprune.core.seeds import derive_seed


def data_seed(seed: int, data_seed: int) -> int:
    """Seed of the trials' inputs (teacher data) or of their train/test splits (real data)."""
    return derive_seed("data", seed, data_seed)


def student_seed(seed: int, trial: int, width: int) -> int:
    """Initial parameters of the width-`width` student of `trial`: spectral and direct students share them."""
    return derive_seed("student", seed, trial, width)


def shuffle_seeds(seed: int, trials: int) -> list[int]:
    """Per trial, the seed of its epochs' batch order."""
    return [derive_seed("shuffle", seed, t) for t in range(trials)]
