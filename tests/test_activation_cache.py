"""The activation cache: rows by sample index, hits, misses and bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from contracts.errors import RuntimeFailure
from runtime.activation_cache import ActivationCache, DiskRows


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


# -- rows on disk (runtime.activation_cache.DiskRows) --------------------------------------

def test_rows_on_disk_come_back_bit_for_bit_and_hold_no_memory(tmp_path: Path) -> None:
    cache = ActivationCache.on_disk(str(tmp_path))
    entry = (torch.randn(3, 4, 5), torch.randn(3, 2).to(torch.bfloat16),
             torch.arange(3).reshape(3, 1), torch.tensor([[True], [False], [True]]),
             torch.zeros(3, 0))
    cache.put(10, entry)
    row_bytes = sum(t[0:1].numel() * t.element_size() for t in entry)
    assert cache.bytes == 3 * row_bytes and cache.resident_bytes == 0
    assert len(cache.rows) == 3 and sorted(cache.rows) == [10, 11, 12]
    got = cache.get([12, 10])
    assert got is not None
    for part, want in zip(got, entry, strict=True):
        assert part.dtype == want.dtype and torch.equal(part, want[[2, 0]])
    # the file has no name: nothing is left in the directory
    assert list(tmp_path.iterdir()) == []
    # a row replaced or handed away: the bytes count what is held
    cache.put(11, tuple(t[0:1] for t in entry))
    assert cache.bytes == 3 * row_bytes
    got = cache.get([11])
    assert got is not None and torch.equal(got[0], entry[0][0:1])
    cache.drop([11], [10, 12])
    assert cache.bytes == 2 * row_bytes and cache.missing([10, 11, 12]) == [11]
    assert 11 not in cache.rows and 10 in cache.rows


def test_the_same_cache_in_memory_counts_its_rows_as_resident() -> None:
    cache = ActivationCache()
    cache.put(0, (torch.zeros(2, 8),))
    assert cache.bytes == cache.resident_bytes == 64

    def summed() -> int:
        return sum(t.numel() * t.element_size() for row in cache.rows.values() for t in row)

    # the count is kept as rows come, are replaced and go
    cache.put(1, (torch.zeros(3, 8, dtype=torch.float64),))     # row 1 replaced: 64 bytes
    assert cache.bytes == summed() == 32 + 3 * 64
    cache.drop([0, 2], [1, 3])
    assert cache.bytes == summed() == 2 * 64


def test_a_disk_cache_in_a_missing_directory_is_a_runtime_failure(tmp_path: Path) -> None:
    with pytest.raises(RuntimeFailure, match="cannot create the activation cache's file in .*"
                                             "ASTEROID_CACHE_DIR"):
        DiskRows(str(tmp_path / "no" / "such"))


def test_a_disk_cache_is_paced_to_its_storage_bandwidth(tmp_path: Path) -> None:
    import time

    paced = DiskRows(str(tmp_path), bytes_s=1e6)      # 1 MB/s: a 64 KiB row in 65 ms
    row = (torch.zeros(1, 16384),)
    began = time.perf_counter()
    paced[0] = row
    wrote = time.perf_counter() - began
    began = time.perf_counter()
    paced[0]
    read = time.perf_counter() - began
    assert wrote >= 0.065 and read >= 0.065
    free = DiskRows(str(tmp_path), bytes_s=float("inf"))     # inf: not paced
    began = time.perf_counter()
    free[0] = row
    free[0]
    assert time.perf_counter() - began < 0.065
    paced.close()
    free.close()


def test_a_truncated_cache_file_is_a_runtime_failure(tmp_path: Path) -> None:
    rows = DiskRows(str(tmp_path))
    rows[0] = (torch.ones(1, 16),)
    rows._file.truncate(8)
    with pytest.raises(RuntimeFailure, match="ended after 8 of 64 bytes of sample 0's row"):
        rows[0]
    rows.close()


def test_a_cache_directory_in_memory_is_named(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import runtime.activation_cache as activation_cache
    from runtime.activation_cache import memory_filesystem

    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\n"
                      f"tmpfs {tmp_path}/ram tmpfs rw 0 0\n"
                      f"/dev/sdb1 {tmp_path}/ram/disk xfs rw 0 0\n"
                      f"tmpfs {tmp_path}/with\\040space tmpfs rw 0 0\n")
    for sub in ("ram", "ram/x", "ram/disk", "ramdisk", "with space/y"):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
    assert memory_filesystem(str(tmp_path / "ram"), str(mounts)) == "tmpfs"
    assert memory_filesystem(str(tmp_path / "ram" / "x"), str(mounts)) == "tmpfs"
    assert memory_filesystem(str(tmp_path / "ram" / "disk"), str(mounts)) is None
    assert memory_filesystem(str(tmp_path / "ramdisk"), str(mounts)) is None
    assert memory_filesystem(str(tmp_path / "with space" / "y"), str(mounts)) == "tmpfs"
    assert memory_filesystem(str(tmp_path), str(tmp_path / "no-such-table")) is None
    # a disk cache there says so, and still works
    monkeypatch.setattr(activation_cache, "memory_filesystem", lambda directory: "tmpfs")
    with caplog.at_level("WARNING", logger="runtime.activation_cache"):
        rows = DiskRows(str(tmp_path))
    assert f"{tmp_path}, a tmpfs: it takes memory, not storage; set ASTEROID_CACHE_DIR" \
        in caplog.text
    rows[0] = (torch.ones(1, 2),)
    assert torch.equal(rows[0][0], torch.ones(1, 2))
    rows.close()
    # without a directory: ASTEROID_CACHE_DIR's
    monkeypatch.setenv("ASTEROID_CACHE_DIR", str(tmp_path / "ram"))
    caplog.clear()
    with caplog.at_level("WARNING", logger="runtime.activation_cache"):
        DiskRows().close()
    assert f"{tmp_path / 'ram'}, a tmpfs" in caplog.text
