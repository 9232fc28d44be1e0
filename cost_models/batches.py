"""Checking what a model file's ``sample_batch`` returns: ``(inputs, targets)``, batch first."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, Tuple, Union

import torch

from contracts.errors import AsteroidError, ModelSpecError

__all__ = ["Inputs", "check_batch"]

#: A model's inputs: positional tensors, or keyword tensors by name (``{"input_ids": ...}``;
#: see [Note: named inputs] in ``asteroid_fx/trace.py``).
Inputs = Union[Tuple[torch.Tensor, ...], Dict[str, torch.Tensor]]


def check_batch(batch: Any, batch_size: int, *, where: str,
                error: type[AsteroidError] = ModelSpecError,
                ) -> tuple[Inputs, Any]:
    """Check what a ``sample_batch(batch_size)`` returned; ``(inputs, targets)``.

    ``inputs`` is a tensor or a tuple/list of tensors (returned as a tuple: positional
    inputs), or a mapping ``{name: tensor}`` of keyword inputs (returned as a dict in the
    same order). ``where`` starts every message (e.g. ``"model.py: sample_batch(8)"``);
    ``error`` is the typed error to raise (``CostModelError`` when profiling).
    """
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        got = type(batch).__name__
        if isinstance(batch, (tuple, list)):
            got += f" of length {len(batch)}"
        raise error(f"{where} must return (inputs, targets), got {got}; inputs is a tuple "
                    "of tensors with the batch dimension first")
    inputs, targets = batch
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if isinstance(inputs, Mapping):
        named = dict(inputs)
        bad = [k for k in named if not (isinstance(k, str) and k.isidentifier())]
        if bad:
            raise error(f"{where} returned keyword inputs with the key {bad[0]!r}; keys must "
                        f"be the model's forward parameter names")
        labels = [repr(k) for k in named]
        values = list(named.values())
    elif isinstance(inputs, (tuple, list)):
        labels = [str(i) for i in range(len(inputs))]
        values = list(inputs)
    else:
        values = []
    if not values or not all(isinstance(t, torch.Tensor) for t in values):
        raise error(f"{where} must return (inputs, targets) with inputs a tuple of tensors or "
                    f"a dict of named tensors, got inputs of type {type(batch[0]).__name__}")
    for label, t in zip(labels, values):
        if t.dim() == 0 or t.shape[0] != batch_size:
            raise error(f"{where} input {label} has shape {tuple(t.shape)}; dimension 0 must "
                        f"be the batch size {batch_size}")
    return (named if isinstance(inputs, Mapping) else tuple(values)), targets
