"""``solver.counted_pools.counted_run`` as on main 903aa00: the reference for its faster
versions."""

from __future__ import annotations

import math
import time

import numpy as np

from solver.class_tables import ClassTables, Late, Pooled
from solver.counted_pools import After
from solver.link_floors import ABOVE, CUT_ABOVE, SLACK, TAIL_SLACK
from solver.relaxation import _AFTER_LEVELS

__all__ = ["reference_counted_run"]


def reference_counted_run(tables: ClassTables, pooled: Pooled, m: int, low: float, top: float,
                 limit: float, rho: float = 0.0, deadline: float | None = None,
                 after: After | None = None, prune: bool = True) -> tuple[float, After]:
    """The value and the suffixes after the dominant stage of ``solver.counted_pools.counted_run``
    (see there), computed as on main 903aa00."""
    inf = math.inf
    count = len(tables.firsts)
    n_pools, n_prof = len(pooled.free_speed), pooled.gamma.shape[1]
    src = pooled.src
    # a <= min(M - 1, devices after the dominant stage), per pool of those devices
    a_cap = np.minimum(m - 1, pooled.sizes).astype(np.float64)
    gates, levels = gate_levels(m, rho, low)
    rest_gate = rest_gate_at(m, int(tables.totals.sum()), rho, low, top)
    ta_limit = limit - min(0.0, rest_gate)
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
    head_low = pooled.head / float(tables.totals @ tables.speeds) * TAIL_SLACK
    dominant_low = (m - 1) * low / 2 * TAIL_SLACK
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
    for i in range(count - 1, -1, -1):
        if deadline is not None and time.perf_counter() > deadline:
            raise Late
        comm, x0, lowest, upper, big0, t_a, nxt, shortest = pooled.rows[i]
        k = int(np.searchsorted(shortest, top, side="right"))
        if not k:
            continue
        # every phase below keeps x <= top and T_a < limit - min(0, rest_gate), and needs
        # a suffix after the stage whose value leaves room below the limit (floor)
        after_low = np.minimum(floor[nxt[:k]] + dominant_low, floor_d[nxt[:k]])
        g_t, e_t = np.nonzero((lowest[:, :k] <= top) & (t_a[:, :k] < ta_limit)
                              & (lowest[:, :k] + (after_low + head_low[i])[None] < cut))
        # pools whose free devices can run the layers before the row in stages of x <=
        # top: each such stage has x U >= its work (U: its bound speeds), so the head's
        # work is at most top times the free speed; the others start no relaxed plan
        # and pools that can run the layers from the row on in such stages (the suffix
        # uses exactly its pool: a smaller one has no finite value, skip it)
        live = np.nonzero((live_all >= pooled.head[i] * SLACK)
                          & (used_all >= pooled.tail[i] * TAIL_SLACK))[0]
        if not len(g_t) or not len(live):
            continue
        first = tables.firsts[i] == 0
        comm_t = comm[g_t]                                                  # (T, R)
        x = x0[g_t, e_t][:, None] + 2.0 * comm_t
        ta = t_a[g_t, e_t][:, None]
        capped = np.where(x <= top, x, inf)
        # the suffix after the stage, read at the stage's own profile: (T, P) positions
        # in a (row, pool, profile) table, flat
        cols = src[g_t][:, live]
        at = ((nxt[e_t][:, None] * (n_pools + 1) + cols) * n_prof
              + pooled.profile[g_t][:, None])
        x_low = lowest[g_t, e_t]
        ta_t = ta[:, 0]
        # a stage after the dominant one: only those that pass the gate and leave room
        # below the limit before the suffixes they read (the dominant stage and the head
        # before them)
        room = x_low + (dominant_low + head_low[i])
        if after is None:
            some = np.nonzero((rest_gate + ta_t < limit) & (room + floor_any[nxt[e_t]] < cut))[0]
            if len(some):
                found = _best(np.where(rest_gate + ta[some] < limit, capped[some], inf),
                              stack[levels], at[some])
                stack[levels, i, live] = np.minimum(stack[levels, i, live], found)
        if levels and after is None:
            # position j + 1 reads the suffix at position j + 2 (the last: any position);
            # the gates fall with j: the last one lets through every stage any of them does
            some = np.nonzero((gates[-1] + ta_t < limit) & (room + floor_pos[nxt[e_t]] < cut))[0]
            if len(some):
                gated = np.where(gate_col + ta[some][None] < limit, capped[some][None],
                                 inf)                                           # (L, S, R)
                found = (gated.transpose(0, 2, 1)[..., None]
                         + stack[1:].reshape(levels, -1)[:, at[some]][:, None]).min(axis=2)
                stack[:levels, i, live] = np.minimum(stack[:levels, i, live],
                                                     found.transpose(0, 2, 1))  # (L, P, R)
        # the dominant stage: only those with M max(x, low) + T_a below the limit, X >
        # low possible, and room below the limit before a suffix right after it
        ups = upper[g_t, e_t]
        dom = np.nonzero((m * np.maximum(x_low, low) + ta_t < limit) & (ups > low)
                         & (x_low + floor_0[nxt[e_t]] + (dominant_low + head_low[i]) < cut))[0]
        tail = stack[0].reshape(-1)[at[dom]]                                  # (D, P)
        if len(dom) and np.isfinite(tail).any():
            c_d, x_dom = capped[dom], x[dom]
            big = big0[g_t[dom], e_t[dom]][:, None] + comm_t[dom]
            x_d = np.maximum(c_d, low)
            # inf where x is (no plan there): base is inf, hide must not be nan
            with np.errstate(invalid="ignore"):
                hide = np.where(np.isfinite(c_d),
                                np.maximum(x_dom, low) - np.maximum(big, low / 2), 0.0)
            total = m * x_d + ta[dom]
            # the dominant stage has X > low: not a stage whose X is at most low
            base = np.where((total < limit) & (ups[dom][:, None] > low),
                            total if first else m * x_d, inf)                  # (D, R)
            value = (base.T[:, :, None] - a_cap[cols[dom]][None] * hide.T[:, :, None]
                     + tail[None]).min(axis=1)                                 # (R, P)
            with_d[i, live] = np.minimum(with_d[i, live], value.T)
        # a stage before the dominant one: only those that leave room below the limit
        # before the suffixes holding the dominant stage (with M low: round >= M X_d +
        # X_s + T_a^s)
        before = np.nonzero((m_low + x_low + ta_t < limit)
                            & (x_low + floor_d[nxt[e_t]] + head_low[i] < cut))[0]
        if len(before):
            cap_b, ta_b = capped[before], ta[before]
            c_s = np.where(m_low + cap_b + ta_b < limit, cap_b + ta_b if first else cap_b,
                           inf)
            with_d[i, live] = np.minimum(with_d[i, live], _best(c_s, with_d, at[before]))
        if after is None:
            floor[i], floor_0[i] = float(stack[:, i].min()), float(stack[0, i].min())
            floor_any[i] = float(stack[levels, i].min())
            floor_pos[i] = float(stack[1:, i].min()) if levels else inf
        floor_d[i] = float(with_d[i].min())
    return float(with_d[0, :n_pools].min()), (stack[0], floor)


def _best(values: np.ndarray, table: np.ndarray, at: np.ndarray) -> np.ndarray:
    """``_counted``'s step: the smallest over the stages ``t`` of ``values[t, r]`` plus the
    suffix after the stage, ``table`` (C-contiguous) at the flat positions ``at`` (its
    row, pool and the stage's own profile, per stage and pool): ``(pools, profiles)``.
    The sums run with the stages in the middle axis and the pools last (contiguous), the
    same float operations as any other order."""
    found: np.ndarray = (values.T[:, :, None] + table.reshape(-1)[at][None]).min(axis=1).T
    return found


def gate_levels(m: int, rho: float, low: float) -> tuple[list[float], int]:
    """``(gates, levels)``: for the stages at positions ``j = 1 .. levels`` after the
    dominant one, ``(M - j (1 - rho)) low``, a lower bound of ``(M - j (1 - rho)) X_d``
    while the factor is >= 0 (``levels``: the positions up to the first negative factor,
    at most ``_AFTER_LEVELS``; with a negative factor ``low`` is no bound, and the
    position is left to ``rest_gate_at``)."""
    factors = [m - j * (1.0 - rho) for j in range(1, _AFTER_LEVELS + 1)]
    levels = next((j for j, f in enumerate(factors) if f < 0.0), len(factors))
    return [f * low for f in factors[:levels]], levels


def rest_gate_at(m: int, n_total: int, rho: float, low: float, top: float) -> float:
    """A lower bound of ``(M - j (1 - rho)) X_d`` for a stage at any position ``j <= n -
    1`` after the dominant one, ``X_d`` in ``(low, top]``: ``round >= T^{d+j} >= (M - j (1 -
    rho)) X_d + T_a^{d+j}`` ([Note: the class bound]); ``T_a < round`` alone does not hold
    past ``j (1 - rho) > M`` (docs/planner.md's example: ``M = 1``, ``T_a^3 = 9`` in a round
    of 8.1)."""
    c = m - (n_total - 1) * (1.0 - rho)
    return c * low if c >= 0.0 else c * top
