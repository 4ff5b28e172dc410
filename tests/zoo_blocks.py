"""The blocks of the standard classification architectures, small (8-32 channels), each in a tiny classifier.

Written here because torchvision's wheels do not load with the CPU build of torch used by the tests.
Every classifier is stem + block + pool + head and takes `ZOO[name][1]`-shaped inputs (2x3x16x16):

* `resnext`: ResNeXt bottleneck, a grouped 3x3 convolution (groups=4) between two 1x1 ones, identity residual.
* `mbv3`: MobileNetV2/V3 inverted residual: 1x1 expand, 3x3 depthwise, squeeze-and-excitation, 1x1 project, residual.
* `convnext`: ConvNeXt block: 7x7 depthwise, LayerNorm over channels, pointwise MLP (x4), layer scale gamma, residual.
* `convnext_bn`: the same with BatchNorm in place of the LayerNorm (every group can then be cut exactly).
* `vit`: a ViT: patch embedding, class token, position embedding, one pre-norm encoder block (attention, MLP).
* `densenet`: a DenseNet block: two BN-ReLU-conv1x1-BN-ReLU-conv3x3 layers, each concatenated to its input.
* `shufflenet`: a ShuffleNetV2 unit: channel split, a 1x1 / depthwise 3x3 / 1x1 branch, concatenation, channel shuffle.
"""

import torch
from torch import nn
from torch.nn import functional as F


def _bn_act(c, act=nn.ReLU):
    return [nn.BatchNorm2d(c), act()]


class ResNeXtBlock(nn.Module):
    def __init__(self, c=16, width=16, groups=4):
        super().__init__()
        self.conv1 = nn.Conv2d(c, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return F.relu(x + self.bn3(self.conv3(h)))


class SqueezeExcite(nn.Module):
    def __init__(self, c, squeeze):
        super().__init__()
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class InvertedResidualSE(nn.Module):
    def __init__(self, c=16, expand=32, squeeze=8):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, expand, 1, bias=False), *_bn_act(expand, nn.Hardswish))
        self.dw = nn.Sequential(nn.Conv2d(expand, expand, 3, padding=1, groups=expand, bias=False), *_bn_act(expand, nn.Hardswish))
        self.se = SqueezeExcite(expand, squeeze)
        self.project = nn.Sequential(nn.Conv2d(expand, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.project(self.se(self.dw(self.expand(x))))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block (channels-last MLP, layer scale `gamma` as a bare nn.Parameter); `norm='batch'` swaps
    the LayerNorm for a BatchNorm2d before the permute (the variant whose every group can be cut exactly)."""

    def __init__(self, c=16, norm="layer", scale=0.5):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6) if norm == "layer" else nn.BatchNorm2d(c)
        self.pwconv1 = nn.Linear(c, 4 * c)
        self.pwconv2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(scale * torch.rand(c) + 0.1)

    def forward(self, x):
        h = self.dwconv(x)
        if isinstance(self.norm, nn.BatchNorm2d):
            h = self.norm(h).permute(0, 2, 3, 1)
        else:
            h = self.norm(h.permute(0, 2, 3, 1))
        h = self.gamma * self.pwconv2(F.gelu(self.pwconv1(h)))
        return x + h.permute(0, 3, 1, 2)


class DenseLayer(nn.Module):
    def __init__(self, c, growth=8, bottleneck=2):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, bottleneck * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(bottleneck * growth)
        self.conv2 = nn.Conv2d(bottleneck * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        h = self.conv1(F.relu(self.bn1(x)))
        return torch.cat([x, self.conv2(F.relu(self.bn2(h)))], 1)


class DenseBlock(nn.Module):
    def __init__(self, c=16, growth=8):
        super().__init__()
        self.layer1 = DenseLayer(c, growth)
        self.layer2 = DenseLayer(c + growth, growth)
        self.norm = nn.BatchNorm2d(c + 2 * growth)
        self.out_channels = c + 2 * growth

    def forward(self, x):
        return F.relu(self.norm(self.layer2(self.layer1(x))))


def channel_shuffle(x, groups=2):
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's stride-1 unit: half the channels pass through, the other half through the branch."""

    def __init__(self, c=16):
        super().__init__()
        half = c // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1, bias=False), *_bn_act(half),
            nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), *_bn_act(half))

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([x1, self.branch(x2)], 1))


class Classifier(nn.Module):
    """stem (3x3 conv, BatchNorm, ReLU) + block + global average pool + linear head."""

    def __init__(self, block, c=16, classes=5, out_channels=None):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.block = block
        self.head = nn.Linear(out_channels or c, classes)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.block(self.stem(x)), 1).flatten(1))


class TinyViT(nn.Module):
    """Patch embedding (4x4 patches), class token and position embedding (bare nn.Parameters of this module, which
    also has children), one pre-norm encoder block (nn.MultiheadAttention, GELU MLP), the class token to the head."""

    def __init__(self, d=16, hidden=32, heads=2, image=16, patch=4, classes=5):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, patch, stride=patch)
        self.cls_token = nn.Parameter(0.1 * torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, (image // patch) ** 2 + 1, d))
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.patch_embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], 1) + self.pos_embed
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.fc2(F.gelu(self.fc1(self.norm2(h))))
        return self.head(self.norm(h)[:, 0])


def settle(model, seed=0):
    """Random BatchNorm statistics and affine parameters (a freshly built BatchNorm is the identity), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def make(name, seed=0):
    """The classifier `name` of `ZOO`, seeded, with settled BatchNorms, in eval mode."""
    torch.manual_seed(seed)
    return settle(ZOO[name][0](), seed)


ZOO = {
    "resnext": (lambda: Classifier(ResNeXtBlock()), (2, 3, 16, 16)),
    "mbv3": (lambda: Classifier(InvertedResidualSE()), (2, 3, 16, 16)),
    "convnext": (lambda: Classifier(ConvNeXtBlock()), (2, 3, 16, 16)),
    "convnext_bn": (lambda: Classifier(ConvNeXtBlock(norm="batch")), (2, 3, 16, 16)),
    "vit": (TinyViT, (2, 3, 16, 16)),
    "densenet": (lambda: Classifier(DenseBlock(), out_channels=32), (2, 3, 16, 16)),
    "shufflenet": (lambda: Classifier(ShuffleUnit()), (2, 3, 16, 16)),
}
"""name -> (constructor, input shape)."""
