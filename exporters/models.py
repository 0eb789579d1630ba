"""The model families edgecl exports end to end: small ones sized for edge boards, and two
real-size CIFAR-10 nets (ResNet-18 and MobileNetV2) for benchmarking.

Each builder takes the shape of one sample (C, H, W) and the number of classes and
returns a plain `torch.nn.Module` made only of supported layers (see README).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def mlp(in_shape=(1, 8, 8), num_classes=10, hidden=(128, 64), dropout=0.0) -> nn.Module:
    """A multi-layer perceptron on flattened inputs."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(in_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def small_cnn(in_shape=(1, 8, 8), num_classes=10, width=16, stem_stride=1) -> nn.Module:
    """Two conv-ReLU-pool stages and a two-layer classifier (the SparCL "small CNN" scale).

    stem_stride=2 ("cnn-s2"): the first conv strides by 2 in place of the first pooling, so the
    dense stem is ~3 % of the dense forward work on 28x28 inputs instead of ~10 %, the share
    ResNet-18's stem has on CIFAR-10 in SparCL (0.3 %) being the reference: at 90 % sparsity a
    dense 28x28 stem alone is ~44 % of a sparse training step.
    """
    if stem_stride not in (1, 2):
        raise ValueError(f"stem_stride={stem_stride!r}; accepted: 1 or 2")
    c, h, w = in_shape
    if stem_stride == 2:  # the stride-2 conv (padding 1) gives ceil(h / 2), then one 2x2 pool
        feat = 2 * width * ((h + 1) // 2 // 2) * ((w + 1) // 2 // 2)
    else:
        feat = 2 * width * (h // 4) * (w // 4)
    stem = ([nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)] if stem_stride == 1
            else [nn.Conv2d(c, width, 3, stride=2, padding=1), nn.ReLU()])
    return nn.Sequential(
        *stem,
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(feat, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def small_cnn_s2(in_shape=(1, 8, 8), num_classes=10, width=16) -> nn.Module:
    """The small CNN with a stride-2 stem (see small_cnn)."""
    return small_cnn(in_shape, num_classes, width, stem_stride=2)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, identity or 1x1 conv-BN shortcut, residual add."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A width-reduced ResNet (ResNet-18 layout with one block per stage by default)."""

    def __init__(self, in_shape=(1, 8, 8), num_classes=10, width=16, blocks=(1, 1, 1)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_shape[0], width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        stages, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(n):
                stages.append(BasicBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.linear(self.flatten(self.pool(out)))


def _dw_separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU6(),
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(),
    )


def mobilenet(in_shape=(1, 8, 8), num_classes=10, width=16) -> nn.Module:
    """A MobileNet-v1-style net: a conv stem then depthwise-separable blocks."""
    return nn.Sequential(
        nn.Conv2d(in_shape[0], width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU6(),
        _dw_separable(width, 2 * width, 1),
        _dw_separable(2 * width, 4 * width, 2),
        _dw_separable(4 * width, 4 * width, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    )


def resnet18(in_shape=(3, 32, 32), num_classes=10, width=64) -> nn.Module:
    """ResNet-18 in its CIFAR layout (He et al., "Deep Residual Learning", CVPR 2016; the CIFAR
    adaptation SparCL trains): a 3x3 stride-1 stem without max-pool, 4 stages of 2 basic blocks,
    widths `width` x 1-2-4-8 (64-128-256-512), strides 1-2-2-2, global average pool, linear.

    11 173 962 parameters at width 64 and 10 classes; `width` < 64 gives the same depth thinner.
    """
    return SmallResNet(in_shape, num_classes, width, blocks=(2, 2, 2, 2))


def _divisible(channels: float, by: int = 8) -> int:
    """`channels` rounded to a multiple of `by`, never below 90 % of it (torchvision's _make_divisible)."""
    rounded = max(by, int(channels + by / 2) // by * by)
    return rounded + by if rounded < 0.9 * channels else rounded


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion conv-BN-ReLU6 (none at expansion 1), 3x3 depthwise conv-BN-ReLU6,
    1x1 linear bottleneck conv-BN, plus the input where the stride is 1 and the channels match."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
                   nn.BatchNorm2d(hidden), nn.ReLU6(),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


# (expansion, output channels at width_mult 1, blocks, stride of the first block) per stage: the
# paper's Table 2 with the CIFAR-10 strides (the stem and the 24-channel stage at stride 1, as in
# the common CIFAR-10 MobileNetV2, kuangliu/pytorch-cifar), so 32x32 inputs end at 4x4.
MOBILENETV2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                      (6, 320, 1, 1))


def mobilenetv2(in_shape=(3, 32, 32), num_classes=10, width_mult=1.0, stages=MOBILENETV2_STAGES) -> nn.Module:
    """MobileNetV2 for CIFAR-10 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear
    Bottlenecks", CVPR 2018): a 3x3 stride-1 stem of 32 channels, the 17 inverted-residual blocks of
    MOBILENETV2_STAGES (expansion 6, ReLU6, depthwise 3x3, linear bottleneck, residual add where the
    stride is 1 and the channels match; three stride-2 stages: 32x32 -> 4x4), a 1x1 conv to 1280
    channels, global average pool, linear. No dropout (the exporter's default leaves it out anyway).

    2 236 682 parameters at width_mult 1 and 10 classes (torchvision's mobilenet_v2 with 10 classes:
    the CIFAR strides change no weight). `width_mult` scales every width but the last 1280 (as
    torchvision does below 1), each rounded to a multiple of 8. `stages` (same layout as
    MOBILENETV2_STAGES) gives a shorter or longer net of the same blocks.
    """
    if not (isinstance(width_mult, (int, float)) and not isinstance(width_mult, bool) and 0 < width_mult <= 4):
        raise ValueError(f"width_mult={width_mult!r}; accepted: a number in (0, 4]")
    cin = _divisible(32 * width_mult)
    last = _divisible(1280 * max(1.0, width_mult))
    layers: list[nn.Module] = [nn.Conv2d(in_shape[0], cin, 3, padding=1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6()]
    for expansion, channels, blocks, stride in stages:
        cout = _divisible(channels * width_mult)
        for i in range(blocks):
            layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expansion))
            cin = cout
    layers += [nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, num_classes)]
    return nn.Sequential(*layers)


MODELS = {"mlp": mlp, "cnn": small_cnn, "cnn-s2": small_cnn_s2, "resnet": SmallResNet, "mobilenet": mobilenet,
          "resnet18": resnet18, "mobilenetv2": mobilenetv2}


def build_model(name: str, in_shape=(1, 8, 8), num_classes=10, seed: int = 0, **kwargs) -> nn.Module:
    """Build a model family by name with deterministic initial weights.

    Raises:
        ValueError: `name` is not one of MODELS.
    """
    if name not in MODELS:
        raise ValueError(f"model {name!r} is unknown; accepted: {', '.join(MODELS)}")
    torch.manual_seed(seed)
    return MODELS[name](in_shape=tuple(in_shape), num_classes=num_classes, **kwargs)
