"""Time of one `prune_nodes(model, keep, example_inputs=x)` call against Torch-Pruning's MetaPruner (issue #24 item 5).

What is compared, on the same model (random initialisation, eval mode), the same input and the same keep (keep=0.5,
i.e. Torch-Pruning's pruning_ratio=0.5, magnitude importance, the classifier in ignored_layers):
- `tp`: `tp.pruner.MetaPruner(model, x, ...)` then `.step()`: what a Torch-Pruning user pays for one prune. It
  changes the model it is given, so it runs on a fresh deep copy made before the clock starts.
- `tp+copy`: the same with the user's `copy.deepcopy(model)` inside the clock: the fair match for our default call,
  which leaves the user's model unchanged (it copies once).
- `tp eigen`: `tp` with our criterion (`EigenImportance`, the spectral pruners registered): the same importance as
  ours, so `ours inplace` / `tp eigen` is the cost of our pipeline alone (Torch-Pruning's magnitude importance also
  reads every coupled layer's input weights, ours only the producing layers').
- `ours`: `prune_nodes(model, 0.5, example_inputs=x)` (default: the model is not modified).
- `ours inplace`: `prune_nodes(..., inplace=True)` on a fresh copy made before the clock starts (match for `tp`).
After one untimed warm-up of each, every repeat runs the five in turn (the order rotating), one thread; the table
shows medians over the repeats.
ratio = ours / tp+copy; ratio inplace = ours inplace / tp; ratio same importance = ours inplace / tp eigen. The target
(issue #24): ratio and ratio inplace <= 1.2.

The models are written here (torchvision does not load with this torch): ResNet-18 and ResNet-50 (basic and
bottleneck blocks at ResNet's widths 64..512(x4)) and MobileNetV2 (inverted residuals, widths 32..320, 1280),
1000 classes, input 1x3xSxS (--size, default 224). --quick: the same architectures at width/8, input 32, 1 repeat.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prune_zoo import BasicBlock  # noqa: E402

from eigenprune.pruning import prune_nodes  # noqa: E402
from eigenprune.pruning.graph import ROOT_TYPES, SPECTRAL_PRUNERS, EigenImportance  # noqa: E402

TARGET_RATIO = 1.2
TP_VERSION = importlib.metadata.version("torch-pruning")  # tp.__version__ of 1.6.1 says 1.6.0


def _w(n: int, width: float) -> int:
    return max(4, int(round(n * width)))


class Basic(BasicBlock):
    """ResNet-18's basic block: `prune_zoo`'s, as wide out as in the middle."""

    expansion = 1

    def __init__(self, cin: int, mid: int, stride: int):
        super().__init__(cin, mid, mid, stride)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, mid: int, stride: int):
        super().__init__()
        out = mid * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, out, 1, bias=False), nn.BatchNorm2d(out)
        self.down = None
        if stride != 1 or cin != out:
            self.down = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return F.relu(h + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    """torchvision's ResNet layout: 7x7 stem, max-pool, four stages (64, 128, 256, 512 wide), average pool, fc."""

    def __init__(self, block: type[nn.Module], depths: list[int], width: float = 1.0, classes: int = 1000):
        super().__init__()
        stem = _w(64, width)
        self.conv1, self.bn1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem)
        layers, cin = [], stem
        for i, depth in enumerate(depths):
            mid = _w(64 * 2**i, width)
            blocks = []
            for j in range(depth):
                blocks.append(block(cin, mid, 2 if (j == 0 and i > 0) else 1))
                cin = mid * block.expansion
            layers.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _cbr(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU6())


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_cbr(cin, hidden, 1)]
        layers += [_cbr(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 layout (expansion t, width c, repeats n, stride s), 1280-wide last conv, fc."""

    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, width: float = 1.0, classes: int = 1000):
        super().__init__()
        cin = _w(32, width)
        layers = [_cbr(3, cin, 3, 2)]
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, _w(c, width), s if i == 0 else 1, t))
                cin = _w(c, width)
        last = _w(1280, width)
        layers.append(_cbr(cin, last, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, classes)

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


MODELS = {
    "resnet18": lambda w: ResNet(Basic, [2, 2, 2, 2], w),
    "resnet50": lambda w: ResNet(Bottleneck, [3, 4, 6, 3], w),
    "mobilenetv2": lambda w: MobileNetV2(w),
}


def _head(model: nn.Module) -> nn.Module:
    return model.fc if hasattr(model, "fc") else model.classifier


def run_tp(model: nn.Module, x: torch.Tensor, copy_inside: bool, eigen: bool = False) -> tuple[float, nn.Module]:
    work = None if copy_inside else copy.deepcopy(model)
    start = time.perf_counter()
    if copy_inside:
        work = copy.deepcopy(model)
    ours = dict(importance=EigenImportance(), customized_pruners=SPECTRAL_PRUNERS, root_module_types=ROOT_TYPES)
    options = ours if eigen else dict(importance=tp.importance.MagnitudeImportance(p=2))
    # (x,): a bare tensor makes Torch-Pruning's trace first try model(*x), which fails after the stem, then model(x)
    pruner = tp.pruner.MetaPruner(work, (x,), pruning_ratio=0.5, ignored_layers=[_head(work)], **options)
    pruner.step()
    return time.perf_counter() - start, work


def run_ours(model: nn.Module, x: torch.Tensor, inplace: bool) -> tuple[float, nn.Module]:
    work = copy.deepcopy(model) if inplace else model
    start = time.perf_counter()
    out = prune_nodes(work, 0.5, example_inputs=x, inplace=True) if inplace else prune_nodes(work, 0.5, example_inputs=x)
    return time.perf_counter() - start, out


RUNS = {"tp": lambda m, x: run_tp(m, x, False), "tp+copy": lambda m, x: run_tp(m, x, True),
        "tp eigen": lambda m, x: run_tp(m, x, False, eigen=True),
        "ours": lambda m, x: run_ours(m, x, False), "ours inplace": lambda m, x: run_ours(m, x, True)}


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bench(name: str, width: float, size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = MODELS[name](width).eval()
    x = torch.randn(1, 3, size, size)
    times: dict[str, list[float]] = {k: [] for k in RUNS}
    kept: dict[str, int] = {}
    order = list(RUNS)
    for k in order:  # warm-up, untimed: first calls allocate and fill caches
        RUNS[k](model, x)
    for r in range(repeats):
        for k in order[r % len(order):] + order[: r % len(order)]:  # rotate who goes first
            seconds, pruned = RUNS[k](model, x)
            times[k].append(seconds)
            kept[k] = params(pruned)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "width": width, "input": [1, 3, size, size], "params": params(model), "kept_params": kept,
            "seconds": times, "median": med, "ratio": med["ours"] / med["tp+copy"],
            "ratio_inplace": med["ours inplace"] / med["tp"], "ratio_same_importance": med["ours inplace"] / med["tp eigen"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="width/8, input 32, 1 repeat (the CI form)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    width, size, repeats = (0.125, 32, 1) if args.quick else (1.0, args.size, args.repeats)
    rows = [bench(name, width, size, repeats) for name in args.models.split(",")]
    print(f"# prune_nodes vs Torch-Pruning {TP_VERSION} MetaPruner, keep=0.5, one thread, torch {torch.__version__}, "
          f"input 1x3x{size}x{size}, width x{width}, median of {repeats}")
    print("| model | params | kept (ours / tp) | tp s | tp+copy s | tp eigen s | ours s | ours inplace s | ratio | ratio inplace "
          "| ratio same importance |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["median"]
        print(f"| {r['model']} | {r['params'] / 1e6:.2f} M | {r['kept_params']['ours'] / r['params']:.2f} / "
              f"{r['kept_params']['tp'] / r['params']:.2f} | {m['tp']:.3f} | {m['tp+copy']:.3f} | "
              f"{m['tp eigen']:.3f} | {m['ours']:.3f} | {m['ours inplace']:.3f} | {r['ratio']:.2f} | {r['ratio_inplace']:.2f} | "
              f"{r['ratio_same_importance']:.2f} |")
    met = all(r["ratio"] <= TARGET_RATIO and r["ratio_inplace"] <= TARGET_RATIO for r in rows)
    print(f"target ratio <= {TARGET_RATIO}: {'met' if met else 'NOT met'}")
    if args.out:
        info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__, "torch_pruning": TP_VERSION, "quick": args.quick, "target_ratio": TARGET_RATIO}
        args.out.write_text(json.dumps({**info, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
