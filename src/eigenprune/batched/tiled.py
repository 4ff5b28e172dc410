"""The first layer of the hand-written step in cache-sized tiles (`backprop: manual` with `tile`; any device, meant for CPUs).

On the paper's wide chunks (30 students x 300 rows x up to 1500 nodes) the first hidden layer's activations
[S, B, N] are tens of MB per tensor: the eager step writes and reads them from memory about ten times a
step, and the CPU's GEMM is slower on operands that do not stay in cache. Here the first two layers run
tile by tile (a few students, a block of rows), with the same interface as the Triton kernels of
`eigenprune.batched.fused` (whose design this is, in torch operations):

  forward   z2 = relu(x W1^T) W2^T                     per tile; h1 = relu(x W1^T) is not kept
  backward  gW2 = delta2^T h1,  gW1 = ((delta2 W2) * [h1 > 0])^T x,  h1 recomputed per tile

so every [S, B, N] tensor of the step exists only one tile at a time, in cache. The products are taken in
the orientation `ensemble.bmm` picks for a wide first layer (N >= B, D, M), so a tile of whole students
computes exactly what the eager step does (bit for bit, tested); a tile of part of the rows sums the
weight gradients over row blocks, which changes only the order of that sum (last bits). W1 [S, N, D],
W2 [S, M, N] are direct-space weights.
"""

from __future__ import annotations

import torch

TILE = 2**19
"""First-layer activations per tile by default (2 MB in float32; a tile's activations and their gradient,
4 MB, stay in the L3 cache): on this project's 2-core CPU one student of the paper's widest chunk (300
rows x 1500 nodes) a tile. Smaller tiles that fit the 1 MiB L2 were slower: a step then makes hundreds
of small products, each with its fixed cost (docs/benchmarks.md, speed round 5)."""


def applies(layers) -> str | None:
    """Why the first layer of these stacked layers cannot run tiled (None if it can): it needs a second layer
    (ReLU between the two) and no bias."""
    if len(layers) < 2:
        return "a tiled first layer needs at least two layers (it feeds the second tile by tile)"
    if layers[0].bias is not None and layers[0].bias is not False:  # a bias tensor, or a `LayerPlan` with bias=True
        return "a tiled first layer needs a first layer without bias"
    return None


def tiles(students: int, rows: int, nodes: int, size: int) -> tuple[int, int]:
    """(students, rows) per tile: whole students while one's rows x nodes fit `size` activations, else one
    student and equal blocks of rows."""
    per_student = rows * nodes
    if per_student <= size:
        return min(students, max(1, size // per_student)), rows
    blocks = -(-per_student // size)
    return 1, -(-rows // blocks)


class Tiled:
    """`forward` and `backward` of the first layer in tiles of about `size` activations (see the module docstring).

    A tile's activations and their gradient are written into the same two buffers every time (made once per
    call), so that the tiles of a step cycle through one cache-sized piece of memory, not through fresh
    allocations."""

    def __init__(self, size: int = TILE) -> None:
        if size < 1:
            raise ValueError(f"tile size must be at least 1 activation, got {size}")
        self.size = size

    def forward(self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        """relu(x W1^T) W2^T for every student: x [S, B, D], w1 [S, N, D], w2 [S, M, N] -> [S, B, M]."""
        (s, b, _), n, m = x.shape, w1.shape[1], w2.shape[1]
        g, r = tiles(s, b, n, self.size)
        z2 = x.new_empty(s, m, b)  # the layout bmm gives a product with few columns (transposed)
        buffer = x.new_empty(g * r * n)
        w1t = w1.transpose(1, 2)
        for i in range(0, s, g):
            for j in range(0, b, r):
                xs = x[i:i + g, j:j + r]
                h = torch.bmm(xs, w1t[i:i + g], out=_view(buffer, xs.shape[0], xs.shape[1], n)).relu_()
                z2[i:i + g, :, j:j + r] = torch.bmm(w2[i:i + g], h.transpose(1, 2))
        return z2.transpose(1, 2)

    def backward(self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, delta2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of W1 [S, N, D] (a transposed view, as the eager step's) and W2 [S, M, N] given delta2 = d(loss)/d(z2) [S, B, M]."""
        (s, b, d), n, m = x.shape, w1.shape[1], w2.shape[1]
        g, r = tiles(s, b, n, self.size)
        gw1t, gw2 = x.new_empty(s, d, n), x.new_empty(s, m, n)
        buffers = x.new_empty(2, g * r * n)
        w1t = w1.transpose(1, 2)
        for i in range(0, s, g):
            students = slice(i, i + g)
            for j in range(0, b, r):
                xs, ds = x[students, j:j + r], delta2[students, j:j + r]
                h, dh = (_view(buf, xs.shape[0], xs.shape[1], n) for buf in buffers)
                torch.bmm(xs, w1t[students], out=h).relu_()
                torch.bmm(ds, w2[students], out=dh)
                torch.ops.aten.threshold_backward.grad_input(dh, h, 0, grad_input=dh)  # ReLU's gradient, in place
                if j == 0:
                    torch.bmm(ds.transpose(1, 2), h, out=gw2[students])
                    torch.bmm(xs.transpose(1, 2), dh, out=gw1t[students])
                else:
                    gw2[students].baddbmm_(ds.transpose(1, 2), h)
                    gw1t[students].baddbmm_(xs.transpose(1, 2), dh)
        return gw1t.transpose(1, 2), gw2


def _view(buffer: torch.Tensor, *shape: int) -> torch.Tensor:
    """The start of a flat buffer as a contiguous tensor of `shape` (the last tile may be smaller)."""
    return buffer[:shape[0] * shape[1] * shape[2]].view(shape)
