"""Lower bounds on the round time that see transfers, all-reduce, stage positions and fill.

[Note: the stage bound]
Let ``d`` be the dominant stage of a plan (the largest ``X``, ``X_d <= round / M``) and
``s`` any stage, ``k_s = s`` stages after the first. ``solver.evaluate`` gives ``round >=
T_w^s + T_e^s + T_a^s``; for ``s <= d``, ``T_e^s >= M X_d``; for ``s > d``, ``T_w^s +
T_e^s = sum_{i<d} E_f^i + M X_d - sum_{i=d}^{s-1} E_b^i >= (M - (s - d)) X_d``. With
``X_d >= X_s`` both give, for ``k_s <= M``,

    (Z)   round >= Z_s(k_s) = M X_s + max(0, T_a^s - k_s X_s)

(``Z_s(M) = M X_s`` holds for any ``k_s``; ``Z`` is non-increasing in ``k``). And stage 0
has ``T_e^0 = M X_d + sum_{i<d} X_i + D`` with the drain ``D >= sum_{i>d} X_i - (w - 1)
X_d / 2`` (``w = min(M, S - d) <= min(M, n)``, ``min(E_f, E_b) <= X / 2``), so

    (F)   round >= alpha X_d + sum_s X_s,   alpha = M - 1 - (min(M, n) - 1) / 2 >= 0.

Per stage we use lower bounds ``x_s <= X_s`` that do not depend on the neighbours:

* compute: device ``e`` of the group takes ``(I + S b_e) / u_e`` at least (``I``, ``S``:
  the stage's base intercepts and slopes, forward plus backward; ``u_e``: the bound
  speed, [Note: cost columns] in ``solver.dp``); for ``e`` the device with the largest
  ``b_e / u_e`` that is at least ``I / u_max + S beta``, where ``beta`` is the smallest
  possible ``max_e b_e / u_e`` over integer shares ``>= 1`` summing to the micro-batch
  (Algorithm 1's greedy split is exact for that; memory caps only raise it);
* transfers (a stage after the first): every receiver gets its whole share from the
  other, disjoint group, in at least one message, so ``E_f`` and ``E_b`` each hold at
  least ``lat0 + cut gamma``: ``lat0`` the smallest latency of any link, ``gamma`` the
  smallest ``max_e b_e / bw_e`` over integer shares (``bw_e``: the fastest link into
  ``e``);
* ``T_a``: exact (it depends only on the group and the layers).

Given an incumbent ``I``, a plan below it has every ``Z_s < I`` and, when its ``X_d`` lies
in ``(T_{j-1}, T_j]`` of a grid ``0 = T_{-1} < T_0 < ... < T_J = I / M`` (``M X_d < I``),
``alpha T_{j-1} + sum_s x_s < I`` with every ``x_s <= T_j``. So a DP over (first layer,
devices used before, stages before) in the paper's space (slices of one order) computes,
per ``T_j``, the smallest ``sum x_s`` of the stages from a first layer on that keep ``Z_s
< I`` and ``x_s <= T_j``; when for every ``j`` ``alpha T_{j-1} + (a lower bound of the
stages before) + that sum >= I``, no plan through there beats ``I``. Tables built for an
incumbent stay valid for any smaller one (they only admit more). A cell that leaves
``c`` devices used before layer ``first`` has at most ``min(M, c)`` stages before it, the
weakest case, since ``Z`` and hence the sums only shrink with more stages before.
Relative slacks of ``1e-9`` cover float rounding against the DP's own sums.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from solver.link_floors import SLACK, in_bandwidth, min_latency, min_max_ratio
from solver.space import SliceSpace
from solver.timing import LayerSums

__all__ = ["StageBound", "stage_bound", "proven_bound", "GRID"]

GRID = 8
"""Values ``T_j`` of the largest stage time the fill bound (F) is split over."""


@dataclass(frozen=True)
class StageBound:
    """The tables of [Note: the stage bound] for one micro-batch size and incumbent
    ``limit``: ``sums[j, i, c, k]``, the smallest sum of stage-time bounds of the stages
    from ``firsts[i]`` on, started after ``c`` devices and ``k`` stages (``k`` capped at
    ``min(M, n - 1)``), that keep ``Z < limit`` and ``x <= grid[j]`` (inf: none)."""

    firsts: tuple[int, ...]
    index: dict[int, int]
    grid: tuple[float, ...]
    alpha: float
    limit: float
    micro_batches: int
    sums: np.ndarray

    def hopeless(self, first: int, used: int, head: float, incumbent: float) -> bool:
        """True when no plan whose stages from layer ``first`` on start after ``used``
        devices, and whose stages before have ``sum X >= head``, beats ``incumbent`` (at
        most ``limit``)."""
        row = self.index.get(first)
        if row is None or incumbent > self.limit:
            return False
        k = min(used, self.micro_batches, self.sums.shape[3] - 1)
        column = self.sums[:, row, used, k]
        low = 0.0
        for j, top in enumerate(self.grid):
            if self.alpha * low + head + column[j] < incumbent:
                return False
            low = top
        return True


def stage_bound(space: SliceSpace, sums: LayerSums, cut_bytes: Sequence[int],
                ends: Sequence[int], micro_batch: int, num_micro: int, incumbent: float,
                deadline: float | None = None) -> StageBound | None:
    """The tables of [Note: the stage bound] for one micro-batch size and incumbent, over
    the candidate stage ends ``ends`` (a non-final stage ends after one of them); None when
    the ``time.perf_counter()`` deadline passes first."""
    n, m = space.n, num_micro
    num_layers = len(sums.fwd_slope) - 1
    firsts = [0] + [e + 1 for e in ends if e + 1 < num_layers]
    lasts = np.asarray([e for e in ends if e < num_layers - 1] + [num_layers - 1])
    index = {f: i for i, f in enumerate(firsts)}
    k_count = min(m, n - 1) + 1
    alpha = m - 1 - (min(m, n) - 1) / 2
    limit = incumbent
    grid = tuple(limit / m * (j + 1) / GRID for j in range(GRID))
    grid_arr = np.asarray(grid)
    inter = np.asarray(sums.fwd_intercept, dtype=np.float64) + np.asarray(
        sums.bwd_intercept, dtype=np.float64)
    slope = np.asarray(sums.fwd_slope, dtype=np.float64) + np.asarray(
        sums.bwd_slope, dtype=np.float64)
    params = np.asarray(sums.param_bytes, dtype=np.float64)
    bw_in = in_bandwidth(space)
    lat0 = min_latency(space)
    # per slice group (devices c..c+size-1): its constants
    rows = []
    for c in range(n):
        for gid, _ in space.groups(c, n):
            info = space.group(gid)
            us = [space.bounds[d] for d in info.members]
            beta = min_max_ratio(micro_batch, us)
            gamma = min_max_ratio(micro_batch, [bw_in[d] for d in info.members])
            if beta is None or gamma is None:
                continue
            size = info.size
            reduce_a = 2.0 * (size - 1) / (size * info.min_bw) if size > 1 else 0.0
            reduce_b = 2.0 * (size - 1) * info.max_lat if size > 1 else 0.0
            step = max(upb / div for upb, div, _ in info.update_pairs)
            rows.append((c, size, 1.0 / max(us), beta, gamma, reduce_a, reduce_b, step))
    if not rows:
        return StageBound(tuple(firsts), index, grid, alpha, limit, m,
                          np.full((GRID, len(firsts) + 1, n + 1, k_count), math.inf))
    table = np.asarray([r[2:] for r in rows], dtype=np.float64)
    g_start = np.asarray([r[0] for r in rows])
    g_size = np.asarray([r[1] for r in rows])
    inv_u, beta_g, gamma_g, red_a, red_b, step_g = table.T
    ks = np.arange(k_count, dtype=np.float64)
    out = np.full((GRID, len(firsts) + 1, n + 1, k_count), math.inf)
    out[:, len(firsts)] = 0.0   # past the last layer (reached by final stages only)
    nxt_all = np.asarray([index.get(int(last) + 1, len(firsts)) for last in lasts])
    k_next = np.minimum(np.arange(k_count) + 1, k_count - 1)
    limit_hi = limit * (1.0 + 1e-9)
    for row in range(len(firsts) - 1, -1, -1):
        if deadline is not None and time.perf_counter() > deadline:
            return None
        first = firsts[row]
        sel = lasts >= first
        ls = lasts[sel] + 1
        nxt = nxt_all[sel]
        i_s = inter[ls] - inter[first]
        s_s = slope[ls] - slope[first]
        p_s = params[ls] - params[first]
        cut = cut_bytes[first - 1] if first > 0 else 0
        comm = 2.0 * (lat0 + cut * gamma_g) if cut > 0 else np.zeros_like(gamma_g)
        x = (i_s[None] * inv_u[:, None] + s_s[None] * beta_g[:, None]) * SLACK \
            + comm[:, None] * SLACK                                      # (G, lasts)
        ta = (np.where(p_s[None] > 0, p_s[None] * red_a[:, None] + red_b[:, None], 0.0)
              + p_s[None] * step_g[:, None]) * SLACK
        z = m * x[..., None] + np.maximum(0.0, ta[..., None] - ks * x[..., None])
        if k_count > m:
            z[..., m] = m * x
        ok = (z < limit_hi) & (x[..., None] <= grid_arr[-1] * (1.0 + 1e-9))  # (G, L, K)
        g_idx, l_idx = np.nonzero(ok.any(axis=2))
        if not len(g_idx):
            continue
        starts = g_start[g_idx]
        after = starts + g_size[g_idx]
        rest = out[:, nxt[l_idx], after][:, :, k_next]                   # (J, T, K)
        xs = x[g_idx, l_idx]                                              # (T,)
        allowed = ok[g_idx, l_idx][None] & (xs[None, :, None] <= grid_arr[:, None, None]
                                            * (1.0 + 1e-9))
        cand = np.where(allowed, xs[None, :, None] + rest, math.inf)      # (J, T, K)
        # per start device: the smallest over its groups and their ends
        best = np.full((n + 1, GRID, k_count), math.inf)
        np.minimum.at(best, starts, cand.transpose(1, 0, 2))
        out[:, row] = best.transpose(1, 0, 2)
    return StageBound(tuple(firsts), index, grid, alpha, limit, m, out)


def proven_bound(space: SliceSpace, sums: LayerSums, cut_bytes: Sequence[int],
                 ends: Sequence[int], micro_batch: int, num_micro: int, low: float,
                 high: float, steps: int = 12) -> float:
    """A lower bound on every plan of the space with this micro-batch size, at least
    ``low``: bisect ``[low, high]`` for the largest incumbent the tables prove hopeless
    at the first layer (each value found is proven on its own; ``steps`` builds)."""
    proven = low
    for _ in range(steps):
        mid = (proven + high) / 2
        found = stage_bound(space, sums, cut_bytes, ends, micro_batch, num_micro, mid)
        if found is not None and found.hopeless(0, 0, 0.0, mid):
            proven = mid
        else:
            high = mid
    return proven
