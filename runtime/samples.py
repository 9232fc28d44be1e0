"""Samples of a fine-tuning run by index: the model file's ``dataset()``, or seeded batches of one.

[Note: fine-tuning data]
A fine-tuning run goes over a finite set of ``N`` samples once per epoch, in the same
order every epoch (so that the activation cache of epoch 1 serves every later epoch);
mini-batch ``k`` is samples ``k*B .. (k+1)*B - 1`` and an epoch has ``N // B`` steps (a
last partial batch is dropped). Sample ``i`` is

* ``dataset()[i]`` when the model file defines ``dataset()``: a finite indexable dataset
  (``__len__`` and ``__getitem__``) whose items are ``(inputs, target)`` without the batch
  dimension (``inputs`` a tensor, a tuple of tensors or a mapping of keyword inputs);
* otherwise ``sample_batch(1)`` right after ``torch.manual_seed(seed + 1 + i)``: the
  per-index seed stands in for a dataset, and ``N`` is given by the caller.

Every process makes the rows it needs by itself, so nothing but activations travels.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from contracts.errors import DatasetError

__all__ = ["SampleSource", "collate"]


def _batched(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.unsqueeze(0)
    if isinstance(value, Mapping):
        return {k: _batched(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return tuple(_batched(v) for v in value)
    return torch.as_tensor(value).unsqueeze(0)


def collate(rows: Sequence[Any]) -> Any:
    """Concatenate batched rows (batch dimension 0) of one structure."""
    first = rows[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(rows), dim=0)
    if isinstance(first, Mapping):
        return {k: collate([r[k] for r in rows]) for k in first}
    return tuple(collate([r[i] for r in rows]) for i in range(len(first)))


class SampleSource:
    """Samples by index from a model file (module or ``ModelSpec``-like object with
    ``sample_batch`` and optionally ``dataset``); see [Note: fine-tuning data]."""

    def __init__(self, model_file: Any, seed: int, num_samples: int | None = None) -> None:
        self.seed = seed
        self.sample_batch = model_file.sample_batch
        make = getattr(model_file, "dataset", None)
        self.dataset: Any = None
        if callable(make):
            data = make()
            if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
                raise DatasetError(f"dataset() returned a {type(data).__name__} without "
                                   f"__len__/__getitem__; return a finite indexable dataset "
                                   f"(a list, or a torch Dataset with __len__)")
            if len(data) < 1:
                raise DatasetError("dataset() returned an empty dataset; give it at least "
                                   "one batch of samples")
            self.dataset = data
            self.num_samples = len(data) if num_samples is None else min(num_samples, len(data))
        else:
            if num_samples is None or num_samples < 1:
                raise DatasetError(f"without dataset() in the model file the number of "
                                   f"samples must be given (--samples N >= 1), got "
                                   f"{num_samples!r}")
            self.num_samples = num_samples

    def steps_per_epoch(self, batch_size: int) -> int:
        """Mini-batches per epoch (``N // B``; a partial last batch is dropped)."""
        steps = self.num_samples // batch_size
        if steps < 1:
            raise DatasetError(f"{self.num_samples} samples make no full batch of "
                               f"{batch_size}; use more samples or a smaller --batch-size")
        return steps

    def row(self, index: int) -> tuple[Any, Any]:
        """Sample ``index`` as a batch of one: ``(inputs, target)``."""
        if not 0 <= index < self.num_samples:
            raise DatasetError(f"sample {index} is out of range 0..{self.num_samples - 1}")
        if self.dataset is not None:
            item = self.dataset[index]
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise DatasetError(f"dataset()[{index}] is a {type(item).__name__}; items "
                                   f"must be (inputs, target) pairs")
            return _batched(item[0]), _batched(item[1])
        torch.manual_seed(self.seed + 1 + index)
        inputs, target = self.sample_batch(1)
        return inputs, target

    def rows(self, start: int, stop: int) -> tuple[Any, Any]:
        """Samples ``start .. stop - 1`` collated: ``(inputs, targets)``."""
        return self.take(range(start, stop))

    def take(self, indices: Iterable[int]) -> tuple[Any, Any]:
        """The samples ``indices`` (in that order) collated: ``(inputs, targets)``."""
        pairs = [self.row(i) for i in indices]
        return collate([p[0] for p in pairs]), collate([p[1] for p in pairs])
