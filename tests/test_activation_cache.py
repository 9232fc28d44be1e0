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


def test_drop_frees_the_message_the_kept_rows_came_in() -> None:
    cache = ActivationCache()
    message = torch.arange(12.0).reshape(4, 3)
    cache.put(0, (message,))
    assert all(row[0].untyped_storage().data_ptr() == message.untyped_storage().data_ptr()
               for row in cache.rows.values())
    cache.drop([1, 2], [0, 3])
    assert sorted(cache.rows) == [0, 3] and cache.bytes == 2 * 3 * 4
    for i in (0, 3):      # own storages now: the message can go
        row = cache.rows[i][0]
        assert row.untyped_storage().nbytes() == 3 * 4
        torch.testing.assert_close(row, message[i:i + 1])
