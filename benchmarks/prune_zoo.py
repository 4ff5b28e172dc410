"""Six small models of the kinds people prune, and the data they train on (bench_real_models.py).

Every model lists in `PRUNE` one layer per channel group to prune (its output channels name the group; Torch-Pruning's
DependencyGraph adds the layers coupled to them: BatchNorms, the next layers' inputs, the other branch of a residual
sum, a depthwise convolution). Output channels of the classifier are never pruned. `width` scales the channel counts
(the --quick form uses a quarter).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _c(n: int, width: float) -> int:
    return max(2, int(round(n * width)))


class VGGLike(nn.Module):
    """Three 3x3 convolutions (with or without BatchNorm after each), two max-pools, a hidden dense layer."""

    def __init__(self, width: float = 1.0, bn: bool = True, classes: int = 10):
        super().__init__()
        a, b, c, h = _c(16, width), _c(32, width), _c(32, width), _c(64, width)
        norm = (lambda n: nn.BatchNorm2d(n)) if bn else (lambda n: nn.Identity())
        self.conv1, self.bn1 = nn.Conv2d(1, a, 3, padding=1, bias=not bn), norm(a)
        self.conv2, self.bn2 = nn.Conv2d(a, b, 3, padding=1, bias=not bn), norm(b)
        self.conv3, self.bn3 = nn.Conv2d(b, c, 3, padding=1, bias=not bn), norm(c)
        self.fc = nn.Linear(c * 4, h)
        self.head = nn.Linear(h, classes)
        self.PRUNE = ["conv1", "conv2", "conv3", "fc"]

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # 8x8 -> 4x4
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)  # -> 2x2
        return self.head(F.relu(self.fc(x.flatten(1))))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.short is None else self.short(x)))


class ResNetLike(nn.Module):
    """A ResNet-style CNN: stem, a basic block at 16 channels, a strided block to 32 with a 1x1 shortcut, one more."""

    def __init__(self, width: float = 1.0, classes: int = 10):
        super().__init__()
        a, b = _c(16, width), _c(32, width)
        self.stem, self.bn = nn.Conv2d(1, a, 3, padding=1, bias=False), nn.BatchNorm2d(a)
        self.block1 = BasicBlock(a, a, a)
        self.block2 = BasicBlock(a, b, b, stride=2)
        self.block3 = BasicBlock(b, b, b)
        self.head = nn.Linear(b, classes)
        # stream of 16 (stem + block1 out), the blocks' inner channels, stream of 32 (block2 out + shortcut + block3 out)
        self.PRUNE = ["stem", "block1.conv1", "block2.conv1", "block2.conv2", "block3.conv1"]

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.block3(self.block2(self.block1(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, stride: int):
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(cin, expand, 1, bias=False), nn.BatchNorm2d(expand)
        self.dw, self.bn2 = nn.Conv2d(expand, expand, 3, stride, 1, groups=expand, bias=False), nn.BatchNorm2d(expand)
        self.project, self.bn3 = nn.Conv2d(expand, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        h = F.relu6(self.bn1(self.expand(x)))
        h = F.relu6(self.bn2(self.dw(h)))
        h = self.bn3(self.project(h))
        return x + h if self.residual else h


class MobileNetLike(nn.Module):
    """MobileNetV2-style: stem, inverted-residual blocks (1x1 expand, 3x3 depthwise, 1x1 project), a 1x1 head conv."""

    def __init__(self, width: float = 1.0, classes: int = 10):
        super().__init__()
        a, b, e, top = _c(8, width), _c(16, width), 4, _c(64, width)
        self.stem, self.bn = nn.Conv2d(1, a, 3, padding=1, bias=False), nn.BatchNorm2d(a)
        self.ir1 = InvertedResidual(a, a, a * e, 1)
        self.ir2 = InvertedResidual(a, b, a * e, 2)
        self.ir3 = InvertedResidual(b, b, b * e, 1)
        self.last, self.bn_last = nn.Conv2d(b, top, 1, bias=False), nn.BatchNorm2d(top)
        self.head = nn.Linear(top, classes)
        # the expansion channels (each with its depthwise conv), the two streams, the last 1x1 conv
        self.PRUNE = ["stem", "ir1.expand", "ir2.expand", "ir2.project", "ir3.expand", "last"]

    def forward(self, x):
        x = F.relu6(self.bn(self.stem(x)))
        x = self.ir3(self.ir2(self.ir1(x)))
        x = F.relu6(self.bn_last(self.last(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class TokenTransformer(nn.Module):
    """A 2-layer transformer encoder (post-norm, nn.TransformerEncoderLayer) on a table cut into tokens.

    Each token is a chunk of the row's features with a one-hot position appended; mean-pooled, linear head. Only the
    feed-forward layers' hidden neurons are pruned (the residual stream passes through LayerNorm and attention).
    """

    def __init__(self, width: float = 1.0, tokens: int = 8, d_tok: int = 4, classes: int = 8):
        super().__init__()
        d, ff = _c(32, width), _c(128, width)
        d = d - d % 4  # 4 heads
        self.tokens, self.d_tok = tokens, d_tok
        self.embed = nn.Linear(d_tok + tokens, d)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(d, 4, ff, dropout=0.0, batch_first=True) for _ in range(2))
        self.head = nn.Linear(d, classes)
        self.PRUNE = ["layers.0.linear1", "layers.1.linear1"]

    def forward(self, x):  # x: [B, tokens * d_tok]
        t = x.view(len(x), self.tokens, self.d_tok)
        pos = torch.eye(self.tokens, dtype=x.dtype, device=x.device).expand(len(x), -1, -1)
        h = self.embed(torch.cat([t, pos], -1))
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(1))


class MLP(nn.Module):
    """Two hidden ReLU layers."""

    def __init__(self, width: float = 1.0, d_in: int = 32, classes: int = 8):
        super().__init__()
        h = _c(256, width)
        self.fc1, self.fc2, self.head = nn.Linear(d_in, h), nn.Linear(h, h), nn.Linear(h, classes)
        self.PRUNE = ["fc1", "fc2"]

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def _split(x: torch.Tensor, y: torch.Tensor, seed: int = 1000):
    """60% train, 20% validation (choosing strengths), 20% test: one fixed split for every seed."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    a, b = int(0.6 * len(x)), int(0.8 * len(x))
    parts = (order[:a], order[a:b], order[b:])
    return tuple((x[p], y[p]) for p in parts)


def digits(limit: int | None = None):
    """scikit-learn's 1,797 8x8 digit images (scaled to [0, 1]), [N, 1, 8, 8]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    return _split(x[:limit], y[:limit])


def table(rows: int = 4000):
    """make_classification: 32 features (16 informative, 8 redundant), 8 classes of 2 clusters each, 3% label noise."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=rows, n_features=32, n_informative=16, n_redundant=8, n_classes=8,
                               n_clusters_per_class=2, class_sep=1.5, flip_y=0.03, random_state=0)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    return _split(x, torch.tensor(y, dtype=torch.long))


def models(quick: bool) -> dict:
    """name -> (builder(), data loader(), epochs, has BatchNorm)."""
    w = 0.25 if quick else 1.0
    img = (lambda: digits(600)) if quick else digits
    tab = (lambda: table(1000)) if quick else table
    e = (lambda n: 2) if quick else (lambda n: n)
    return {
        "cnn-bn": (lambda: VGGLike(w, bn=True), img, e(15), True),
        "cnn-plain": (lambda: VGGLike(w, bn=False), img, e(15), False),
        "resnet": (lambda: ResNetLike(w), img, e(15), True),
        "mobilenet": (lambda: MobileNetLike(w), img, e(15), True),
        "transformer-ff": (lambda: TokenTransformer(w), tab, e(20), False),
        "mlp": (lambda: MLP(w), tab, e(20), False),
    }
