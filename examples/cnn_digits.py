"""A small CNN on scikit-learn's 8x8 digits: train spectral and direct, prune channels, fine-tune, print a table.

    python examples/cnn_digits.py           # about 10 s on the 2-core VM (one thread)
    python examples/cnn_digits.py --tiny    # seconds (what the tests run)

The shortest form of pruning your own model with eigenprune:

    model = spectralize(MyNet())                      # every Linear/Conv1d/Conv2d, exactly the same function
    ...train with loss + spectral_penalty(model)...
    small = prune_nodes(model, 0.25, example_inputs=x[:2])   # keep 25% of each channel group, ranked by eigenvalue
"""

from __future__ import annotations

import torch
from _common import parse_args, run_example, split
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F


class DigitsCNN(nn.Module):
    """conv 1->16, conv 16->32, a residual conv 32->32, then two dense layers; ReLU throughout."""

    def __init__(self, c1: int = 16, c2: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * 4 * 4, hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # [B, c2, 4, 4]
        h = h + F.relu(self.conv3(h))  # residual: conv2 and conv3 share their channels
        return self.head(F.relu(self.fc(h.flatten(1))))


def load(seed: int = 0, limit: int | None = None):
    """Digits as [N, 1, 8, 8] images in [0, 1] and labels, split 75/25."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target)
    return split(x[:limit], y[:limit], seed)


def main() -> None:
    args = parse_args(__doc__, "images", "channel group")
    data = load(limit=300 if args.tiny else None)
    run_example("CNN on digits", DigitsCNN, data, epochs=2 if args.tiny else 25, finetune_epochs=1 if args.tiny else 3, keep=args.keep)


if __name__ == "__main__":
    main()
