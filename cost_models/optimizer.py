"""The optimizer's state per parameter byte, measured by stepping the model's own optimizer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

import torch

from contracts.errors import CostModelError

__all__ = ["BuildOptimizer", "build", "state_bytes", "optimizer_state_factor"]

BuildOptimizer = Callable[[Any], torch.optim.Optimizer]

SAMPLE_ELEMENTS = 1 << 22
"""Parameters cloned for :func:`optimizer_state_factor` (4 Mi elements at most, so a
large model does not double its memory; optimizers keep state per parameter)."""


def build(optimizer: BuildOptimizer | None, params: list[torch.nn.Parameter]
          ) -> torch.optim.Optimizer:
    """``optimizer(params)`` (the model file's ``build_optimizer``), or plain SGD (lr 0.01)
    as ``asteroid-fx run`` uses without one."""
    try:
        return optimizer(params) if optimizer is not None else torch.optim.SGD(params, lr=0.01)
    except Exception as exc:
        raise CostModelError(
            f"build_optimizer(params) failed: {type(exc).__name__}: {exc}") from exc


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps as state (momentum, Adam moments ...)."""
    total = 0
    for per_param in opt.state.values():
        for value in per_param.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def optimizer_state_factor(params: Iterable[torch.nn.Parameter],
                           optimizer: BuildOptimizer | None) -> float:
    """Optimizer state in units of the weights (0 plain SGD, 1 momentum, 2 Adam), measured
    by one step of ``optimizer`` over clones of (a sample of) ``params`` with random
    gradients. The model itself is not touched."""
    sample: list[torch.nn.Parameter] = []
    taken = 0
    for p in params:
        if not p.requires_grad or p.numel() == 0:
            continue
        if sample and taken + p.numel() > SAMPLE_ELEMENTS:
            break
        sample.append(torch.nn.Parameter(p.detach().clone()))
        taken += p.numel()
    if not sample:
        return 0.0
    opt = build(optimizer, sample)
    for p in sample:
        p.grad = torch.randn_like(p)
    try:
        opt.step()
    except Exception as exc:
        raise CostModelError(
            f"one step of the model's optimizer failed: {type(exc).__name__}: {exc}") from exc
    weights = sum(p.numel() * p.element_size() for p in sample)
    return state_bytes(opt) / weights
