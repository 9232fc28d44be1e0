"""Samples by index: seeded sample_batch(1), a model file's dataset(), and bad datasets."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from asteroid_fx.errors import DatasetError, ModelSpecError
from runtime.samples import SampleSource


def _sample_batch(batch_size: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    return (torch.randn(batch_size, 3),), torch.randint(0, 4, (batch_size,))


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    source = SampleSource(SimpleNamespace(sample_batch=_sample_batch), seed=5, num_samples=10)
    (x,), y = source.rows(2, 6)
    (x3,), y3 = source.rows(3, 4)
    assert x.shape == (4, 3) and y.shape == (4,)
    torch.testing.assert_close(x[1:2], x3)
    torch.testing.assert_close(y[1:2], y3)
    torch.manual_seed(5 + 1 + 4)
    (x4,), _ = _sample_batch(1)
    torch.testing.assert_close(x[2:3], x4)
    assert source.steps_per_epoch(3) == 3


def test_dataset_items_are_stacked() -> None:
    data = [((torch.full((2,), float(i)),), i % 2) for i in range(6)]
    source = SampleSource(SimpleNamespace(sample_batch=_sample_batch, dataset=lambda: data),
                          seed=0)
    assert source.num_samples == 6
    (x,), y = source.rows(1, 4)
    assert x.tolist() == [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]
    assert y.tolist() == [1, 0, 1]


class _Stream:
    def __getitem__(self, index: int) -> Any:
        return (torch.zeros(1),), 0


@pytest.mark.parametrize("dataset, words", [
    (_Stream, "without __len__"),
    (list, "empty dataset"),
])
def test_bad_datasets_are_typed(dataset: Any, words: str) -> None:
    with pytest.raises(DatasetError, match=words) as info:
        SampleSource(SimpleNamespace(sample_batch=_sample_batch, dataset=dataset), seed=0)
    assert isinstance(info.value, ModelSpecError)


def test_bad_items_and_sizes() -> None:
    source = SampleSource(SimpleNamespace(sample_batch=_sample_batch,
                                          dataset=lambda: [torch.zeros(2)] * 3), seed=0)
    with pytest.raises(DatasetError, match="must be \\(inputs, target\\) pairs"):
        source.row(0)
    with pytest.raises(DatasetError, match="make no full batch of 4"):
        source.steps_per_epoch(4)
    with pytest.raises(DatasetError, match="--samples"):
        SampleSource(SimpleNamespace(sample_batch=_sample_batch), seed=0)
