import os
import tempfile

import pytest
import torch

# Nothing a test does may write into $HOME.
_tmp = tempfile.mkdtemp(prefix="eigenprune-tests-")
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_tmp, "mpl"))
os.environ.setdefault("RAY_TMPDIR", os.path.join(_tmp, "ray"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


TINY = {
    "trials": 2,
    "data": {"n_train": 200, "n_test": 150},
    "student": {"widths": [6, 12]},
    "spectral": {"epochs": 3, "batch_size": 50},
    "direct": {"epochs": 3, "batch_size": 50},
}
