"""The fastest a space's links and an integer split allow, and the float slacks of the bounds."""

from __future__ import annotations

import heapq
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from solver.space import SearchSpace

__all__ = ["SLACK", "ABOVE", "TAIL_SLACK", "CUT_ABOVE", "Links", "space_links", "in_bandwidth",
           "min_latency", "min_max_ratio", "min_max_ratios", "triangle_links"]

SLACK = 1.0 - 1e-9
ABOVE = 1.0 + 1e-9
TAIL_SLACK = 1.0 - 1e-6
CUT_ABOVE = 1.0 + 1e-6
"""Float slacks: ``solver.counted_pools.counted_run`` skips a pool only where its speed
falls short of the suffix's work, and a stage only where its plans' lower bounds reach
the limit, by more than the float error of the tables' sums (each ``x`` is at least its
work over its group's bound speed times ``SLACK``)."""


@dataclass(frozen=True)
class Links:
    """Every link of a space's devices, by device index: ``bw[a, b]`` the bandwidth from
    ``a`` to ``b`` (bytes/s) and ``lat[a, b]`` its latency (s), the numbers of
    ``Cluster.bandwidth_bytes_s`` and ``Cluster.latency_s`` (the diagonal: ``-inf`` and
    ``inf``, no link); ``sym_bw`` and ``sym_lat`` the faster way and the smaller latency
    of each pair. Read once per space (``space_links``): the helpers below asked the cluster
    again for every pair of every table, O(n^3) lookups per table for ``pair_links``
    (4 s of 15 in the class bound on 64 Jetsons)."""

    bw: np.ndarray
    lat: np.ndarray
    sym_bw: np.ndarray
    sym_lat: np.ndarray
    pairs: dict[Any, Any] = field(default_factory=dict)    # pair_links' results


_LINKS: weakref.WeakKeyDictionary[SearchSpace, Links] = weakref.WeakKeyDictionary()


def space_links(space: SearchSpace) -> Links:
    """The space's ``Links``, read from its cluster on the first call."""
    found = _LINKS.get(space)
    if found is None:
        cluster, names, n = space.cluster, space.names, space.n
        bw = np.full((n, n), -math.inf)
        lat = np.full((n, n), math.inf)
        for a in range(n):
            for b in range(n):
                if a != b:
                    bw[a, b] = cluster.bandwidth_bytes_s(names[a], names[b])
                    lat[a, b] = cluster.latency_s(names[a], names[b])
        found = _LINKS[space] = Links(bw, lat, np.maximum(bw, bw.T), np.minimum(lat, lat.T))
    return found


def in_bandwidth(space: SearchSpace) -> list[float]:
    """The fastest link into each device of the space (bytes/s; inf alone)."""
    if space.n < 2:
        return [math.inf] * space.n
    return [float(v) for v in space_links(space).bw.max(axis=0)]


def min_latency(space: SearchSpace) -> float:
    if space.n < 2:
        return 0.0
    return float(space_links(space).lat.min())


def min_max_ratio(micro_batch: int, rates: Sequence[float]) -> float | None:
    """The smallest ``max_e b_e / rate_e`` over integer shares ``>= 1`` summing to the
    micro-batch (None when the group has more devices than samples)."""
    if len(rates) > micro_batch:
        return None
    finite = [r for r in rates if not math.isinf(r)]
    if len(finite) < len(rates):
        # infinitely fast members take every sample but one per finite member
        return max((1.0 / r for r in finite), default=0.0)
    if not rates:
        return None
    # [Note: the greedy by equal rates]: Algorithm 1's greedy (``split_shares``) gives
    # the next sample to the device of the smallest ``(b + 1) / r``, so the values it
    # takes are, in order, the ``micro_batch - n`` smallest of ``b / r_e`` (``b >= 2``,
    # every device), and its largest ``b / r`` is the last of them or some ``1 / r_e``.
    # Devices of equal rates take their values together: a heap over the distinct
    # rates, each value counted once per device, gives the same float as the greedy.
    counts: dict[float, int] = {}
    for r in rates:
        counts[r] = counts.get(r, 0) + 1
    base = max(1.0 / r for r in counts)
    need = micro_batch - len(rates)
    heap = [(2 / r, r, 2) for r in counts]
    heapq.heapify(heap)
    while need > 0:
        value, r, b = heapq.heappop(heap)
        if need <= counts[r]:
            return max(base, value)
        need -= counts[r]
        heapq.heappush(heap, ((b + 1) / r, r, b + 1))
    return base


def min_max_ratios(micro_batch: int, rates: Sequence[float], counts: np.ndarray) -> np.ndarray:
    """``min_max_ratio`` of every row of ``counts`` (devices of each rate; rows x rates),
    NaN where it is None: the same floats, for many groups at once (``build_class_tables``
    spent 20-40 ms a table of ResNet-50 x 32 Jetsons calling it per count vector)."""
    counts = np.asarray(counts, dtype=np.int64).reshape(-1, len(rates))
    out = np.full(len(counts), math.nan)
    if not all(0.0 < r < math.inf for r in rates):
        # (no closed form: one at a time)
        for i, row in enumerate(counts):
            found = min_max_ratio(micro_batch, [r for r, c in zip(rates, row, strict=True)
                                                for _ in range(int(c))])
            out[i] = math.nan if found is None else found
        return out
    size = counts.sum(axis=1)
    valid = (size > 0) & (size <= micro_batch)
    if not valid.any():
        return out
    rows, sizes = counts[valid], size[valid]
    # [Note: the greedy by equal rates]: the greedy's largest b / r is the (micro-batch -
    # n)-th smallest of the values b / r_e (b >= 2, each once per device), or else the
    # largest 1 / r_e; the values counted per rate up to each distinct value, as the
    # greedy's floats (b / r)
    values = [np.arange(2, micro_batch + 2) / r for r in rates]
    every = np.unique(np.concatenate(values))
    upto = np.stack([np.searchsorted(v, every, side="right") for v in values])
    reached = rows @ upto >= (micro_batch - sizes)[:, None]
    base = np.max(np.where(rows > 0, 1.0 / np.asarray(rates), -math.inf), axis=1)
    out[valid] = np.where(sizes < micro_batch,
                          np.maximum(base, every[np.argmax(reached, axis=1)]), base)
    return out


def triangle_links(space: SearchSpace) -> tuple[float, float]:
    """``(bandwidth, latency)``: an upper bound on the slowest link's bandwidth and a lower
    bound on the largest latency inside any group of three or more devices (the best of
    every triangle of devices, either way along each link; (inf, 0) with fewer than
    three devices)."""
    n = space.n
    if n < 3:
        return math.inf, 0.0
    links = space_links(space)
    bw, lat = links.sym_bw, links.sym_lat
    best_bw, best_lat = -math.inf, math.inf
    for a in range(n):
        # triangles (a, b, c): the slowest of the three links, the largest latency
        tri = np.minimum(np.minimum(bw[a][:, None], bw[a][None, :]), bw)
        best_bw = max(best_bw, float(tri.max()))
        tri = np.maximum(np.maximum(lat[a][:, None], lat[a][None, :]), lat)
        best_lat = min(best_lat, float(tri.min()))
    return best_bw, best_lat
