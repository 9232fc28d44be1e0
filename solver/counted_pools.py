"""The class bound's DP with the pools counted: transfers at the links of the stage before."""

from __future__ import annotations

import math
import time

import numpy as np

from solver.class_tables import ClassTables, Flat, Late, Pooled
from solver.link_floors import ABOVE, CUT_ABOVE, SLACK, TAIL_SLACK
from solver.relaxation import gate_levels, prefix_lows, rest_gate_at

__all__ = ["After", "counted_run", "flat_stages"]

_TERMS_AT_ONCE = 200_000
"""``counted_run`` computes the terms of every stage of a run at once where they have at
most this many values (stages x sender profiles), else per row for the stages it keeps."""


def _counted(tables: ClassTables, pooled: Pooled, m: int, low: float, top: float,
             limit: float, rho: float = 0.0, deadline: float | None = None) -> float:
    """``counted_run``'s value."""
    return counted_run(tables, pooled, m, low, top, limit, rho, deadline)[0]


After = tuple[np.ndarray, np.ndarray]
"""``counted_run``'s suffixes after the dominant stage: the table of those whose first
stage is right after it (rows x pools x profiles) and per row the smallest of any."""


def counted_run(tables: ClassTables, pooled: Pooled, m: int, low: float, top: float,
                limit: float, rho: float = 0.0, deadline: float | None = None,
                after: After | None = None, prune: bool = True) -> tuple[float, After]:
    """``relaxed`` with the devices counted instead of priced: the smallest value of bound
    (A) over plans of the relaxed stages (every group on count vectors of the classes, at
    most ``totals`` devices of each in all) whose stages all have ``x <= top``, whose
    dominant stage has ``X > low``, with the filters of ``relaxed``; each transfer is
    bounded by the links from the classes of the stage before ([Note: counted pools]);
    ``Late`` once the ``time.perf_counter()`` deadline has passed. Also returns its
    suffixes after the dominant stage, for ``after`` in a run of the same ``top`` and
    ``limit`` and a ``low`` at least as large: that run then takes them instead of
    building its own (their filters, ``low``'s gates, are weaker or the same there, so
    they hold every suffix of that run, at no more than its value or, where left out, at
    or above the limit; the value is still a lower bound, at most its own). ``prune``
    False keeps the pools and stages that cannot give a value below the limit (the same
    value: for the tests).

    [Note: counted pools]
    Where the classes have few count vectors (``CLASS_POOLS_MAX``), the DP of ``relaxed``
    carries the count vector ``q`` of the devices the stages from a first layer on use
    (a suffix; every stage takes devices no other uses), so a relaxed plan uses at most
    the cluster's devices of each class and no prices are needed. It also carries the
    *sender profile* of the stage before the suffix: per class, the fastest link and the
    smallest latency from a device of that stage's classes to a device of that class
    (``_profile_of``; classes of interchangeable devices have the same links, coarse
    classes the best of their members'). Each receiver ``e`` of a stage gets its share
    from the stage before, over a link no faster than that profile's for its class and
    than its own fastest link, so ``E_f`` and ``E_b`` each hold at least ``lat + cut max_e
    b_e / bw_e`` with those links, minimised over integer shares, and ``lat`` the
    profile's smallest latency into the group's classes. A stage prepended on group
    ``g`` reads its suffix at ``g``'s own profile; the first stage has no transfer.
    Instead of ``a``, the DP takes its upper bound ``min(M - 1, |q'|)`` (``q'``: the
    devices of the stages after the dominant one, at least one each); (A) only falls with
    a larger ``a`` (``X_d >= max(E_f^d, E_b^d)``), so that is a lower bound too, and exact
    for plans of one device per stage. Every other rule of ``relaxed`` holds for each
    plan, so the value is a lower bound of (A) on every plan in the bucket. A group
    dominated by another with no more devices of any class, no larger constant for any
    sender profile and an own profile no worse (no slower link, no larger latency for
    any class) is dropped as in ``relaxed``: every value of the DP only grows with the
    stage times.
    """
    inf = math.inf
    count = len(tables.firsts)
    n_pools, n_prof = len(pooled.free_speed), pooled.gamma.shape[1]
    # a <= min(M - 1, devices after the dominant stage), per pool of those devices
    a_cap = np.minimum(m - 1, pooled.sizes).astype(np.float64)
    gates, levels = gate_levels(m, rho, low)
    rest_gate = rest_gate_at(m, int(tables.totals.sum()), rho, low, top)
    ta_limit = limit - min(0.0, rest_gate)
    # [Note: one pass per run]: every phase keeps x <= top, T_a < limit - min(0,
    # rest_gate) and the ends of the row up to the first whose x over every group is
    # above top. The stages of every row are gathered once per table (flat_stages, for
    # the largest top and T_a limit of class_bound's runs), the terms of each phase that
    # do not depend on the suffixes (floors and tables) once per run where they are few
    # (_TERMS_AT_ONCE, else per row for the stages it keeps), in the float operations of
    # a step per row; a row then selects its stages by masks and reads its suffixes for
    # its live pools only (a minimum over the same values: bit for bit the step per row,
    # tests/counted_reference.py)
    flat = flat_stages(pooled, top, ta_limit, deadline)
    keep_s = np.nonzero((flat.lowest <= top) & (flat.t_a < ta_limit)
                        & (flat.shortest <= top))[0]
    ta_t = flat.t_a[keep_s]
    if after is not None or (levels and bool(
            (max([*gates, rest_gate]) + ta_t < limit).all())):
        # [Note: one table after the dominant stage]
        # The tables of positions 1 .. levels after the dominant stage differ from the
        # table of any position only through the stages some position's gate turns away.
        # Where every stage of the run passes every gate (the first position's, the
        # largest, and the rest gate), each position's table is the table of any position
        # (from the last position back: the same minimum over the same sums), so one table
        # gives the same values bit for bit, without the work per position. A run on the
        # suffixes of another (``after``) builds no table after the dominant stage at all.
        levels, gates = 0, []
    # over (first row, pool, profile of the stage before): stack[j] (j < levels) the
    # suffixes whose first stage is at position j + 1 after the dominant one,
    # stack[levels] the suffixes after the dominant one (any position), with_d the
    # suffixes holding the dominant stage
    stack = np.full((levels + 1, count + 1, n_pools + 1, n_prof), inf)
    stack[:, count, 0] = 0.0
    with_d = np.full((count + 1, n_pools + 1, n_prof), inf)
    gate_col = np.asarray(gates)[:, None, None]
    m_low = m * low
    live_all = pooled.free_speed * top * ABOVE
    used_all = pooled.speed * top * ABOVE
    # per row the smallest value of any suffix from it after the dominant stage (`floor`)
    # and holding it (`floor_d`; inf: none). Every value only grows as stages are put
    # before it: each adds at least its x, the dominant stage at least x_d + (M - 1) low /
    # 2 ((M - a) X_d + a max(E_f, E_b) with a <= M - 1, X_d >= max(x_d, low) and max(E_f,
    # E_b) >= X_d / 2), and the stages before a row at least the head's work over the
    # cluster's bound speed. A stage whose x, the rest of its prefix and the smallest
    # suffix after it already reach the limit is left out (its plans are at the limit or
    # above: the bound, at most the limit, does not change)
    floor = np.full(count + 1, inf)
    floor[count] = 0.0
    floor_d = np.full(count + 1, inf)
    head_low, dominant_low = prefix_lows(tables, pooled.head, m, low)
    cut = limit * CUT_ABOVE if prune else inf
    if not prune:
        head_low = np.zeros_like(head_low)
        used_all = np.full_like(used_all, inf)
    # the same for the suffixes right after the dominant stage, at any position after it
    # and at positions 2 .. levels + 1
    floor_0, floor_any, floor_pos = floor.copy(), floor.copy(), floor.copy()
    if after is not None:
        stack[0], floor = after[0], after[1]
        floor_0 = stack[0].reshape(count + 1, -1).min(axis=1)
    # rows whose tables are the same at every position after the dominant stage
    same = np.ones(count + 1, dtype=bool)
    gate_max = max([*gates, rest_gate])
    row_s, nxt_s, at, g_s = (flat.row[keep_s], flat.nxt[keep_s], flat.at[keep_s],
                             flat.group[keep_s])
    offsets = np.searchsorted(row_s, np.arange(count + 1)).tolist()
    x_low, ups = flat.lowest[keep_s], flat.upper[keep_s]
    x_s, big_s = flat.x[keep_s], flat.big[keep_s]
    src = pooled.src
    ta = ta_t[:, None]

    def terms(pick: slice | np.ndarray) -> tuple[np.ndarray, ...]:
        """Per stage of ``pick``: the filters of the phases that do not read the suffixes
        and, per sender profile, ``x`` where at most ``top`` (else inf), that where the
        rest gate holds, the dominant stage's hidden part and value without the suffix,
        and a stage's before the dominant one (inf: none)."""
        x_low_p, ta_p1, ups_p, row_p = x_low[pick], ta_t[pick], ups[pick], row_s[pick]
        # a stage after the dominant one: only those that pass the gate and leave room
        # below the limit before the suffixes they read (the dominant stage and the head
        # before them)
        room = x_low_p + (dominant_low + head_low[row_p])
        rest_ok = rest_gate + ta_p1 < limit
        gated_every = gate_max + ta_p1 < limit
        last_gate = gates[-1] + ta_p1 < limit if levels else rest_ok
        # the dominant stage: M max(x, low) + T_a below the limit and X > low possible
        dom_ok = (m * np.maximum(x_low_p, low) + ta_p1 < limit) & (ups_p > low)
        before_ok = m_low + x_low_p + ta_p1 < limit
        # as a step per row: x0[g, e][:, None] + 2.0 * comm[g] and big0[g, e][:, None] + comm[g]
        x_p, big_p = x_s[pick], big_s[pick]
        ta_p, first_p = ta[pick], (row_p == 0)[:, None]
        capped = np.where(x_p <= top, x_p, inf)
        rest_vals = np.where(rest_ok[:, None], capped, inf)
        x_d = np.maximum(capped, low)
        # inf where x is (no plan there): base is inf, hide must not be nan
        with np.errstate(invalid="ignore"):
            hide = np.where(np.isfinite(capped),
                            np.maximum(x_p, low) - np.maximum(big_p, low / 2), 0.0)
        total = m * x_d + ta_p
        base = np.where((total < limit) & (ups_p[:, None] > low),
                        np.where(first_p, total, m * x_d), inf)
        # a stage before the dominant one (round >= M X_d + X_s + T_a^s)
        c_before = np.where(m_low + capped + ta_p < limit,
                            np.where(first_p, capped + ta_p, capped), inf)
        return (room, rest_ok, gated_every, last_gate, dom_ok, before_ok, capped, rest_vals,
                hide, base, c_before)

    # the terms of every stage at once where they are few, else per row for the stages
    # the row keeps ([Note: one pass per run])
    every_terms = (terms(slice(None)) if len(keep_s) * (n_prof + 1) <= _TERMS_AT_ONCE
                   else None)
    # pools whose free devices can run the layers before the row in stages of x <= top:
    # each such stage has x U >= its work (U: its bound speeds), so the head's work is
    # at most top times the free speed; the others start no relaxed plan; and pools
    # that can run the layers from the row on in such stages (the suffix uses exactly
    # its pool: a smaller one has no finite value, skip it)
    lives = ((live_all[None] >= (pooled.head * SLACK)[:, None])
             & (used_all[None] >= (pooled.tail * TAIL_SLACK)[:, None]))
    live_rows, live_pools = np.nonzero(lives)
    live_at = np.searchsorted(live_rows, np.arange(count + 1)).tolist()
    # per row the smallest value of a suffix after a stage that ends before it: one after
    # the dominant stage (and the dominant stage still to come) or one holding it
    reach = np.minimum(floor + dominant_low, floor_d)
    for i in range(count - 1, -1, -1):
        if deadline is not None and time.perf_counter() > deadline:
            raise Late
        lo, hi = offsets[i], offsets[i + 1]
        if lo == hi or live_at[i] == live_at[i + 1]:
            continue
        nx = nxt_s[lo:hi]
        # every phase needs a suffix after the stage whose value leaves room below the
        # limit (floor)
        on = x_low[lo:hi] + (reach[nx] + head_low[i]) < cut
        kept = int(np.count_nonzero(on))
        if not kept:
            continue
        # the row's stages: a slice (each phase masks with `on`) where it keeps most of
        # them, else those it keeps
        pick: slice | np.ndarray
        if every_terms is not None and 4 * kept >= 3 * (hi - lo):
            pick, mask = slice(lo, hi), on
        else:
            pick, mask = np.nonzero(on)[0] + lo, None
            nx = nxt_s[pick]
        (room_i, rest_ok, gated_every, last_gate, dom_ok, before_ok, capped, rest_vals, hide,
         base_all, c_before) = (terms(pick) if every_terms is None
                                else tuple(t[pick] for t in every_terms))
        xl = x_low[pick]
        live = live_pools[live_at[i]:live_at[i + 1]]
        # the pools each stage's suffix leaves, for the live pools (contiguous)
        cols = src[g_s[pick]].take(live, axis=1)                            # (S, P)
        at_i = at[pick][:, None] + cols * n_prof
        # [Note: equal positions]: where the rows read hold the same suffixes at every
        # position after the dominant stage, a stage that passes every gate adds the same
        # to every position of this row: the after phase takes it once for all of them,
        # and only the stages that some gates let through and others do not are taken per
        # position (their floors are the same at every position too)
        shared = after is None and bool(same[nx].all())
        every = gated_every if shared else None
        mixed = False
        if after is None:
            keep = rest_ok & (room_i + floor_any[nx] < cut)
            if mask is not None:
                keep &= mask
            if every is not None:
                both = keep & every
                if both.any():
                    found = _best_of(both, capped, stack[levels], at_i)
                    stack[:, i, live] = found
                keep &= ~every
            if keep.any():
                mixed = True
                found = _best_of(keep, rest_vals, stack[levels], at_i)
                stack[levels, i, live] = np.minimum(stack[levels, i, live], found)
        if levels and after is None:
            # position j + 1 reads the suffix at position j + 2 (the last: any position);
            # the gates fall with j: the last one lets through every stage any of them does
            pos = last_gate & (room_i + floor_pos[nx] < cut)
            if mask is not None:
                pos &= mask
            if every is not None:
                pos &= ~every
            some = np.nonzero(pos)[0]
            if len(some):
                mixed = True
                gated = np.where(gate_col + ta[pick][some][None] < limit, capped[some][None],
                                 inf)                                           # (L, S, R)
                found = (gated.transpose(0, 2, 1)[..., None]
                         + stack[1:].reshape(levels, -1)[:, at_i[some]][:, None]).min(axis=2)
                stack[:levels, i, live] = np.minimum(stack[:levels, i, live],
                                                     found.transpose(0, 2, 1))  # (L, P, R)
        # the dominant stage: only those with room below the limit before a suffix right
        # after it
        dom = dom_ok & (xl + floor_0[nx] + (dominant_low + head_low[i]) < cut)
        if mask is not None:
            dom &= mask
        dom = np.nonzero(dom)[0]
        if len(dom):
            tail = stack[0].reshape(-1)[at_i[dom]]                              # (D, P)
            base, part = base_all[dom], hide[dom]                               # (D, R)
            scale = a_cap[cols[dom]]                                            # (D, P)
            value = (base.T[:, :, None] - scale[None] * part.T[:, :, None]
                     + tail[None]).min(axis=1)                                 # (R, P)
        # a stage before the dominant one: only those that leave room below the limit
        # before the suffixes holding the dominant stage (rows after this one: the row
        # takes both phases' values at once)
        before = before_ok & (xl + floor_d[nx] + head_low[i] < cut)
        if mask is not None:
            before &= mask
        row_d = None
        if before.any():
            found = _best_of(before, c_before, with_d, at_i)
            row_d = found if not len(dom) else np.minimum(value.T, found)
        elif len(dom):
            row_d = value.T
        if row_d is not None:
            with_d[i, live] = row_d
            floor_d[i] = float(row_d.min())     # (the other pools: none, inf)
        if after is None:
            if mixed or not shared:
                same[i] = bool((stack[:, i] == stack[levels, i]).all())
            if same[i]:
                floor[i] = floor_0[i] = floor_any[i] = float(stack[levels, i].min())
                floor_pos[i] = floor[i] if levels else inf
            else:
                floor[i], floor_0[i] = float(stack[:, i].min()), float(stack[0, i].min())
                floor_any[i] = float(stack[levels, i].min())
                floor_pos[i] = float(stack[1:, i].min()) if levels else inf
        reach[i] = min(floor[i] + dominant_low, floor_d[i])
    return float(with_d[0, :n_pools].min()), (stack[0], floor)


def flat_stages(pooled: Pooled, top: float, ta_limit: float,
                deadline: float | None = None) -> Flat:
    """``Flat`` of the stages with ``lowest <= top`` and ``T_a < ta_limit``: a cached one
    of caps at least those (the smallest top), else a new one, kept for later runs;
    ``Late`` once the ``time.perf_counter()`` deadline has passed."""
    caps = [key for key in pooled.flat if key[0] >= top and key[1] >= ta_limit]
    if caps:
        return pooled.flat[min(caps)]
    parts: list[list[np.ndarray]] = [[] for _ in range(9)]
    for i, (_, x0, lowest, upper, big0, t_a, nxt, shortest) in enumerate(pooled.rows):
        if deadline is not None and not i % 16 and time.perf_counter() > deadline:
            raise Late
        g, e = np.nonzero((lowest <= top) & (t_a < ta_limit))
        for out, value in zip(parts, (np.full(len(g), i, dtype=np.intp), g, nxt[e],
                                      shortest[e], lowest[g, e], t_a[g, e], upper[g, e],
                                      x0[g, e], big0[g, e]), strict=True):
            out.append(value)
    row, group, nxt_f, short_f, low_f, ta_f, up_f, x0_f, big0_f = (np.concatenate(p)
                                                                    for p in parts)
    n_pools, n_prof = len(pooled.free_speed), pooled.gamma.shape[1]
    at = nxt_f * ((n_pools + 1) * n_prof) + pooled.profile[group]
    comm = np.stack([r[0] for r in pooled.rows])
    comm_f = comm[row, group]
    found = Flat(row, group, nxt_f, short_f, low_f, ta_f, up_f, x0_f, big0_f, comm, at,
                 x0_f[:, None] + 2.0 * comm_f, big0_f[:, None] + comm_f)
    pooled.flat[(top, ta_limit)] = found
    return found


def _best_of(mask: np.ndarray, values: np.ndarray, table: np.ndarray,
             at: np.ndarray) -> np.ndarray:
    """``_best`` over the stages of ``mask``: ``(pools, profiles)``."""
    sel = np.nonzero(mask)[0]
    return _best(values[sel], table, at[sel])


def _best(values: np.ndarray, table: np.ndarray, at: np.ndarray) -> np.ndarray:
    """``_counted``'s step: the smallest over the stages ``t`` of ``values[t, r]`` plus the
    suffix after the stage, ``table`` (C-contiguous) at the flat positions ``at`` (its
    row, pool and the stage's own profile, per stage and pool): ``(pools, profiles)``.
    The sums run with the stages in the middle axis and the pools last (contiguous), the
    same float operations as any other order."""
    found: np.ndarray = (values.T[:, :, None] + table.reshape(-1)[at][None]).min(axis=1).T
    return found
