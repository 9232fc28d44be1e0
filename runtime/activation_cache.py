"""The activation cache of PAC: one device's cache entries by sample index, with hit counts."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, MutableMapping, Tuple

import torch

from contracts.errors import RuntimeFailure

__all__ = ["ActivationCache", "DiskRows", "MemoryRows", "CACHE_DIR_ENV", "memory_filesystem"]

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "ASTEROID_CACHE_DIR"
"""The environment variable naming the directory of a device's disk cache file (unset:
the system's temporary directory)."""

Row = Tuple[torch.Tensor, ...]

MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")


def memory_filesystem(directory: str, mounts: str = "/proc/mounts") -> str | None:
    """The type of the filesystem ``directory`` is on when it keeps its files in memory
    (``tmpfs``, ``ramfs``: a disk cache there saves no memory), else None (also where the
    mount table cannot be read)."""
    try:
        lines = open(mounts, encoding="utf-8").read().splitlines()
    except OSError:
        return None
    path = os.path.realpath(directory)
    best, kind = "", ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, fields[2]
    return kind if kind in MEMORY_FILESYSTEMS else None


class DiskRows(MutableMapping[int, Row]):
    """Cache rows kept in an unnamed temporary file of the device's storage instead of
    memory (``PacPlan.cache_disk``, [Note: a cache on disk] in solver/pac_cost.py):
    a row is appended as the raw bytes of its parts and read back into fresh tensors, so
    memory holds only the rows a step asks for. The file has no name on disk and is gone
    when the process ends, however it ends. A row that is replaced or deleted leaves its
    bytes behind (phase 2 only reads). Rows may be read and written from two threads (a
    step's rows are read ahead, ``runtime.pac_train._ReadAhead``). ``bytes_s`` (the
    emulator: a device's ``storage_mb_s``) paces every row's write and read to that many
    bytes a second, as the emulator paces links; None: as fast as the host's storage.
    ``directory`` None: ``$ASTEROID_CACHE_DIR``, else the system's temporary directory."""

    def __init__(self, directory: str | None = None, bytes_s: float | None = None) -> None:
        self._bytes_s = bytes_s if bytes_s is not None and 0 < bytes_s < float("inf") \
            else None
        self._lock = threading.Lock()      # one file position: a seek and its I/O at once
        where = directory or os.environ.get(CACHE_DIR_ENV) or tempfile.gettempdir()
        kind = memory_filesystem(where)
        if kind is not None:
            log.warning("the activation cache's file is in %s, a %s: it takes memory, not "
                        "storage; set %s to a directory on storage", where, kind,
                        CACHE_DIR_ENV)
        try:
            self._file = tempfile.TemporaryFile(dir=where)
        except OSError as exc:
            raise RuntimeFailure(f"cannot create the activation cache's file in {where!r}: "
                                 f"{exc}; give a writable directory with free space in "
                                 f"{CACHE_DIR_ENV}") from None
        # sample -> (offset, bytes, ((shape, dtype), ...))
        self._index: dict[int, tuple[int, int,
                                     tuple[tuple[tuple[int, ...], torch.dtype], ...]]] = {}
        self._end = 0
        self.stored_bytes = 0        # bytes of the rows it holds now

    def __setitem__(self, key: int, row: Row) -> None:
        if key in self._index:
            del self[key]
        layout = []
        began = time.perf_counter()
        size = 0
        with self._lock:
            start = self._end
            self._file.seek(start)
            for part in row:
                flat = part.detach().contiguous().reshape(-1)
                layout.append((tuple(part.shape), part.dtype))
                data = flat.view(torch.uint8).numpy()
                try:
                    self._file.write(data.data)
                except OSError as exc:
                    raise RuntimeFailure(f"cannot write the activation cache's file: {exc}; "
                                         f"free storage or use --cache-store memory") from None
                size += data.nbytes
            self._end += size
        self._index[key] = (start, size, tuple(layout))
        self.stored_bytes += size
        self._pace(size, began)

    def __getitem__(self, key: int) -> Row:
        offset, _size, layout = self._index[key]
        began = time.perf_counter()
        out: list[torch.Tensor] = []
        size = 0
        with self._lock:
            self._file.seek(offset)
            for shape, dtype in layout:
                part = torch.empty(shape, dtype=dtype)
                data = part.reshape(-1).view(torch.uint8).numpy()
                got = self._file.readinto(data.data) if data.nbytes else 0
                if got != data.nbytes:
                    raise RuntimeFailure(f"the activation cache's file ended after {got} of "
                                         f"{data.nbytes} bytes of sample {key}'s row")
                out.append(part)
                size += data.nbytes
        self._pace(size, began)
        return tuple(out)

    def _pace(self, size: int, began: float) -> None:
        """Sleep until ``size`` bytes since ``began`` took ``size / bytes_s`` seconds."""
        if self._bytes_s is not None:
            left = size / self._bytes_s - (time.perf_counter() - began)
            if left > 0:
                time.sleep(left)

    def __delitem__(self, key: int) -> None:
        self.stored_bytes -= self._index.pop(key)[1]

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._index))

    def __len__(self) -> int:
        return len(self._index)

    def close(self) -> None:
        self._file.close()


class MemoryRows(Dict[int, Row]):
    """Cache rows kept as tensors (a dict), with the bytes of the rows it holds counted as
    rows come and go (``stored_bytes``, as :class:`DiskRows` counts its own): the run asks
    for them after every phase-1 micro-batch, where a sum over every row would grow with
    the cache."""

    def __init__(self) -> None:
        super().__init__()
        self.stored_bytes = 0

    def __setitem__(self, key: int, row: Row) -> None:
        if key in self:
            self.stored_bytes -= _row_bytes(self[key])
        super().__setitem__(key, row)
        self.stored_bytes += _row_bytes(row)

    def __delitem__(self, key: int) -> None:
        self.stored_bytes -= _row_bytes(self[key])
        super().__delitem__(key)


def _row_bytes(row: Row) -> int:
    return sum(t.numel() * t.element_size() for t in row)


@dataclass
class ActivationCache:
    """Cache entries (``AdapterModel.cache_entry`` rows) of the samples a device trains on,
    keyed by global sample index, so that after a re-split of the shares (a lost device)
    a device keeps every row it has and computes only the rows that are new to it.

    ``hits``/``misses`` count rows served from the cache and rows that had to be computed
    (the first epoch, or samples taken over from a lost device)."""

    rows: MemoryRows | DiskRows = field(default_factory=MemoryRows)
    hits: int = 0
    misses: int = 0

    @classmethod
    def on_disk(cls, directory: str | None = None, bytes_s: float | None = None
                ) -> ActivationCache:
        """A cache whose rows live in a file (:class:`DiskRows`) in ``directory`` (None:
        ``$ASTEROID_CACHE_DIR`` or the system's temporary directory), paced to ``bytes_s``
        (None: not paced)."""
        return cls(rows=DiskRows(directory, bytes_s))

    def put(self, start: int, entry: tuple[torch.Tensor, ...]) -> None:
        """Keep the rows of ``entry`` as samples ``start, start + 1, ...``."""
        entry = tuple(t.detach().contiguous() for t in entry)
        for i in range(int(entry[0].shape[0])):
            self.rows[start + i] = tuple(t[i:i + 1] for t in entry)

    def drop(self, indices: list[int], neighbours: list[int]) -> None:
        """Forget samples ``indices`` (handed to another holder). A row is a view of the
        message it came in, whose storage lives on with any row of it, so the kept
        ``neighbours`` (rows that may have shared a message with them) get storages of
        their own."""
        for i in indices:
            del self.rows[i]
        if isinstance(self.rows, DiskRows):      # rows read from a file own their storage
            return
        for i in neighbours:
            row = self.rows.get(i)
            if row is not None and any(
                    t.untyped_storage().nbytes() > t.numel() * t.element_size() for t in row):
                self.rows[i] = tuple(t.clone() for t in row)

    def missing(self, indices: list[int]) -> list[int]:
        """The sample indices of ``indices`` that are not cached."""
        return [i for i in indices if i not in self.rows]

    def get(self, indices: list[int]) -> tuple[torch.Tensor, ...] | None:
        """Samples ``indices`` as one entry (counted as hits), or None when any is
        missing (nothing counted: the caller computes them and counts the misses)."""
        if not indices or self.missing(indices):
            return None
        self.hits += len(indices)
        parts = [self.rows[i] for i in indices]
        return tuple(torch.cat([p[j] for p in parts], dim=0) for j in range(len(parts[0])))

    def count(self, hits: int, misses: int) -> None:
        self.hits += hits
        self.misses += misses

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def bytes(self) -> int:
        """Bytes of the rows the cache holds (in memory or on disk)."""
        return self.rows.stored_bytes

    @property
    def resident_bytes(self) -> int:
        """Bytes of the rows the cache holds in memory (none on disk)."""
        return 0 if isinstance(self.rows, DiskRows) else self.bytes
