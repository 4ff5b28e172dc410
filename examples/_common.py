"""What the three examples share: training, accuracy, pruning with a criterion, tables.

"spectral" training: `spectralize(model)` (lam_out trains, the paper's L2 penalty); "direct" training: the same layers
with lam_out frozen at 1 (an ordinary network, w = -phi, with the same L2 penalty on its weights). Pruning goes through
`eigenprune.pruning.graph`: `select_channels` ranks each channel group with a criterion (eigenprune's `EigenImportance`
or one of Torch-Pruning's importances), `prune_graph` removes the rest; every criterion keeps the same counts.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Callable

import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F

from eigenprune import despectralize, spectral_penalty, spectralize
from eigenprune.core import fit
from eigenprune.pruning import ChannelPlan, EigenImportance, choose_channels, prune_graph, select_channels

CRITERIA: dict[str, Callable[[], tp.importance.Importance]] = {
    "eigenprune": EigenImportance,
    "tp-magnitude-l1": lambda: tp.importance.MagnitudeImportance(p=1),
    "tp-magnitude-l2": lambda: tp.importance.MagnitudeImportance(p=2),
    "tp-taylor": tp.importance.TaylorImportance,
}
"""Criteria by name: ours and Torch-Pruning's (its defaults otherwise)."""


def parse_args(doc: str, rows: str, keep: str) -> argparse.Namespace:
    """The examples' shared options (--tiny, --keep) for the example whose docstring is `doc`; also sets one torch
    thread (small layers: one thread is ~30x faster than two here, the rest is thread overhead)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help=f"a few hundred {rows} and epochs: a seconds-long smoke run")
    parser.add_argument("--keep", type=float, default=0.25, help=f"fraction of each {keep} to keep (default 0.25)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    return args


def split(x: torch.Tensor, y: torch.Tensor, seed: int, test: float = 0.25):
    """A shuffled train/test split: (x_train, y_train, x_test, y_test)."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(len(x) * (1 - test))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def build(builder: Callable[[], nn.Module], training: str, seed: int) -> nn.Module:
    """A fresh model in spectral form: lam_out trains for 'spectral', is frozen at 1 for 'direct'."""
    torch.manual_seed(seed)
    return spectralize(builder(), train_lam_out=training == "spectral")


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, *, lr: float = 3e-3, batch: int = 64,
          seed: int = 0) -> nn.Module:
    """Adam on cross-entropy + the spectral layers' penalty (the library's `fit`); returns the model (in eval mode)."""
    return fit(model, (x, y), epochs=epochs, lr=lr, batch_size=batch, seed=seed, penalty=spectral_penalty).eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Percent of correct predictions."""
    return 100.0 * float((model.eval()(x).argmax(1) == y).float().mean())


def score(model: nn.Module, criterion: str, x: torch.Tensor, y: torch.Tensor) -> ChannelPlan:
    """The model's prunable channel groups, scored by `criterion` (keeping all; `choose_channels` picks a keep).

    Torch-Pruning's criteria see the plain weights (a despectralized copy); Taylor's gradients are those of the
    training loss on (x, y).
    """
    scored = model if criterion == "eigenprune" else despectralize(copy.deepcopy(model))
    if criterion == "tp-taylor":
        scored.zero_grad()
        F.cross_entropy(scored.eval()(x), y).backward()
    return select_channels(scored, 1.0, x[:2], importance=CRITERIA[criterion]())


def prune(model: nn.Module, criterion: str | ChannelPlan, keep: float, x: torch.Tensor, y: torch.Tensor):
    """(pruned model, kept channel count, prunable channel count): keep a fraction of each prunable group's channels.

    `criterion`: a name in CRITERIA, or a plan from `score`. The pruned model keeps its spectral layers
    (fine-tuning goes on with the same penalty).
    """
    scored = criterion if isinstance(criterion, ChannelPlan) else score(model, criterion, x, y)
    plan = choose_channels(scored, keep)
    pruned = prune_graph(model, plan, x[:2], keep_spectral=True)
    return pruned.eval(), sum(len(v) for v in plan.kept.values()), sum(plan.widths.values())


def count_parameters(model: nn.Module) -> int:
    """Parameters of the model as deployed (spectral layers counted as the plain layers they compute)."""
    return sum(p.numel() for p in despectralize(copy.deepcopy(model)).parameters())


@torch.no_grad()
def latency_ms(model: nn.Module, x: torch.Tensor, reps: int = 20) -> float:
    """Median wall-clock milliseconds of one forward pass on x (plain layers, eval mode)."""
    plain = despectralize(copy.deepcopy(model)).eval()
    for _ in range(3):
        plain(x)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        plain(x)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table (markdown pipe syntax) of the given columns."""
    def fmt(v):
        return f"{v:.1f}" if isinstance(v, float) and not math.isnan(v) else ("-" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def run_example(name: str, builder: Callable[[], nn.Module], data, *, epochs: int, finetune_epochs: int, keep: float,
                seed: int = 0) -> list[dict]:
    """Train spectral and direct, prune at `keep` with ours and Torch-Pruning's L2 magnitude, fine-tune briefly; print a table."""
    x_train, y_train, x_test, y_test = data
    trained = {t: train(build(builder, t, seed), x_train, y_train, epochs, seed=seed) for t in ("spectral", "direct")}
    rows = []
    for training, criterion in (("spectral", "eigenprune"), ("direct", "eigenprune"), ("direct", "tp-magnitude-l2")):
        model = trained[training]
        full = accuracy(model, x_test, y_test)
        pruned, kept, width = prune(model, criterion, keep, x_train, y_train)
        before = accuracy(pruned, x_test, y_test)
        after = accuracy(train(pruned, x_train, y_train, finetune_epochs, seed=seed + 1), x_test, y_test)
        rows.append({"training": training, "criterion": criterion, "full acc": full, "channels kept": f"{kept}/{width}",
                     "pruned acc": before, "fine-tuned acc": after,
                     "params": f"{count_parameters(model)} -> {count_parameters(pruned)}"})
    print(f"{name}: keep {keep:.0%} of each prunable group, fine-tune {finetune_epochs} epoch(s); test accuracy in %")
    print(table(rows, ["training", "criterion", "full acc", "channels kept", "pruned acc", "fine-tuned acc", "params"]))
    return rows
