"""`shrink` on scikit-learn's 8x8 digits: the smallest CNN within one point of the standard-trained one, in one call.

    python examples/shrink_digits.py           # minutes on the 2-core VM (one thread)
    python examples/shrink_digits.py --tiny    # seconds

The digits are split 60/20/20 into training, validation (where `shrink` chooses) and test (where the choice is checked:
the validation value of the chosen model is optimistic, since it was chosen on it). The path holds the default spectral
strengths and "standard" (standard training pruned by the same criterion), so the table shows both.
"""

from __future__ import annotations

import argparse
import time

import torch
from cnn_digits import DigitsCNN
from sklearn.datasets import load_digits

from eigenprune import shrink
from eigenprune.core import TrainSpec, evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="600 images, 5 epochs, 3 fractions: a seconds-long smoke run")
    parser.add_argument("--seed", type=int, default=0, help="the split, the initial weights and the batch order")
    args = parser.parse_args()
    torch.set_num_threads(1)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))[: 600 if args.tiny else None]
    a, b = int(0.6 * len(order)), int(0.8 * len(order))
    train, val, test = [(x[i], y[i]) for i in (order[:a], order[a:b], order[b:])]
    torch.manual_seed(args.seed)
    model = DigitsCNN()
    start = time.perf_counter()
    strengths = (0.1, 1.0, "standard") if args.tiny else (0.1, 0.3, 1.0, "standard")
    result = shrink(model, train, val, tolerance=0.01, strengths=strengths, seed=args.seed,
                    training=TrainSpec(lr=5e-3 if args.tiny else 2e-3, batch_size=64, epochs=5 if args.tiny else 15),
                    fractions=(0.5, 0.25, 0.1) if args.tiny else (0.8, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.07, 0.05),
                    progress=True)
    seconds = time.perf_counter() - start
    print(result)
    print(f"test accuracy: chosen {evaluate(result.model, test)['accuracy']:.4f} ({result.params:,} parameters), standard "
          f"training {evaluate(result.reference_model, test)['accuracy']:.4f} ({result.params_full:,}); {seconds:.0f} s")


if __name__ == "__main__":
    main()
