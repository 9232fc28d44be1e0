"""ResNet-50 (bottleneck 3-4-6-3) with prefixes ``cifar`` (32x32) and ``imagenet`` (224x224)."""

from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand (x4), BatchNorm after each, projection skip if needed."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50; ``small_input`` uses a 3x3 stride-1 stem without max-pooling (CIFAR)."""

    def __init__(self, num_classes: int, small_input: bool) -> None:
        super().__init__()
        if small_input:
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 7, 2, 3, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(),
                nn.MaxPool2d(3, 2, 1),
            )
        cin = 64
        stages = []
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layers = []
            for i in range(blocks):
                layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, targets)


class cifar:  # noqa: N801 - a MODEL_SPEC prefix: examples/resnet.py:cifar
    """ResNet-50 for CIFAR-10: 32x32 inputs, 10 classes."""

    @staticmethod
    def build_model() -> nn.Module:
        return ResNet50(num_classes=10, small_input=True)

    @staticmethod
    def sample_batch(batch_size: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        x = torch.randn(batch_size, 3, 32, 32)
        return (x,), torch.randint(0, 10, (batch_size,))

    loss_fn = staticmethod(loss_fn)


class imagenet:  # noqa: N801 - a MODEL_SPEC prefix: examples/resnet.py:imagenet
    """ResNet-50 for ImageNet: 224x224 inputs, 1000 classes."""

    @staticmethod
    def build_model() -> nn.Module:
        return ResNet50(num_classes=1000, small_input=False)

    @staticmethod
    def sample_batch(batch_size: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        x = torch.randn(batch_size, 3, 224, 224)
        return (x,), torch.randint(0, 1000, (batch_size,))

    loss_fn = staticmethod(loss_fn)


# Without a prefix (examples/resnet.py) the CIFAR variant is used.
build_model = cifar.build_model
sample_batch = cifar.sample_batch
