"""Tiny MLP (32 -> 64 -> 64 -> 64 -> 10, 7 layers, no BatchNorm) for fast end-to-end tests."""

from __future__ import annotations

import torch
from torch import nn

IN_FEATURES = 32
NUM_CLASSES = 10


class MLP(nn.Module):
    """Four linear layers with ReLU in between."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, hidden)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = nn.ReLU()
        self.fc3 = nn.Linear(hidden, hidden)
        self.act3 = nn.ReLU()
        self.fc4 = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.fc1(x))
        x = self.act2(self.fc2(x))
        x = self.act3(self.fc3(x))
        return self.fc4(x)


def build_model() -> nn.Module:
    return MLP()


def sample_batch(batch_size: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    x = torch.randn(batch_size, IN_FEATURES)
    y = torch.randint(0, NUM_CLASSES, (batch_size,))
    return (x,), y


def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, targets)
