"""The activation cache of PAC: one device's cache entries by sample index, with hit counts."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ActivationCache"]


@dataclass
class ActivationCache:
    """Cache entries (``AdapterModel.cache_entry`` rows) of the samples a device trains on,
    keyed by global sample index, so that after a re-split of the shares (a lost device)
    a device keeps every row it has and computes only the rows that are new to it.

    ``hits``/``misses`` count rows served from the cache and rows that had to be computed
    (the first epoch, or samples taken over from a lost device)."""

    rows: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0

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
        """Bytes of the rows the cache holds."""
        return sum(t.numel() * t.element_size() for row in self.rows.values() for t in row)
