"""Small conv net (16x16 input, no BatchNorm) whose long skip connection jumps over 3 convs."""

from __future__ import annotations

import torch
from torch import nn

IMAGE_SIZE = 16
NUM_CLASSES = 10


class SkipNet(nn.Module):
    """stem conv -> relu -> [conv1 8->16, relu, conv2 16->16, relu, conv3 16->8] + skip -> head.

    Per sample, the stem's output is 8x16x16 floats (8 KiB) and the convs inside the skip
    produce 16x16x16 floats (16 KiB), so every cut inside the skip carries 8 KiB extra.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_act = nn.ReLU()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.act2 = nn.ReLU()
        self.conv3 = nn.Conv2d(16, 8, 3, padding=1)
        self.out_act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.stem_act(self.stem(x))
        y = self.act1(self.conv1(skip))
        y = self.act2(self.conv2(y))
        y = self.conv3(y)
        y = self.out_act(y + skip)
        y = self.pool(y)
        return self.fc(torch.flatten(y, 1))


def build_model() -> nn.Module:
    return SkipNet()


def sample_batch(batch_size: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    x = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE)
    y = torch.randint(0, NUM_CLASSES, (batch_size,))
    return (x,), y


def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, targets)
