"""The activation cache of PAC: one device's cache entries by mini-batch, with hit counts."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ActivationCache"]


@dataclass
class ActivationCache:
    """Cache entries (``AdapterModel.cache_entry`` rows) of the samples one device trains on,
    keyed by mini-batch; the rows of a key are the device's share of that mini-batch.

    ``hits``/``misses`` count rows served from the cache and rows that had to be computed
    (the first epoch, or samples taken over from a lost device)."""

    entries: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0

    def put(self, step: int, entry: tuple[torch.Tensor, ...]) -> None:
        self.entries[step] = tuple(t.detach().contiguous() for t in entry)

    def get(self, step: int) -> tuple[torch.Tensor, ...] | None:
        """The entry of ``step`` counted as a hit, or None (not counted: the caller
        computes it and counts the miss with :meth:`missed`)."""
        entry = self.entries.get(step)
        if entry is not None:
            self.hits += int(entry[0].shape[0])
        return entry

    def missed(self, rows: int) -> None:
        self.misses += rows

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def bytes(self) -> int:
        """Bytes the cache holds."""
        return sum(t.numel() * t.element_size() for e in self.entries.values() for t in e)

    def drop(self, step: int) -> None:
        self.entries.pop(step, None)
