"""How many bytes a chunk needs, and how many this machine offers: refuse a grid before it trains.

`chunk_bytes` counts the tensors one chunk holds at its peak, in elements of size e, for S students,
T trials, P training and Q test patterns, batch B and padded layer widths n_0 = D (inputs),
n_1 = N (the widest student), n_2, ..., n_L = 1:

    data         T (P + Q)(D + 1)                        every trial's sets, held for the whole chunk
    parameters   S sum_l [6 n_l n_{l-1} + 4 (n_{l-1} + 2 n_l)]
                 phi, lam_in, lam_out, bias with gradients and Adam's two moments, plus the dense
                 weights w = (lam_in - lam_out) phi and their gradients
    training     (T + S) P (D + 1) + 4 S B sum_l n_l     each epoch's shuffled copy and its per-student
                                                         gather; pre/post-ReLU activations and gradients
    evaluation   S C (D + 2 sum_l n_l), C = min(8192, max(P, Q))
    curves       S c N (3 n_2 + 3 + sum_{l>2} n_l), c = min(Q, max(1, 2^24 // (S N n_2)))
                 the prefix-sum buffers of `batched.curves.pruning_curves`

    bytes = e (data + parameters + max(training, evaluation, curves)) + RUNTIME_BYTES

RUNTIME_BYTES is the resident size of a Python process with torch loaded. The estimate is meant to be
within a factor of two of the measured peak (see docs/reliability.md), which is enough to refuse a
grid that cannot fit before it starts rather than have the kernel kill it hours in.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch

from eigenprune.pruning.chain import CURVE_BUDGET

RUNTIME_BYTES = 400 * 2**20
DEFAULT_FRACTION = 0.8
EVAL_BLOCK = 8192  # patterns per block in train.evaluate


# glibc's mallopt parameters (malloc.h) and the values `reuse_freed_memory` sets
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 2**30


@functools.cache  # process-wide and inherited by forked workers: once is enough
def reuse_freed_memory() -> bool:
    """Make this process's C allocator (glibc) keep freed blocks of up to 1 GiB for reuse.

    By default glibc serves a block above its mmap threshold (128 KiB, raised as such blocks are
    freed, never above 32 MiB) with a fresh mmap that it returns on free, and trims the heap's top
    beyond twice that threshold, so a training step
    that allocates its [students, batch, width] activations anew pays a page fault per 4 KiB page
    every time: on the paper's widest chunk (90 x 100 x 1500 float32, 54 MB) one bmm took 24 ms
    instead of 5.5 ms (docs/benchmarks.md). Raising both thresholds keeps the memory in the
    process, at the price of a resident size that stays at its peak, which the memory planner's
    estimate already assumes. The experiment runner calls this in every process that trains; a
    library user may call it too. Returns whether it applied (False off glibc, e.g. macOS, musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the symbols this process already has (no search for the library, no subprocess)
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))


def step_flops(widths: list[int]) -> int:
    """Floating-point operations of one Adam step per student and pattern, for layer widths
    [inputs, hidden..., outputs]: forward (2 i o per layer), weight gradients (2 i o) and the gradients of
    every layer's input but the first (2 i o), element-wise work not counted."""
    return sum(6 * i * o for i, o in zip(widths[:-1], widths[1:])) - 2 * widths[0] * widths[1]


def chunk_bytes(
    n_students: int, trials: int, widths: list[int], n_train: int, n_test: int, batch_size: int, element_size: int,
) -> int:
    """Estimated peak bytes of one chunk; `widths` = [inputs, padded first hidden width, ..., outputs]."""
    s, d, n = n_students, widths[0], widths[1]
    data = trials * (n_train + n_test) * (d + 1)
    params = s * sum(6 * o * i + 4 * (i + 2 * o) for i, o in zip(widths[:-1], widths[1:]))
    training = (trials + s) * n_train * (d + 1) + 4 * s * min(batch_size, n_train) * sum(widths[1:])
    block = min(EVAL_BLOCK, max(n_train, n_test))
    evaluation = s * block * (d + 2 * sum(widths[1:]))
    nxt = widths[2] if len(widths) > 2 else 1
    rows = max(1, min(n_test, CURVE_BUDGET // max(s * n * nxt, 1)))
    curves = s * rows * n * (3 * nxt + 3 + sum(widths[3:]))
    return element_size * (data + params + max(training, evaluation, curves)) + RUNTIME_BYTES


def available_bytes(device: torch.device) -> int:
    """Free memory on `device`: free GPU memory on CUDA; on the CPU, the memory the OS reports as available."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def gb(n: float) -> str:
    """Bytes as a short decimal-gigabyte string (1 GB = 1e9 bytes)."""
    return f"{n / 1e9:.3g} GB"
