"""The class bound's priced relaxed DP (no class counted) as one compiled loop nest (numba).

[Note: the compiled priced pass]
``relaxation.relaxed_many`` is a few dozen numpy calls per row of its tables on small
arrays (on ResNet-50 x 32 Jetsons about 90 rows of 89 groups by up to 67 ends), so a
priced pass costs mostly the calls' overhead: 22 ms for one price, 60-170 ms for the 6
or 26 prices of a polish step, whatever the work. Shrinking the work of its costliest
line six-fold (the gated levels' masked copies, a quarter of the profile) left a pass as
slow as before (0.94 times; thirty-first session). ``priced_pass`` is the
same DP as one loop nest, compiled once per installation by numba (``cache=True``: about
3 s the first time, then 0.3 s to load) and run where no class is counted; the counted
passes keep the numpy code (their states and kinds). It computes the same minima over
the same sums, in the same order but for the chords' weighted sum of the dominant
stage's values (``np.einsum`` in numpy), and its values equal numpy's on every pass
checked: ``tests/test_relaxation_compiled.py`` (random instances, every ``M``, prices and
deadlines), and the 108 priced passes of ``class_bound`` on every micro-batch size of
ResNet-50 x 32 Jetsons at 0.8225 s and the 174 on 64 Jetsons at 0.5845 s, bit for bit.
Those passes took 5.25 s and 12.0 s in numpy, 1.58 s (0.48 s of it loading the compiled
code) and 3.58 s compiled (``python tools/time_planner.py --compiled-ab 32 0.8225``, ``64
0.5845``: each pass both ways in turn, in one process).

Per row and price the loop takes every kept group and end once: the stage after the
dominant one at any position (``after``), at each gated level (a group that passes a
level's gate passes every later one, so each level's minimum is a running minimum over
the first level each stage passes), as the dominant stage (its minimum over the groups
at the chords' points) and before it, then combines each minimum over the ends with the
suffix tables, as ``relaxed_many`` does."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numba
import numpy as np

from solver.class_tables import ClassTables

__all__ = ["Packed", "pack", "priced_pass"]

Packed = tuple[np.ndarray, ...]
"""``pack``'s arrays: x, max(E_f, E_b), T_a and X's upper bound (rows x groups x ends, inf
past a row's ends), the next rows, the smallest x per end, the ends per row and whether
a row is the first layer's."""


def pack(tables: ClassTables) -> Packed:
    """``tables``' rows as arrays padded to the most ends of a row (built once per
    tables: ``ClassTables.compiled``)."""
    held: Packed | None = tables.compiled.get("packed")
    if held is not None:
        return held
    rows = tables.rows
    count, groups = len(rows), rows[0][0].shape[0]
    width = max(r[0].shape[1] for r in rows)
    x_all, big_all, ta_all, up_all = (np.full((count, groups, width), math.inf)
                                      for _ in range(4))
    nxt_all = np.full((count, width), count, dtype=np.int64)
    short_all = np.full((count, width), math.inf)
    ends = np.zeros(count, dtype=np.int64)
    for i, (x, big, t_a, nxt, shortest) in enumerate(rows):
        e = x.shape[1]
        x_all[i, :, :e], big_all[i, :, :e], ta_all[i, :, :e] = x, big, t_a
        if tables.uppers:
            up_all[i, :, :e] = tables.uppers[i]
        nxt_all[i, :e], short_all[i, :e], ends[i] = nxt, shortest, e
    first = np.asarray([f == 0 for f in tables.firsts], dtype=np.bool_)
    packed = (x_all, big_all, ta_all, up_all, nxt_all, short_all, ends, first)
    tables.compiled["packed"] = packed
    return packed


@numba.njit(cache=True)
def _pass(x_all: Any, big_all: Any, ta_all: Any, up_all: Any, nxt_all: Any, short_all: Any,
          ends: Any, first_row: Any, cost: Any, m: int, low: float, top: float,
          limit: float, late: float, late_ta: float, gates: Any, rest_gate: float,
          points: Any, chords: Any) -> Any:  # pragma: no cover (compiled)
    inf = np.inf
    count, groups, width = x_all.shape
    n_k = cost.shape[1]
    levels = gates.shape[0]
    a_max = m
    n_points = points.shape[0]
    # (per price, level (the last: after the dominant stage at any position), row, a)
    placed = np.full((n_k, levels + 1, count + 1, a_max), inf)
    for k in range(n_k):
        for j in range(levels + 1):
            placed[k, j, count, 0] = 0.0
    with_d = np.full((n_k, count + 1), inf)
    held = np.zeros(count + 1, dtype=np.bool_)
    held[count] = True
    m_low = m * low
    on_after = np.empty(width)
    here = np.empty((levels, width))
    at = np.empty((n_points, width))
    on_before = np.empty(width)
    first_level = np.empty((groups, width), dtype=np.int64)
    best = np.empty(a_max)
    for i in range(count - 1, -1, -1):
        n_ends = ends[i]
        kk = 0          # only the first `kk` ends can have x <= top
        while kk < n_ends and short_all[i, kk] <= top:
            kk += 1
        if kk == 0:
            continue
        first = first_row[i]
        t_min = inf
        for g in range(groups):
            if x_all[i, g, 0] <= top:
                for e in range(kk):
                    t_min = min(t_min, ta_all[i, g, e])
                    passed = 0
                    for j in range(levels):
                        if gates[j] + ta_all[i, g, e] < limit:
                            passed += 1
                    first_level[g, e] = levels - passed
        dominant = False
        for e in range(kk):
            if held[nxt_all[i, e]]:
                dominant = True
        before = m_low + t_min < limit
        for k in range(n_k):
            for e in range(kk):
                on_after[e] = inf
                on_before[e] = inf
                for j in range(levels):
                    here[j, e] = inf
                for p in range(n_points):
                    at[p, e] = inf
            for g in range(groups):
                if not x_all[i, g, 0] <= top:
                    continue
                c_g = cost[g, k]
                for e in range(kk):
                    x = x_all[i, g, e]
                    t_a = ta_all[i, g, e]
                    capped = x if x <= top else inf
                    priced = capped + c_g
                    later = priced if late + t_a * late_ta < limit else inf
                    if rest_gate + t_a < limit and later < on_after[e]:
                        on_after[e] = later
                    f = first_level[g, e]
                    if f < levels and later < here[f, e]:
                        here[f, e] = later
                    if dominant:
                        x_d = max(capped, low)
                        total = m * x_d + t_a
                        if total < limit and up_all[i, g, e] > low:
                            base = (total if first else m * x_d) + c_g
                            hide = max(x, low) - max(big_all[i, g, e], low / 2)
                            for p in range(n_points):
                                v = base - points[p] * hide
                                if v < at[p, e]:
                                    at[p, e] = v
                    if before and m_low + capped + t_a < limit:
                        v = priced + t_a if first else priced
                        if v < on_before[e]:
                            on_before[e] = v
            for e in range(kk):         # each level: the stages that pass its gate
                for j in range(1, levels):
                    if here[j - 1, e] < here[j, e]:
                        here[j, e] = here[j - 1, e]
            # after the dominant stage at any position (j = levels), then at each level j,
            # reading the tails at level j + 1; one more stage after the dominant one
            for j in range(levels, -1, -1):
                read = levels if j == levels else j + 1
                for a in range(a_max):
                    best[a] = inf
                for e in range(kk):
                    v0 = on_after[e] if j == levels else here[j, e]
                    if v0 == inf:
                        continue
                    n = nxt_all[i, e]
                    for a in range(a_max):
                        v = v0 + placed[k, read, n, a]
                        if v < best[a]:
                            best[a] = v
                for a in range(a_max - 1, 0, -1):
                    if best[a - 1] < placed[k, j, i, a]:
                        placed[k, j, i, a] = best[a - 1]
                if best[a_max - 1] < placed[k, j, i, a_max - 1]:
                    placed[k, j, i, a_max - 1] = best[a_max - 1]
            if dominant:
                found = inf
                for e in range(kk):
                    if not at[0, e] < inf:
                        continue
                    n = nxt_all[i, e]
                    for a in range(a_max):
                        c = 0.0
                        for p in range(n_points):
                            c += chords[a, p] * at[p, e]
                        v = c + placed[k, 0, n, a]
                        if v < found:
                            found = v
                if found < with_d[k, i]:
                    with_d[k, i] = found
            if before:
                found = inf
                for e in range(kk):
                    if on_before[e] < inf:
                        v = on_before[e] + with_d[k, nxt_all[i, e]]
                        if v < found:
                            found = v
                if found < with_d[k, i]:
                    with_d[k, i] = found
        for k in range(n_k):
            for a in range(a_max):
                if placed[k, 0, i, a] < inf:
                    held[i] = True
    out = np.empty(n_k)
    for k in range(n_k):
        out[k] = with_d[k, 0]
    return out


def priced_pass(tables: ClassTables, m: int, low: float, top: float, limit: float,
                cost: np.ndarray, gates: list[float], late: float, late_ta: float,
                rest_gate: float, points: list[int], chords: np.ndarray) -> np.ndarray:
    """Per price (``cost``: groups x prices), the smallest value of bound (A) over the
    relaxed plans, before the prices are paid back: ``relaxed_many``'s ``with_d`` at the
    first row where no class is counted ([Note: the compiled priced pass])."""
    kernel: Callable[..., Any] = _pass      # (numba's Dispatcher, typed loosely)
    return np.asarray(kernel(*pack(tables), np.ascontiguousarray(cost, dtype=np.float64), m,
                             low, top, limit, late, late_ta,
                             np.asarray(gates, dtype=np.float64), rest_gate,
                             np.asarray(points, dtype=np.float64),
                             np.ascontiguousarray(chords, dtype=np.float64)))
