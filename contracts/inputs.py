"""A model's example inputs as the positional tuple stage 0 takes (no torch needed)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["model_inputs"]


def model_inputs(inputs: Any) -> tuple[Any, ...]:
    """A ``sample_batch``'s inputs as stage 0 takes them, positionally.

    A tensor becomes a 1-tuple, a tuple or list a tuple, and a mapping of keyword inputs
    its values in the mapping's order: stage 0's parameters are the mapping's keys in that
    order ([Note: named inputs] in ``asteroid_fx/trace.py``). Duck-typed, so that the
    runtime and the cost models share it without importing the front end: anything that is
    neither a mapping nor a tuple or list (a tensor) is one input.
    """
    if isinstance(inputs, Mapping):
        return tuple(inputs.values())
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs)
    return (inputs,)
