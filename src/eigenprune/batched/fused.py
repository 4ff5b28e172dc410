"""Fused first layer for the hand-written step (`batched.ensemble.ManualStep`, Triton): its activations never leave the chip.

The first hidden layer is the widest (N up to 1500) but sees only D inputs and feeds M outputs (the
paper: D = M = 10), so in the eager step its activations [S, B, N] dominate the memory traffic (see
benchmarks/floor.py). Two kernels replace everything that touches them:

  forward   z2 = relu(x W1^T) W2^T                     one program per (student, block of rows)
  backward  gW2 = delta2^T h1,  gW1 = ((delta2 W2) * [h1 > 0])^T x,  h1 = relu(x W1^T) recomputed
                                                       one program per (student, block of nodes)

W1 [S, N, D] and W2 [S, M, N] are the direct-space weights; the layers after the second run eagerly.
Matmuls are in IEEE float32 (no TF32), so results match the eager step up to summation order.
Kernels run on CUDA; with TRITON_INTERPRET=1 set before import, Triton's interpreter runs them on
the CPU (slowly: for tests).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: only backprop="fused" needs it
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_B, BLOCK_N = 64, 64
MAX_DIM = 128  # inputs and second-layer width held whole in one program's tiles


def unavailable(device: torch.device) -> str | None:
    """Why the fused kernels cannot run on `device` (None if they can)."""
    if triton is None:
        return "backprop 'fused' needs triton (it comes with CUDA builds of torch; pip install triton)"
    if device.type != "cuda" and not INTERPRET:
        return f"backprop 'fused' runs on a CUDA device, not {device.type} (TRITON_INTERPRET=1 emulates it, slowly)"
    return None


def check(layers, device: torch.device | None) -> None:
    """Raise ValueError unless the fused first layer applies to these stacked layers on `device`
    (None: leave the device out, e.g. where each Ray task resolves its own)."""
    reason = unavailable(device) if device is not None else None
    if reason is None and len(layers) < 2:
        reason = "backprop 'fused' needs at least two layers (it fuses the first into the second)"
    if reason is None and layers[0].bias is not None:
        reason = "backprop 'fused' needs a first layer without bias"
    if reason is None and layers[0].phi.dtype != torch.float32:
        reason = f"backprop 'fused' runs in float32, not {layers[0].phi.dtype}"
    if reason is None and max(layers[0].phi.shape[2], layers[1].phi.shape[1]) > MAX_DIM:
        reason = (f"backprop 'fused' supports up to {MAX_DIM} inputs and second-layer nodes, got {layers[0].phi.shape[2]} "
                  f"and {layers[1].phi.shape[1]}; use backprop: manual")
    if reason is not None:
        raise ValueError(reason)


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


if triton is not None:

    @triton.jit
    def _forward_kernel(x, sx_s, sx_b, w1, w2, z2, B, N, D, M,
                        DP: tl.constexpr, MP: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr):
        s = tl.program_id(0)
        rb = tl.program_id(1) * BB + tl.arange(0, BB)
        rd = tl.arange(0, DP)
        rm = tl.arange(0, MP)
        xt = tl.load(x + s * sx_s + rb[:, None] * sx_b + rd[None, :], mask=(rb[:, None] < B) & (rd[None, :] < D), other=0.0)
        acc = tl.zeros([BB, MP], dtype=tl.float32)
        for n0 in range(0, N, BN):
            rn = n0 + tl.arange(0, BN)
            w1t = tl.load(w1 + s * N * D + rn[:, None] * D + rd[None, :], mask=(rn[:, None] < N) & (rd[None, :] < D), other=0.0)
            h = tl.maximum(tl.dot(xt, tl.trans(w1t), input_precision="ieee"), 0.0)
            w2t = tl.load(w2 + s * M * N + rm[None, :] * N + rn[:, None], mask=(rn[:, None] < N) & (rm[None, :] < M), other=0.0)
            acc += tl.dot(h, w2t, input_precision="ieee")
        tl.store(z2 + s * B * M + rb[:, None] * M + rm[None, :], acc, mask=(rb[:, None] < B) & (rm[None, :] < M))

    @triton.jit
    def _backward_kernel(x, sx_s, sx_b, w1, w2, d2, gw1, gw2, B, N, D, M,
                         DP: tl.constexpr, MP: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr):
        s = tl.program_id(0)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        rd = tl.arange(0, DP)
        rm = tl.arange(0, MP)
        w1t = tl.load(w1 + s * N * D + rn[:, None] * D + rd[None, :], mask=(rn[:, None] < N) & (rd[None, :] < D), other=0.0)
        w2t = tl.load(w2 + s * M * N + rm[:, None] * N + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        g1 = tl.zeros([BN, DP], dtype=tl.float32)
        g2 = tl.zeros([MP, BN], dtype=tl.float32)
        for b0 in range(0, B, BB):
            rb = b0 + tl.arange(0, BB)
            xt = tl.load(x + s * sx_s + rb[:, None] * sx_b + rd[None, :], mask=(rb[:, None] < B) & (rd[None, :] < D), other=0.0)
            h = tl.maximum(tl.dot(xt, tl.trans(w1t), input_precision="ieee"), 0.0)
            dt = tl.load(d2 + s * B * M + rb[:, None] * M + rm[None, :], mask=(rb[:, None] < B) & (rm[None, :] < M), other=0.0)
            g2 += tl.dot(tl.trans(dt), h, input_precision="ieee")
            dh = tl.where(h > 0.0, tl.dot(dt, w2t, input_precision="ieee"), 0.0)
            g1 += tl.dot(tl.trans(dh), xt, input_precision="ieee")
        tl.store(gw1 + s * N * D + rn[:, None] * D + rd[None, :], g1, mask=(rn[:, None] < N) & (rd[None, :] < D))
        tl.store(gw2 + s * M * N + rm[:, None] * N + rn[None, :], g2, mask=(rm[:, None] < M) & (rn[None, :] < N))


def _x(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """relu(x W1^T) W2^T for every student: x [S, B, D], w1 [S, N, D], w2 [S, M, N] -> [S, B, M]."""
    x, w1, w2 = _x(x), w1.contiguous(), w2.contiguous()
    (s, b, d), n, m = x.shape, w1.shape[1], w2.shape[1]
    z2 = x.new_empty(s, b, m)
    _forward_kernel[(s, triton.cdiv(b, BLOCK_B))](x, x.stride(0), x.stride(1), w1, w2, z2, b, n, d, m,
                                                   DP=_pad(d), MP=_pad(m), BB=BLOCK_B, BN=BLOCK_N)
    return z2


def backward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, delta2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of W1 [S, N, D] and W2 [S, M, N] given delta2 = d(loss)/d(z2) [S, B, M]."""
    x, w1, w2, delta2 = _x(x), w1.contiguous(), w2.contiguous(), delta2.contiguous()
    (s, b, d), n, m = x.shape, w1.shape[1], w2.shape[1]
    gw1, gw2 = torch.empty_like(w1), torch.empty_like(w2)
    _backward_kernel[(s, triton.cdiv(n, BLOCK_N))](x, x.stride(0), x.stride(1), w1, w2, delta2, gw1, gw2, b, n, d, m,
                                                    DP=_pad(d), MP=_pad(m), BB=BLOCK_B, BN=BLOCK_N)
    return gw1, gw2
