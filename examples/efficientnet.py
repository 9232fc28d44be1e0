"""EfficientNet-B1-style net (MBConv + squeeze-excitation, SiLU) for CIFAR-10 32x32 images."""

from __future__ import annotations

import math

import torch
from torch import nn

IMAGE_SIZE = 32
NUM_CLASSES = 10
DEPTH_MULT = 1.1  # B1: width 1.0, depth 1.1 (B0 would be 1.0)

# (expansion, kernel, stride, in channels, out channels, repeats) of EfficientNet-B0; the
# stem and the first reducing stage use stride 1 so 32x32 inputs end at 2x2, not 1x1.
_STAGES = [
    (1, 3, 1, 32, 16, 1),
    (6, 3, 1, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
]


def _conv_bn_act(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.SiLU(),
    )


class SqueezeExcitation(nn.Module):
    """Channel attention: global pool -> reduce -> SiLU -> expand -> sigmoid -> scale."""

    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.act = nn.SiLU()
        self.expand = nn.Conv2d(squeezed, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.expand(self.act(self.reduce(self.pool(x)))))
        return x * scale


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-excitation (ratio 0.25 of the input)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_act(cin, hidden, 1, 1))
        layers += [
            _conv_bn_act(hidden, hidden, kernel, stride, groups=hidden),
            SqueezeExcitation(hidden, max(1, cin // 4)),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)
        self.use_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_skip:
            return x + self.block(x)
        return self.block(x)


class EfficientNet(nn.Module):
    """Stem, MBConv stages, 1280-channel head, pooling, dropout-free linear classifier."""

    def __init__(self, num_classes: int = NUM_CLASSES, depth_mult: float = DEPTH_MULT) -> None:
        super().__init__()
        blocks: list[nn.Module] = [_conv_bn_act(3, 32, 3, 1)]
        for expand, kernel, stride, cin, cout, repeats in _STAGES:
            for i in range(math.ceil(repeats * depth_mult)):
                blocks.append(
                    MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand)
                )
        blocks.append(_conv_bn_act(320, 1280, 1, 1))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def build_model() -> nn.Module:
    return EfficientNet()


def sample_batch(batch_size: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    x = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE)
    return (x,), torch.randint(0, NUM_CLASSES, (batch_size,))


def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, targets)
