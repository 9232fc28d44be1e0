"""The activation cache: entries by mini-batch, hit counts and bytes."""

from __future__ import annotations

import torch

from runtime.activation_cache import ActivationCache


def test_activation_cache_counts_hits_and_bytes() -> None:
    cache = ActivationCache()
    assert cache.get(0) is None
    cache.missed(4)
    cache.put(0, (torch.zeros(4, 8), torch.zeros(4, 2)))
    assert cache.get(0) is not None
    assert cache.hits == 4 and cache.hit_rate == 0.5
    assert cache.bytes == 4 * 10 * 4
