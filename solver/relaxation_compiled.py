"""The class bound's relaxed DP, priced or with classes counted, as compiled loop nests (numba).

[Note: the compiled priced pass]
``relaxation.relaxed_many`` is a few dozen numpy calls per row of its tables on small
arrays (on ResNet-50 x 32 Jetsons about 90 rows of 89 groups by up to 67 ends), so a
priced pass costs mostly the calls' overhead: 22 ms for one price, 60-170 ms for the 6
or 26 prices of a polish step, whatever the work. Shrinking the work of its costliest
line six-fold (the gated levels' masked copies, a quarter of the profile) left a pass as
slow as before (0.94 times; thirty-first session). ``priced_pass`` is the
same DP as one loop nest, compiled once per installation by numba (``cache=True``: about
3 s the first time, then 0.3 s to load: [Note: building the compiled passes]) and run
where no class is counted; the counted passes have their own ([Note: the compiled counted
pass]). It computes the same minima over
the same sums, in the same order but for the chords' weighted sum of the dominant
stage's values (``np.einsum`` in numpy), and its values equal numpy's on every pass
checked: ``tests/test_relaxation_compiled.py`` (random instances, every ``M``, prices and
deadlines), and the 108 priced passes of ``class_bound`` on every micro-batch size of
ResNet-50 x 32 Jetsons at 0.8225 s and the 174 on 64 Jetsons at 0.5845 s, bit for bit.
Those passes took 5.25 s and 12.0 s in numpy, 1.58 s (0.48 s of it loading the compiled
code) and 3.58 s compiled (``python tools/time_planner.py --compiled-ab 32 0.8225``, ``64
0.5845``: each pass both ways in turn, in one process).

Like the numpy pass, each kernel reads the clock every 8 rows (in numba's object mode: a
few microseconds) and stops with ``Late`` once the deadline has passed: without that a
fleet's pass ran on past a 5-s limit, and the search waited a second's grace for the
bound's process (the 32-device ResNet-50 fleet in 5 s: 6.11 s wall in the fleet table;
5.24-5.65 s with the check).

[Note: a row's stages once]
Per row, ``_entries`` lays out the stages (group, end) with ``x <= top`` that can take some
part below the limit, with what does not depend on the price: the gates they pass, their
first gated level, their value as the dominant stage before the price. Each price then
reads only those (``_price``). Before, each price took every group and end of the row
again, gates and all, though 55-67 % of them have ``x`` above ``top`` (ResNet-50 x 32
Jetsons in 5 s): the polish's passes of 26 prices 58 ms -> 22 ms, of 6 prices 23-32 ms ->
11-20 ms, of one price 1.2-1.3 times quicker (passes captured from a run, each timed both
ways in one process); the counted passes, whose time is in their states, the same. A
stage's ``x`` and ``T_a`` are never negative (the cost table's fits are not), so where a
stage can come before the dominant one (``M low + x + T_a < limit``) the row's smallest
``T_a`` passes the row's old test for that too.

Per row and price the loop takes every kept group and end once: the stage after the
dominant one at any position (``after``), at each gated level (a group that passes a
level's gate passes every later one, so each level's minimum is a running minimum over
the first level each stage passes), as the dominant stage (its minimum over the groups
at the chords' points) and before it, then combines each minimum over the ends with the
suffix tables, as ``relaxed_many`` does."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numba
import numpy as np

from solver.class_tables import ClassTables, Late

__all__ = ["Packed", "pack", "priced_pass", "counted_pass", "fill_row", "built", "build",
           "PRICES_INNER"]

log = logging.getLogger(__name__)

Packed = tuple[np.ndarray, ...]
"""``pack``'s arrays: x, max(E_f, E_b), T_a and X's upper bound, every row's (groups x
ends) laid end to end (inf where a row has no upper bounds); where each row starts in
them, its ends and where its ends start in the next two: the next rows and the smallest
x per end, laid end to end; whether a row is the first layer's."""


def pack(tables: ClassTables) -> Packed:
    """``tables``' rows as flat arrays (built once per tables: ``ClassTables.compiled``;
    padding each row to the most ends of a row cost 0.17-0.24 s a table of ResNet-50 x 32
    Jetsons, twice the memory of the rows, in a 5-s limit)."""
    held: Packed | None = tables.compiled.get("packed")
    if held is not None:
        return held
    rows = tables.rows
    groups = rows[0][0].shape[0]
    ends = np.asarray([r[0].shape[1] for r in rows], dtype=np.int64)
    starts = np.zeros(len(rows), dtype=np.int64)
    np.cumsum(ends[:-1] * groups, out=starts[1:])
    end_starts = np.zeros(len(rows), dtype=np.int64)
    np.cumsum(ends[:-1], out=end_starts[1:])

    def flat(field: int) -> np.ndarray:
        return np.concatenate([r[field].reshape(-1) for r in rows]).astype(np.float64, copy=False)

    laid: np.ndarray | None = tables.compiled.get("laid")
    if laid is not None:
        # (build_class_tables wrote x, max(E_f, E_b), T_a and the upper bounds so)
        x, big, t_a, up = laid
    else:
        x, big, t_a = flat(0), flat(1), flat(2)
        up = (np.concatenate([u.reshape(-1) for u in tables.uppers]).astype(np.float64,
                                                                           copy=False)
              if tables.uppers else np.full(int(ends.sum()) * groups, math.inf))
    first = np.asarray([f == 0 for f in tables.firsts], dtype=np.bool_)
    packed = (x, big, t_a, up, starts, ends, end_starts,
              np.concatenate([r[3] for r in rows]).astype(np.int64), flat(4), first)
    tables.compiled["packed"] = packed
    return packed


@numba.njit(cache=True)
def _fill_row(a_f: Any, s_f: Any, a_b: Any, s_b: Any, a_up: Any, s_up: Any, p: Any,
              inv_u: Any, beta: Any, comm: Any, up_inv: Any, up_beta: Any, up_c: Any,
              has_top: Any, red_a: Any, red_b: Any, step: Any, slack: float, above: float,
              x: Any, big: Any, t_a: Any, top: Any, lowest: Any
              ) -> None:  # pragma: no cover (compiled)
    """One row of ``build_class_tables``'s priced tables in one pass (groups x ends): ``x``,
    ``max(E_f, E_b)``, ``T_a``, the upper bound of ``X`` where ``has_top`` (else inf) and
    the smallest ``x`` per end, each the float of the numpy expressions there (the same
    operations in the same order; ``tests/test_relaxation_compiled.py``).

    [Note: the compiled rows]
    A priced table's rows were some 25 numpy passes over groups x ends each (products of
    the layer sums and the groups' constants, their sums, the slack, the upper bounds, the
    masks), 0.14-0.30 s of the 0.25-0.47 s that the first round's five tables of ResNet-50
    x 32 Jetsons took to build (the first figure a warm process, the second the bound's
    process, whose pages are fresh). ``build_class_tables`` writes them here in one pass
    per row where the class bound's passes run compiled (``relaxation.compiled_rows``:
    built, or no deadline), and in numpy elsewhere; the tables are the same arrays bit for
    bit either way."""
    groups, ends = x.shape
    for e in range(ends):
        lowest[e] = math.inf
    for g in range(groups):
        for e in range(ends):
            c_f = a_f[e] * inv_u[g] + s_f[e] * beta[g]
            c_b = a_b[e] * inv_u[g] + s_b[e] * beta[g]
            e_f = (c_f + comm[g]) * slack
            e_b = (c_b + comm[g]) * slack
            value = e_f + e_b
            x[g, e] = value
            if value < lowest[e] or value != value:
                lowest[e] = value
            big[g, e] = e_f if (e_f > e_b or e_f != e_f) else e_b
            reduce = p[e] * red_a[g] + red_b[g] if p[e] > 0 else 0.0
            t_a[g, e] = (reduce + p[e] * step[g]) * slack
            if has_top[g, e]:
                top[g, e] = (a_up[e] * up_inv[g] + s_up[e] * up_beta[g] + 2.0 * up_c[g]) * above
            else:
                top[g, e] = math.inf


def fill_row(a_f: np.ndarray, s_f: np.ndarray, a_b: np.ndarray, s_b: np.ndarray,
             a_up: np.ndarray, s_up: np.ndarray, p: np.ndarray, inv_u: np.ndarray,
             beta: np.ndarray, comm: np.ndarray, up_inv: np.ndarray, up_beta: np.ndarray,
             up_c: np.ndarray, has_top: np.ndarray, red_a: np.ndarray, red_b: np.ndarray,
             step: np.ndarray, slack: float, above: float, x: np.ndarray, big: np.ndarray,
             t_a: np.ndarray, top: np.ndarray) -> np.ndarray:
    """``_fill_row`` into ``x``, ``big``, ``t_a`` and ``top`` (groups x ends, C order, as
    ``build_class_tables`` lays them out); the smallest ``x`` per end."""
    lowest = np.empty(x.shape[1])
    _fill_row(a_f, s_f, a_b, s_b, a_up, s_up, p, inv_u, beta, comm, up_inv, up_beta, up_c,
              has_top, red_a, red_b, step, slack, above, x, big, t_a, top, lowest)
    return lowest


@numba.njit(cache=True)
def _shape(x_f: Any, ends: Any) -> tuple[int, int, int]:  # pragma: no cover (compiled)
    """The rows, the groups and the most ends of a row of ``pack``'s arrays."""
    total = 0
    width = 0
    for e in ends:
        total += e
        width = max(width, e)
    return ends.shape[0], x_f.shape[0] // total if total else 0, width


@numba.njit(cache=True)
def _late(deadline: float) -> bool:  # pragma: no cover (compiled)
    """Whether the ``time.perf_counter()`` deadline has passed (the clock read in object
    mode: a few microseconds, every 8 rows of a pass, as the numpy pass does)."""
    with numba.objmode(now="float64"):
        now = time.perf_counter()
    return now > deadline


@numba.njit(cache=True)
def _shift_in(table: Any, best: Any) -> None:  # pragma: no cover (compiled)
    """``table[min(a + 1, A - 1)]`` lowered to ``best[a]`` for every ``a``, in place (rows of
    ``a``): one more stage after the dominant one (``relaxation._shift_min``)."""
    a_max = table.shape[0]
    for a in range(a_max - 1, 0, -1):
        if best[a - 1] < table[a]:
            table[a] = best[a - 1]
    if best[a_max - 1] < table[a_max - 1]:
        table[a_max - 1] = best[a_max - 1]


@numba.njit(cache=True)
def _shift_in_many(table: Any, best: Any) -> None:  # pragma: no cover (compiled)
    """``_shift_in`` for every price at once (rows of ``a`` x prices, contiguous per row:
    ``_shift_in`` on each price's strided column cost the 26-price passes 15 %)."""
    a_max = table.shape[0]
    for a in range(a_max - 1, 0, -1):
        into, bp = table[a], best[a - 1]
        for k in range(into.shape[0]):
            into[k] = np.minimum(into[k], bp[k])
    into, bp = table[a_max - 1], best[a_max - 1]
    for k in range(into.shape[0]):
        into[k] = np.minimum(into[k], bp[k])


@numba.njit(cache=True)
def _reach(short_f: Any, eb: int, n_ends: int, top: float, held: Any,
           nxt_f: Any) -> tuple[int, bool]:  # pragma: no cover (compiled)
    """A row's ends that can have ``x <= top`` (the first ``kk``; 0: none, the rest is not
    computed) and whether a suffix after one of them is held (the dominant stage can be
    here)."""
    kk = 0
    while kk < n_ends and short_f[eb + kk] <= top:
        kk += 1
    dominant = False
    for e in range(kk):
        if held[nxt_f[eb + e]]:
            dominant = True
    return kk, dominant


@numba.njit(cache=True)
def _dims(x_f: Any, ends: Any, cost: Any, gates: Any,
          points: Any) -> tuple[int, int, int, int, int, int]:  # pragma: no cover (compiled)
    """A pass's rows, groups, most ends of a row, prices, gated levels and chord points."""
    count, groups, width = _shape(x_f, ends)
    return count, groups, width, cost.shape[1], gates.shape[0], points.shape[0]


@numba.njit(cache=True)
def _row_stages(x_f: Any, big_f: Any, ta_f: Any, up_f: Any, starts: Any, ends: Any,
                end_starts: Any, nxt_f: Any, short_f: Any, first_row: Any, i: int,
                everyone: Any, top: float, low: float, m: int, late: float, late_ta: float,
                limit: float, rest_gate: float, gates: Any, m_low: float, held: Any,
                ent_i: Any, ent_f: Any
                ) -> tuple[int, int, bool, bool, int, bool]:  # pragma: no cover (compiled)
    """Row ``i`` of a priced pass: where its ends start in ``pack``'s arrays, ``_reach``'s
    ends and whether the dominant stage can be here, whether it is the first layer's, and
    ``_entries``' stages of every group (``kk`` 0: nothing to do)."""
    n_ends, row0, eb = ends[i], starts[i], end_starts[i]
    kk, dominant = _reach(short_f, eb, n_ends, top, held, nxt_f)
    first = first_row[i]
    if kk == 0:
        return eb, 0, dominant, first, 0, False
    n_ent, before = _entries(x_f, ta_f, big_f, up_f, row0, n_ends, kk, everyone, top, low, m,
                             first, late, late_ta, limit, rest_gate, gates, dominant, m_low,
                             ent_i, ent_f, 0)
    return eb, kk, dominant, first, n_ent, before


@numba.njit(cache=True)
def _entry_space(groups: int, width: int) -> tuple[Any, Any]:  # pragma: no cover (compiled)
    """``_entries``' arrays for a row of ``groups`` x ``width`` stages: ``ent_i``, ``ent_f``."""
    return np.empty((groups * width, 4), dtype=np.int64), np.empty((groups * width, 4))


@numba.njit(cache=True)
def _any_finite(values: Any) -> bool:  # pragma: no cover (compiled)
    """Whether any of ``values`` is below inf."""
    for v in values:
        if v < np.inf:
            return True
    return False


_LATE, _REST, _DOM, _BEF = 1, 2, 4, 8
"""``_entries``' flags of a stage: it passes the late gate (it can follow the dominant
stage), and the rest gate too (at any position after it); it can be the dominant stage;
it can come before it."""


@numba.njit(cache=True)
def _entries(x_f: Any, ta_f: Any, big_f: Any, up_f: Any, row0: int, n_ends: int, kk: int,
             those: Any, top: float, low: float, m: int, first: bool, late: float,
             late_ta: float, limit: float, rest_gate: float, gates: Any, dominant: bool,
             m_low: float, ent_i: Any, ent_f: Any,
             n: int) -> tuple[int, bool]:  # pragma: no cover (compiled)
    """The stages of groups ``those`` at the row's first ``kk`` ends (their values from
    ``row0`` in ``pack``'s arrays) that can take a part below ``limit`` at some price,
    written from ``n`` on, once per row for every price ([Note: a row's stages once]): in
    ``ent_i`` the group, end, flags (``_LATE`` ...) and first gated level passed, in
    ``ent_f`` ``x``, ``T_a``, and as the dominant stage the value before the price and what
    it hides; where they end, and whether any can come before the dominant stage."""
    levels = gates.shape[0]
    before = False
    for g in those:
        at_g = row0 + g * n_ends
        if not x_f[at_g] <= top:
            continue
        for e in range(kk):
            x = x_f[at_g + e]
            if not x <= top:
                continue
            t_a = ta_f[at_g + e]
            flag = 0
            if late + t_a * late_ta < limit:
                flag |= _LATE
                if rest_gate + t_a < limit:
                    flag |= _REST
                passed = 0
                for j in range(levels):
                    if gates[j] + t_a < limit:
                        passed += 1
                ent_i[n, 3] = levels - passed
            if dominant:
                x_d = max(x, low)
                total = m * x_d + t_a
                if total < limit and up_f[at_g + e] > low:
                    flag |= _DOM
                    ent_f[n, 2] = total if first else m * x_d
                    ent_f[n, 3] = max(x, low) - max(big_f[at_g + e], low / 2)
            if m_low + x + t_a < limit:
                flag |= _BEF
                before = True
            if flag:
                ent_i[n, 0] = g
                ent_i[n, 1] = e
                ent_i[n, 2] = flag
                ent_f[n, 0] = x
                ent_f[n, 1] = t_a
                n += 1
    return n, before


@numba.njit(cache=True)
def _price(ent_i: Any, ent_f: Any, lo: int, hi: int, cost: Any, k: int, first: bool,
           points: Any, on_after: Any, here: Any, at: Any,
           on_before: Any) -> None:  # pragma: no cover (compiled)
    """``_entries``' stages ``lo`` to ``hi`` priced at ``cost[:, k]`` lowering, per end, the
    smallest values so far: after the dominant stage at any position (``on_after``), at the
    first gated level each passes (``here``: levels x ends), as the dominant stage at the
    chords' points (``at``: points x ends) and before it (``on_before``)."""
    levels = here.shape[0]
    for n in range(lo, hi):
        e = ent_i[n, 1]
        flag = ent_i[n, 2]
        c_g = cost[ent_i[n, 0], k]
        priced = ent_f[n, 0] + c_g
        if flag & _LATE:
            if flag & _REST and priced < on_after[e]:
                on_after[e] = priced
            f = ent_i[n, 3]
            if f < levels and priced < here[f, e]:
                here[f, e] = priced
        if flag & _DOM:
            base = ent_f[n, 2] + c_g
            hide = ent_f[n, 3]
            for p in range(points.shape[0]):
                v = base if points[p] == 0 else base - points[p] * hide
                if v < at[p, e]:
                    at[p, e] = v
        if flag & _BEF:
            v = priced + ent_f[n, 1] if first else priced
            if v < on_before[e]:
                on_before[e] = v


@numba.njit(cache=True)
def _pass(x_f: Any, big_f: Any, ta_f: Any, up_f: Any, starts: Any, ends: Any,
          end_starts: Any, nxt_f: Any, short_f: Any, first_row: Any, cost: Any, m: int,
          low: float, top: float, limit: float, late: float, late_ta: float, gates: Any,
          rest_gate: float, points: Any, chords: Any,
          deadline: float) -> Any:  # pragma: no cover (compiled)
    inf = np.inf
    count, groups, width, n_k, levels, n_points = _dims(x_f, ends, cost, gates, points)
    a_max = m
    out = np.full(n_k, np.nan)      # (the values; nan where the deadline passed)
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
    everyone = np.arange(groups)
    ent_i, ent_f = _entry_space(groups, width)
    best = np.empty(a_max)
    for i in range(count - 1, -1, -1):
        if not i % 8 and _late(deadline):
            return out, True
        eb, kk, dominant, first, n_ent, before = _row_stages(
            x_f, big_f, ta_f, up_f, starts, ends, end_starts, nxt_f, short_f, first_row, i,
            everyone, top, low, m, late, late_ta, limit, rest_gate, gates, m_low, held, ent_i,
            ent_f)
        if kk == 0:     # (only the first `kk` ends can have x <= top)
            continue
        for k in range(n_k):
            for e in range(kk):
                on_after[e] = inf
                on_before[e] = inf
                for j in range(levels):
                    here[j, e] = inf
                for p in range(n_points):
                    at[p, e] = inf
            _price(ent_i, ent_f, 0, n_ent, cost, k, first, points, on_after, here, at,
                   on_before)
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
                    n = nxt_f[eb + e]
                    for a in range(a_max):
                        v = v0 + placed[k, read, n, a]
                        if v < best[a]:
                            best[a] = v
                _shift_in(placed[k, j, i], best)
            if dominant:
                found = inf
                for e in range(kk):
                    if not at[0, e] < inf:
                        continue
                    n = nxt_f[eb + e]
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
                        v = on_before[e] + with_d[k, nxt_f[eb + e]]
                        if v < found:
                            found = v
                if found < with_d[k, i]:
                    with_d[k, i] = found
        for k in range(n_k):
            for a in range(a_max):
                if placed[k, 0, i, a] < inf:
                    held[i] = True
    for k in range(n_k):
        out[k] = with_d[k, 0]
    return out, False


@numba.njit(cache=True)
def _price_many(ent_i: Any, ent_f: Any, lo: int, hi: int, cost: Any, first: bool,
                points: Any, on_after: Any, here: Any, at: Any,
                on_before: Any) -> None:  # pragma: no cover (compiled)
    """``_price`` for every price at once (the minima's last axis: prices)."""
    levels = here.shape[0]
    n_k = cost.shape[1]
    for n in range(lo, hi):
        e = ent_i[n, 1]
        flag = ent_i[n, 2]
        c = cost[ent_i[n, 0]]
        x = ent_f[n, 0]
        if flag & _LATE:
            if flag & _REST:
                oa = on_after[e]
                for k in range(n_k):
                    oa[k] = np.minimum(oa[k], x + c[k])
            f = ent_i[n, 3]
            if f < levels:
                h = here[f, e]
                for k in range(n_k):
                    h[k] = np.minimum(h[k], x + c[k])
        if flag & _DOM:
            base0 = ent_f[n, 2]
            hide = ent_f[n, 3]
            for p in range(points.shape[0]):
                pt = points[p]
                ap = at[p, e]
                if pt == 0:
                    for k in range(n_k):
                        ap[k] = np.minimum(ap[k], base0 + c[k])
                else:
                    for k in range(n_k):
                        ap[k] = np.minimum(ap[k], (base0 + c[k]) - pt * hide)
        if flag & _BEF:
            ob = on_before[e]
            if first:
                ta = ent_f[n, 1]
                for k in range(n_k):
                    ob[k] = np.minimum(ob[k], (x + c[k]) + ta)
            else:
                for k in range(n_k):
                    ob[k] = np.minimum(ob[k], x + c[k])


@numba.njit(cache=True)
def _pass_many(x_f: Any, big_f: Any, ta_f: Any, up_f: Any, starts: Any, ends: Any,
               end_starts: Any, nxt_f: Any, short_f: Any, first_row: Any, cost: Any, m: int,
               low: float, top: float, limit: float, late: float, late_ta: float, gates: Any,
               rest_gate: float, points: Any, chords: Any,
               deadline: float) -> Any:  # pragma: no cover (compiled)
    """``_pass`` with the prices as the tables' last axis ([Note: many prices at once])."""
    inf = np.inf
    count, groups, width, n_k, levels, n_points = _dims(x_f, ends, cost, gates, points)
    a_max = m
    out = np.full(n_k, np.nan)      # (the values; nan where the deadline passed)
    # (per level (the last: after the dominant stage at any position), row, a, price)
    placed = np.full((levels + 1, count + 1, a_max, n_k), inf)
    for j in range(levels + 1):
        for k in range(n_k):
            placed[j, count, 0, k] = 0.0
    with_d = np.full((count + 1, n_k), inf)
    held = np.zeros(count + 1, dtype=np.bool_)
    held[count] = True
    m_low = m * low
    on_after = np.empty((width, n_k))
    here = np.empty((levels, width, n_k))
    at = np.empty((n_points, width, n_k))
    on_before = np.empty((width, n_k))
    everyone = np.arange(groups)
    ent_i, ent_f = _entry_space(groups, width)
    best = np.empty((a_max, n_k))
    found = np.empty(n_k)
    for i in range(count - 1, -1, -1):
        if not i % 8 and _late(deadline):
            return out, True
        eb, kk, dominant, first, n_ent, before = _row_stages(
            x_f, big_f, ta_f, up_f, starts, ends, end_starts, nxt_f, short_f, first_row, i,
            everyone, top, low, m, late, late_ta, limit, rest_gate, gates, m_low, held, ent_i,
            ent_f)
        if kk == 0:     # (only the first `kk` ends can have x <= top)
            continue
        on_after[:kk] = inf
        on_before[:kk] = inf
        here[:, :kk] = inf
        at[:, :kk] = inf
        _price_many(ent_i, ent_f, 0, n_ent, cost, first, points, on_after, here, at, on_before)
        for e in range(kk):         # each level: the stages that pass its gate
            for j in range(1, levels):
                hp = here[j - 1, e]
                hj = here[j, e]
                for k in range(n_k):
                    hj[k] = np.minimum(hj[k], hp[k])
        # after the dominant stage at any position (j = levels), then at each level j,
        # reading the tails at level j + 1; one more stage after the dominant one
        for j in range(levels, -1, -1):
            read = levels if j == levels else j + 1
            best[:] = inf
            for e in range(kk):
                v0 = on_after[e] if j == levels else here[j, e]
                if not _any_finite(v0):
                    continue
                n = nxt_f[eb + e]
                for a in range(a_max):
                    pl = placed[read, n, a]
                    ba = best[a]
                    for k in range(n_k):
                        ba[k] = np.minimum(ba[k], v0[k] + pl[k])
            _shift_in_many(placed[j, i], best)
        if dominant:
            found[:] = inf
            for e in range(kk):
                a0 = at[0, e]
                if not _any_finite(a0):
                    continue
                n = nxt_f[eb + e]
                for a in range(a_max):
                    pl = placed[0, n, a]
                    for k in range(n_k):
                        if a0[k] < inf:
                            c = 0.0
                            for p in range(n_points):
                                c += chords[a, p] * at[p, e, k]
                            v = c + pl[k]
                            if v < found[k]:
                                found[k] = v
            for k in range(n_k):
                if found[k] < with_d[i, k]:
                    with_d[i, k] = found[k]
        if before:
            found[:] = inf
            for e in range(kk):
                ob = on_before[e]
                wn = with_d[nxt_f[eb + e]]
                for k in range(n_k):
                    found[k] = np.minimum(found[k], ob[k] + wn[k])
            for k in range(n_k):
                if found[k] < with_d[i, k]:
                    with_d[i, k] = found[k]
        for a in range(a_max):
            for k in range(n_k):
                if placed[0, i, a, k] < inf:
                    held[i] = True
    for k in range(n_k):
        out[k] = with_d[0, k]
    return out, False


PRICES_INNER = 16
"""A priced pass of at least this many prices runs ``_pass_many`` ([Note: many prices at
once]).

[Note: many prices at once]
The polish of ``class_bound`` walks the prices of three classes up, down or kept, 26 at a
time: on ResNet-50 x 32 Jetsons in 5 s those passes were a third of the bound's process
(60 of them, 17 ms each). ``_pass`` takes the prices one after the other, each a walk over
the row's stages and tables; ``_pass_many`` keeps every price along the tables' last axis,
so each stage and table is read once for all of them and the minima over the prices are
compiled to vector instructions (``np.minimum``: the same values where none is NaN, and
none is). The same sums in the same order per price: ``tests/test_relaxation_compiled.py``
runs both kernels on the same arguments. Timed on passes captured from a run, each both
ways in one process: 26 prices 16-18 ms -> 9.5-10.7 ms; but 6 prices 4.1-4.7 ms -> 5.4-5.5
ms and one price 1.0-5.8 ms -> 3.2-23 ms (its loops over one price cost more than they
save), hence the threshold. ResNet-50 x 32 Jetsons in 5 s (``tools/time_planner.py --once
jetsons 32 --time-limit 5``, the compiled passes loaded inside the limit): 1.75-1.87 %
in 6 of 6 runs, against 1.87-2.13 % (3 of 6 below 2 %) before."""


def priced_pass(tables: ClassTables, m: int, low: float, top: float, limit: float,
                cost: np.ndarray, gates: list[float], late: float, late_ta: float,
                rest_gate: float, points: list[int], chords: np.ndarray,
                deadline: float | None = None) -> np.ndarray:
    """Per price (``cost``: groups x prices), the smallest value of bound (A) over the
    relaxed plans, before the prices are paid back: ``relaxed_many``'s ``with_d`` at the
    first row where no class is counted ([Note: the compiled priced pass]); ``Late`` once
    the ``time.perf_counter()`` deadline has passed (checked every 8 rows)."""
    kernel: Callable[..., Any] = _pass_many if cost.shape[1] >= PRICES_INNER else _pass
    return _on_time(kernel(*pack(tables), np.ascontiguousarray(cost, dtype=np.float64), m,
                           low, top, limit, late, late_ta,
                           np.asarray(gates, dtype=np.float64), rest_gate,
                           np.asarray(points, dtype=np.float64),
                           np.ascontiguousarray(chords, dtype=np.float64),
                           math.inf if deadline is None else float(deadline)))


def _on_time(found: tuple[np.ndarray, bool]) -> np.ndarray:
    """A kernel's values, or ``Late`` where it stopped at the deadline."""
    values, late = found
    if late:
        raise Late
    return np.asarray(values)


@numba.njit(cache=True)
def _counted(x_f: Any, big_f: Any, ta_f: Any, up_f: Any, starts: Any, ends: Any,
             end_starts: Any, nxt_f: Any, short_f: Any, first_row: Any, cost: Any, m: int,
             low: float, top: float, limit: float, late: float, late_ta: float, gates: Any,
             rest_gate: float, points: Any, chords: Any, kind_of: Any, kind_at: Any,
             into_f: Any, src_f: Any, speed: Any, row_low: Any, row_high: Any,
             floors_on: bool, lim: Any, head: Any,
             dom_low: float, deadline: float) -> Any:  # pragma: no cover (compiled)
    inf = np.inf
    inf32 = np.float32(np.inf)
    count, groups, width, n_k, levels, n_points = _dims(x_f, ends, cost, gates, points)
    a_max = m
    out = np.full(n_k, np.nan)      # (the values; nan where the deadline passed)
    n_kinds, n_states = kind_at.shape[0] - 1, speed.shape[0]
    # (per price, level (the last: after the dominant stage at any position), row, state, a)
    placed = np.full((n_k, levels + 1, count + 1, n_states, a_max), inf32, dtype=np.float32)
    for k in range(n_k):
        for j in range(levels + 1):
            placed[k, j, count, 0, 0] = 0.0
    with_d = np.full((n_k, count + 1, n_states), inf32, dtype=np.float32)
    # [Note: skipping the infinite suffixes]: whether a suffix table's state has a value
    alive = np.zeros((n_k, levels + 1, count + 1, n_states), dtype=np.bool_)
    for k in range(n_k):
        for j in range(levels + 1):
            alive[k, j, count, 0] = True
    held = np.zeros(count + 1, dtype=np.bool_)
    held[count] = True
    # [Note: floors of the counted tables]: per row the smallest value of each table
    fl_after = np.full((n_k, count + 1), inf)
    fl_levels = np.full((n_k, levels + 1, count + 1), inf)
    fl_d = np.full((n_k, count + 1), inf)
    for k in range(n_k):
        fl_after[k, count] = 0.0
        for j in range(levels + 1):
            fl_levels[k, j, count] = 0.0
    m_low = m * low
    on_after = np.empty((n_k, n_kinds, width))
    here = np.empty((n_k, n_kinds, levels, width))
    at = np.empty((n_k, n_kinds, n_points, width))
    on_before = np.empty((n_k, n_kinds, width))
    c_d = np.empty((n_k, n_kinds, width, a_max), dtype=np.float32)
    # the groups by kind (each kind's from kind_first[kd]) and, per row, each kind's
    # stages from _entries, from ent_lo[kd] to ent_hi[kd]
    kind_first = np.zeros(n_kinds + 1, dtype=np.int64)
    for g in range(groups):
        kind_first[kind_of[g] + 1] += 1
    for kd in range(n_kinds):
        kind_first[kd + 1] += kind_first[kd]
    by_kind = np.empty(groups, dtype=np.int64)
    placed_of = kind_first[:-1].copy()
    for g in range(groups):
        by_kind[placed_of[kind_of[g]]] = g
        placed_of[kind_of[g]] += 1
    ent_i, ent_f = _entry_space(groups, width)
    ent_lo = np.zeros(n_kinds, dtype=np.int64)
    ent_hi = np.zeros(n_kinds, dtype=np.int64)
    live = np.zeros(n_kinds, dtype=np.bool_)
    reads = np.zeros((n_kinds, width), dtype=np.bool_)
    best = np.empty((n_states, a_max), dtype=np.float32)
    # per row the range of each kind's fitting states (from kind_at[kd] in into_f and
    # src_f) within the states the row keeps: [q_lo, q_hi)
    q_lo = np.empty(n_kinds, dtype=np.int64)
    q_hi = np.empty(n_kinds, dtype=np.int64)
    for i in range(count - 1, -1, -1):
        if not i % 8 and _late(deadline):
            return out, True
        n_ends, row0, eb = ends[i], starts[i], end_starts[i]
        kk, dominant = _reach(short_f, eb, n_ends, top, held, nxt_f)
        if kk == 0:     # (only the first `kk` ends can have x <= top)
            continue
        # the states the row keeps ([Note: states by speed]): speed in [low, high]
        s_lo = np.searchsorted(speed, row_low[i], side="left")
        s_hi = np.searchsorted(speed, row_high[i], side="right")
        for kd in range(n_kinds):
            fits = into_f[kind_at[kd]:kind_at[kd + 1]]
            q_lo[kd] = kind_at[kd] + np.searchsorted(fits, s_lo)
            q_hi[kd] = kind_at[kd] + np.searchsorted(fits, s_hi)
            live[kd] = False
        for g in range(groups):
            if x_f[row0 + g * n_ends] <= top and q_lo[kind_of[g]] < q_hi[kind_of[g]]:
                live[kind_of[g]] = True
        if not live.any():
            continue
        first = first_row[i]
        n_ent, before = 0, False
        for kd in range(n_kinds):
            ent_lo[kd] = n_ent
            if live[kd]:
                n_ent, some = _entries(x_f, ta_f, big_f, up_f, row0, n_ends, kk,
                                       by_kind[kind_first[kd]:kind_first[kd + 1]], top, low,
                                       m, first, late, late_ta, limit, rest_gate, gates,
                                       dominant, m_low, ent_i, ent_f, n_ent)
                before = before or some
            ent_hi[kd] = n_ent
        for k in range(n_k):
            for kd in range(n_kinds):
                for e in range(kk):
                    on_after[k, kd, e] = inf
                    on_before[k, kd, e] = inf
                    for j in range(levels):
                        here[k, kd, j, e] = inf
                    for p in range(n_points):
                        at[k, kd, p, e] = inf
            # the smallest over each kind's groups, per end
            for kd in range(n_kinds):
                if live[kd]:
                    _price(ent_i, ent_f, ent_lo[kd], ent_hi[kd], cost, k, first, points,
                           on_after[k, kd], here[k, kd], at[k, kd], on_before[k, kd])
            for kd in range(n_kinds):
                if not live[kd]:
                    continue
                for e in range(kk):
                    n = nxt_f[eb + e]
                    for j in range(1, levels):      # each level: the stages that pass its gate
                        if here[k, kd, j - 1, e] < here[k, kd, j, e]:
                            here[k, kd, j, e] = here[k, kd, j - 1, e]
                    if floors_on:                   # (after the running minima)
                        if not on_after[k, kd, e] < lim[k] - head[i] - dom_low - fl_after[k, n]:
                            on_after[k, kd, e] = inf
                        for j in range(levels):
                            if not here[k, kd, j, e] < (lim[k] - head[i] - dom_low
                                                        - fl_levels[k, j + 1, n]):
                                here[k, kd, j, e] = inf
            # after the dominant stage at any position (j = levels), then at each level j,
            # reading the tails at level j + 1; one more stage after the dominant one
            for j in range(levels, -1, -1):
                read = levels if j == levels else j + 1
                best[:] = inf32
                for kd in range(n_kinds):
                    if not live[kd]:
                        continue
                    for e in range(kk):
                        v0 = on_after[k, kd, e] if j == levels else here[k, kd, j, e]
                        if v0 == inf:
                            continue
                        v32 = np.float32(v0)
                        n = nxt_f[eb + e]
                        tbl = placed[k, read, n]        # (views: 10 % quicker here)
                        has = alive[k, read, n]
                        for q in range(q_lo[kd], q_hi[kd]):
                            if not has[src_f[q]]:
                                continue
                            to = best[into_f[q]]
                            row = tbl[src_f[q]]
                            for a in range(a_max):
                                w = v32 + row[a]
                                if w < to[a]:
                                    to[a] = w
                for s in range(s_lo, s_hi):
                    _shift_in(placed[k, j, i, s], best[s])
                    for a in range(a_max):
                        if placed[k, j, i, s, a] < inf32:
                            alive[k, j, i, s] = True
                            break
        for k in range(n_k):
            for s in range(s_lo, s_hi):
                if alive[k, 0, i, s]:
                    held[i] = True
        if dominant:
            # the dominant stage's value at every a (its chords), and per kind the ends whose
            # smallest value can lead below the limit at some price
            for kd in range(n_kinds):
                if not live[kd]:
                    continue
                for e in range(kk):
                    reads[kd, e] = False
                    n = nxt_f[eb + e]
                    for k in range(n_k):
                        least = inf
                        for a in range(a_max):
                            if at[k, kd, 0, e] < inf:
                                c = 0.0
                                for p in range(n_points):
                                    c += chords[a, p] * at[k, kd, p, e]
                            else:
                                c = inf
                            c_d[k, kd, e, a] = np.float32(c)
                            least = min(least, c)
                        if floors_on:
                            if least < lim[k] - head[i] - fl_levels[k, 0, n]:
                                reads[kd, e] = True
                        elif least < inf:
                            reads[kd, e] = True
            for k in range(n_k):
                for kd in range(n_kinds):
                    if not live[kd]:
                        continue
                    for q in range(q_lo[kd], q_hi[kd]):
                        s, src = into_f[q], src_f[q]
                        found = inf32
                        for e in range(kk):
                            if not reads[kd, e]:
                                continue
                            n = nxt_f[eb + e]
                            if not alive[k, 0, n, src]:
                                continue
                            for a in range(a_max):
                                v = c_d[k, kd, e, a] + placed[k, 0, n, src, a]
                                if v < found:
                                    found = v
                        if found < with_d[k, i, s]:
                            with_d[k, i, s] = found
        if before:
            for k in range(n_k):
                for kd in range(n_kinds):
                    if not live[kd]:
                        continue
                    for e in range(kk):
                        if floors_on and not on_before[k, kd, e] < (
                                lim[k] - head[i] - fl_d[k, nxt_f[eb + e]]):
                            on_before[k, kd, e] = inf
                    for q in range(q_lo[kd], q_hi[kd]):
                        s, src = into_f[q], src_f[q]
                        found = inf32
                        for e in range(kk):
                            v0 = on_before[k, kd, e]
                            if v0 == inf:
                                continue
                            v = np.float32(v0) + with_d[k, nxt_f[eb + e], src]
                            if v < found:
                                found = v
                        if found < with_d[k, i, s]:
                            with_d[k, i, s] = found
        if floors_on:
            for k in range(n_k):
                least32 = inf32
                for s in range(n_states):
                    for a in range(a_max):
                        least32 = min(least32, placed[k, levels, i, s, a])
                fl_after[k, i] = least32
                for j in range(levels):
                    least32 = inf32
                    for s in range(n_states):
                        for a in range(a_max):
                            least32 = min(least32, placed[k, j, i, s, a])
                    fl_levels[k, j, i] = least32
                fl_levels[k, levels, i] = fl_after[k, i]
                least32 = inf32
                for s in range(n_states):
                    least32 = min(least32, with_d[k, i, s])
                fl_d[k, i] = least32
    for k in range(n_k):
        least32 = inf32
        for s in range(n_states):
            least32 = min(least32, with_d[k, 0, s])
        out[k] = least32
    return out, False


def counted_pass(tables: ClassTables, m: int, low: float, top: float, limit: float,
                 cost: np.ndarray, gates: list[float], late: float, late_ta: float,
                 rest_gate: float, points: list[int], chords: np.ndarray,
                 states: tuple[np.ndarray, ...],
                 floors: tuple[bool, np.ndarray, np.ndarray, float],
                 deadline: float | None = None) -> np.ndarray:
    """``priced_pass`` where classes are counted, in single precision: ``states``, the
    kinds of the groups (``relaxation._CountStates.flat``), ``floors``, whether they are on,
    the limit per price, the prefix lows and the dominant stage's low; ``Late`` as
    ``priced_pass``.

    [Note: the compiled counted pass]
    ``relaxation.relaxed_many``'s counted pass ([Note: counted classes]) is the priced DP
    with an axis of states (the count vectors of the counted classes, by bound speed) in
    every table, in single precision, and floors that leave out stages that cannot lead
    below the limit ([Note: floors of the counted tables]). In numpy it groups the stages
    by kind (the devices of the counted classes a group takes) and reads, per set of ends
    the kinds reach, every pair of kind and state at once ([Note: kinds at once]). Here
    each row takes, per price, the smallest value over each kind's groups per end and
    table (after the dominant stage at any position, at each gated level, as the dominant
    stage at the chords' points, before it), applies the same floors to those minima,
    then for each kind, end and state the row keeps (its speed range, [Note: states by
    speed]) adds the suffix of the state the kind leaves, as numpy does: each minimum
    converted to single precision before the sum, the floors and the dominant stage's
    reads decided over all prices at once, so the tables are numpy's bit for bit
    (``tests/test_relaxation_compiled.py``: random instances, every set of counted
    classes, with and without floors). Each kind's states are read from a list of those it
    fits within the row's range, not by skipping the others (0.35-0.50 s -> 0.25-0.33 s a
    pass with all three classes counted). Measured in one process with ``python
    tools/time_planner.py --compiled-ab``: ResNet-50 x 32 Jetsons at 0.8225 s, the 3
    counted passes of micro-batch 8 2.17 s -> 0.48 s; x 64 at 0.5845 s, 12 counted passes
    14.1 s -> 4.5 s; no value differs. The loop over ``a`` is not vectorised (no SIMD in
    the assembly, with ``a`` padded to 8 or ``fastmath`` either; nor with ``a`` fixed at
    8, unsigned indices, or every load before every store, thirty-third session): about 1
    ns per value.

    [Note: skipping the infinite suffixes]
    Most states of a suffix table have no value at any ``a`` (no suffix of the rows after
    it leaves exactly those devices): on micro-batch 8's costliest counted pass of ResNet-50
    x 32 Jetsons (all three classes counted, 1584 states), 80 % of the 45.8 million reads of
    a state's ``a`` values by a stage after the dominant one were all inf, and 98 % lowered
    nothing. Each table now keeps, per state, whether it has a value (``alive``), and a
    read of one that has none is skipped there and as the dominant stage's suffix: the
    same minima (``inf`` plus anything lowers nothing), three counted passes captured
    from a run (micro-batch 8, all classes counted), each timed both ways in one process,
    0.29 / 0.26 / 0.36 s -> 0.19 / 0.17 / 0.24 s."""
    kernel: Callable[..., Any] = _counted
    kind_of, kind_at, into_f, src_f, speed, row_low, row_high = states
    on, lim, head, dom_low = floors
    return _on_time(kernel(*pack(tables), np.ascontiguousarray(cost, dtype=np.float64), m,
                           low, top, limit, late, late_ta,
                           np.asarray(gates, dtype=np.float64), rest_gate,
                           np.asarray(points, dtype=np.float64),
                           np.ascontiguousarray(chords, dtype=np.float64),
                           kind_of, kind_at, into_f, src_f, speed, row_low, row_high, on,
                           lim, head,
                           float(dom_low), math.inf if deadline is None else float(deadline)))


def built(counted: bool) -> bool:
    """Whether the priced or counted pass (the priced one with the tables' rows) is
    compiled already, in this process or in numba's cache on disk (a build costs 3-6 s:
    [Note: building the compiled passes])."""
    return all(_ready(kernel) for kernel in ((_counted,) if counted
                                             else (_pass, _pass_many, _fill_row)))


def _ready(kernel: Any) -> bool:
    """Whether numba's ``kernel`` is compiled in this process or in its cache on disk."""
    if kernel.signatures:
        return True
    try:    # (numba's cache index, internal: an unknown layout counts as built)
        return bool(kernel._cache._cache_file._load_index())
    except Exception:   # noqa: BLE001
        return True


def build() -> float:
    """Both passes compiled (or loaded from numba's cache) on a tiny instance, with the
    argument types of the class bound's calls; the seconds it took.

    [Note: building the compiled passes]
    numba compiles a pass on its first call after an install (the priced one about 3 s,
    the counted one about 6 s on this host) and caches it on disk. Inside a time limit
    that build would take the limit's bound process most of a 5-s limit, so
    ``relaxation.relaxed_many`` runs a pass that is not built yet in numpy where it has a
    deadline (the same values, 3-6 times slower; said once per process) and builds it
    where it has none. ``python -m solver.relaxation_compiled`` builds both at once, as
    the README's set-up does."""
    from solver.class_tables import ClassTables
    from solver.relaxation import relaxed_many

    started = time.perf_counter()
    x = np.array([[1.0, 2.0], [0.6, 1.1]])
    rows = tuple((x * (1 + r), x / 2, x / 10, np.array([r + 1, 2]), x.min(axis=0) * (1 + r))
                 for r in range(2))
    tables = ClassTables((0, 1), rows, np.array([[1.0], [2.0]]), np.array([2.0]),
                         np.array([1.0]))
    for counted in ((), (0,)):
        relaxed_many(tables, 2, 0.5, 4.0, 20.0, np.array([[0.1]]), 0.2, None, None, counted)
    relaxed_many(tables, 2, 0.5, 4.0, 20.0, np.full((PRICES_INNER, 1), 0.1), 0.2)
    # the rows of the priced tables (build_class_tables' argument types)
    one = np.ones(2)
    fill_row(one, one, one, one, one, one, one, one, one, one, one, one, one,
             np.ones((2, 2), dtype=np.bool_), one, one, one, 1.0, 1.0, np.empty((2, 2)),
             np.empty((2, 2)), np.empty((2, 2)), np.empty((2, 2)))
    return time.perf_counter() - started


if __name__ == "__main__":      # pragma: no cover (python -m: see build)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("the class bound's compiled passes, built or loaded in %.1f s", build())
