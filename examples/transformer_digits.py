"""A tiny transformer encoder on scikit-learn's 8x8 digits, rows as tokens: train spectral and direct, prune the MLPs.

Each image is 8 tokens (its rows) of 8 pixels. Pruning reaches the feed-forward layers inside each
`nn.TransformerEncoderLayer`; the residual stream (tied to LayerNorm and attention) is left alone and reported.

    python examples/transformer_digits.py           # about 10 s on the 2-core VM (one thread)
    python examples/transformer_digits.py --tiny    # seconds (what the tests run)
"""

from __future__ import annotations

import torch
from _common import parse_args, run_example, split
from sklearn.datasets import load_digits
from torch import nn


class RowTransformer(nn.Module):
    """Linear embedding of each row + learned positions, 2 encoder layers (4 heads), mean over tokens, linear head."""

    def __init__(self, d: int = 32, ff: int = 128, layers: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.position = nn.Embedding(8, d)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d, 4, ff, dropout=0.0, batch_first=True), layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.position(torch.arange(x.shape[1], device=x.device))
        return self.head(self.encoder(h).mean(1))


def load(seed: int = 0, limit: int | None = None):
    """Digits as [N, 8 tokens, 8 pixels] in [0, 1] and labels, split 75/25."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    return split(x[:limit], y[:limit], seed)


def main() -> None:
    args = parse_args(__doc__, "images", "MLP's neurons")
    data = load(limit=300 if args.tiny else None)
    run_example("transformer on digits", RowTransformer, data, epochs=2 if args.tiny else 30,
                finetune_epochs=1 if args.tiny else 3, keep=args.keep)


if __name__ == "__main__":
    main()
