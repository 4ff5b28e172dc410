import json
import os
import struct
import tempfile

import pytest
import torch

# Nothing a test does may write into $HOME.
_tmp = tempfile.mkdtemp(prefix="eigenprune-tests-")
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_tmp, "mpl"))
os.environ.setdefault("RAY_TMPDIR", os.path.join(_tmp, "ray"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# One torch thread in tests and the processes they start: tiny tensors gain nothing from more, and
# on a busy 2-core machine extra threads wait for each other (one tiny run went from 58 s to 3 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Without a GPU, Triton's interpreter runs the fused kernels on the CPU (read when they are defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)


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


def edit_safetensors_header(blob: bytes, change) -> bytes:
    """A safetensors file's bytes with its JSON header edited in place by `change(header)` (data kept 8-byte aligned)."""
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + n])
    change(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + blob[8 + n :]
