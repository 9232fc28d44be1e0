"""The activation cache: rows by sample index, hits, misses and bytes."""

from __future__ import annotations

import torch

from runtime.activation_cache import ActivationCache


def test_rows_by_sample_index() -> None:
    cache = ActivationCache()
    assert cache.get([0, 1, 2, 3]) is None
    cache.count(0, 4)
    entry = (torch.arange(8.0).reshape(4, 2), torch.zeros(4, 3))
    cache.put(10, entry)
    assert cache.missing([8, 9, 10, 11]) == [8, 9]
    got = cache.get([11, 12])
    assert got is not None
    torch.testing.assert_close(got[0], entry[0][1:3])
    assert cache.hits == 2 and cache.hit_rate == 2 / 6
    assert cache.bytes == 4 * 5 * 4
    assert cache.get([12, 13, 14]) is None and cache.hits == 2
