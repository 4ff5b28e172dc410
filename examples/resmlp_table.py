"""A residual MLP on a CSV table: train spectral and direct, prune neurons, fine-tune, print a table.

The table is written from scikit-learn's `make_classification` (4 classes, 20 columns) into a temporary
folder and read back as any CSV would be; nothing is downloaded.

    python examples/resmlp_table.py           # about 10 s on the 2-core VM (one thread)
    python examples/resmlp_table.py --tiny    # seconds (what the tests run)
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import parse_args, run_example, split
from sklearn.datasets import make_classification
from torch import nn


class ResidualMLP(nn.Module):
    """x -> Linear -> 2 blocks h + Linear(ReLU(Linear(BatchNorm(h)))) -> ReLU -> Linear."""

    def __init__(self, d_in: int = 20, width: int = 64, hidden: int = 128, classes: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.BatchNorm1d(width), nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width)) for _ in range(2))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(torch.relu(h))


def write_csv(folder: Path, rows: int) -> Path:
    """The table as CSV: 20 feature columns and a 'label' column."""
    x, y = make_classification(n_samples=rows, n_features=20, n_informative=12, n_redundant=4, n_classes=4,
                               n_clusters_per_class=2, class_sep=1.5, random_state=0)
    path = folder / "table.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f"f{i}" for i in range(x.shape[1])] + ["label"])
        writer.writerows([*map(float, row), int(label)] for row, label in zip(x, y))
    return path


def load(path: Path, seed: int = 0):
    """The CSV as standardised float features (train statistics) and labels, split 75/25."""
    table = np.loadtxt(path, delimiter=",", skiprows=1)
    x, y = torch.tensor(table[:, :-1], dtype=torch.float32), torch.tensor(table[:, -1], dtype=torch.long)
    x_train, y_train, x_test, y_test = split(x, y, seed)
    mean, std = x_train.mean(0), x_train.std(0)
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def main() -> None:
    args = parse_args(__doc__, "rows", "neuron group")
    with tempfile.TemporaryDirectory() as folder:
        data = load(write_csv(Path(folder), 400 if args.tiny else 4000))
    run_example("residual MLP on a CSV table", ResidualMLP, data, epochs=2 if args.tiny else 30,
                finetune_epochs=1 if args.tiny else 3, keep=args.keep)


if __name__ == "__main__":
    main()
