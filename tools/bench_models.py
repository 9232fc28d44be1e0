"""Model files (as source text) shared by the benchmarks under tools/."""

from __future__ import annotations

__all__ = ["mlp_source"]


def mlp_source(width: int, depth: int, in_features: int, out_features: int) -> str:
    """A model file: an MLP of ``depth`` hidden ReLU layers of ``width`` (DESIGN.md format)."""
    return f'''
"""Benchmark MLP: {depth} hidden layers of width {width}."""
import torch
from torch import nn

WIDTH, DEPTH, IN, OUT = {width}, {depth}, {in_features}, {out_features}


def build_model():
    layers = [nn.Linear(IN, WIDTH), nn.ReLU()]
    for _ in range(DEPTH - 1):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    layers.append(nn.Linear(WIDTH, OUT))
    return nn.Sequential(*layers)


def sample_batch(batch_size):
    return (torch.randn(batch_size, IN),), torch.randint(0, OUT, (batch_size,))
'''
