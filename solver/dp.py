"""Algorithm 2, the Asteroid planner: an exact Pareto-front DP over stages, groups and shares.

[Note: the DP's space]
Devices are sorted by capability (speed descending, then memory descending, then
name). A plan is a sequence of stages; stage ``s`` takes a contiguous run of layers and a
contiguous slice of the sorted devices; stages in pipeline order take consecutive slices
starting at the most capable device (the least capable devices may stay unused). The
shares inside a stage come from Algorithm 1 (``solver.split``) for the stage's layers,
group, micro-batch size and in-flight count ``min(M, S - s)``. The micro-batch size
ranges over the divisors of the batch size (or the sizes given). The DP returns the plan
of this space with the smallest ``evaluate()`` round latency; ``solver.brute`` enumerates
the same space and the tests check that both agree.

[Note: why a Pareto front]
The round latency is not a max of per-stage terms (the dominant stage's ``M X``, the
warm-up/cool-down sums and the drain term couple all stages), so a plain min-max DP is
not exact. The DP runs from the last stage to the first and describes a suffix pipeline
``P`` (stages ``k..S-1``, costed as a pipeline of its own) by five numbers:

* ``R``    its own round latency,
* ``Xm``   the largest ``X_s = E_f^s + E_b^s`` (the dominant stage ``d``, last argmax),
* ``Pre``  ``sum_{i=k}^{d-1} X_i + D(P)``, where ``D(P)`` is the drain term of
  ``solver.evaluate`` ([Note: the drain correction]); it depends only on ``d`` and the
  stages after it, so it stays fixed while ``d`` stays dominant,
* ``G``    ``max_{s in P} (T_a^s - sum_{i=k}^{s-1} E_b^i)``,
* ``SumX`` ``sum_{s in P} X_s``,

and by its stage count ``N`` (known from the DP cell, see [Note: DP cells]).

Prepending a stage ``n`` (``F = E_f^n``, ``B = E_b^n``, ``X = F + B``, ``A = T_a^n``):

* ``Xm >= X`` (the dominant stays in ``P``; ties go to the later stage):
  ``R' = max(F + R, M Xm + X + Pre + A)``, ``Xm' = Xm``, ``Pre' = X + Pre``;
* ``Xm < X`` (``n`` becomes dominant, its tail is all of ``P``):
  ``D' = max(0, SumX - (min(M, N + 1) - 1) min(F, B))``,
  ``R' = M X + max(A + D', G - B)``, ``Xm' = X``, ``Pre' = D'``;
* in both cases ``G' = max(A, G - B)`` and ``SumX' = X + SumX``.

(Derivation: with ``d`` dominant, ``round = W_d + M X_d + max(D + max_{s<=d}(sum_{i=s}^{d-1}
B_i + A_s), max_{s>d}(A_s - sum_{i=d}^{s-1} B_i))`` where ``W_d = sum_{i<d} F_i``;
prepending adds ``F`` to every warm-up and one more ``s < d`` term.) ``R'`` is
non-decreasing in ``R, Xm, Pre, G, SumX`` except where ``Xm`` crosses ``X``: a summary
``lo`` with ``Xm_lo < X <= Xm_hi`` makes ``n`` dominant and pays ``D' <= SumX_lo``, while
``hi`` keeps its own dominant and pays ``X + Pre_hi``. Every pipeline satisfies ``R >= M
Xm + G``, so the ``G`` part of the jump is harmless. For ``D'``: every stage of the cost
table has ``min(E_f, E_b) >= rho X`` (``hiding_ratio``: the fitted forward/backward time
ratios of the layers bound it; re-sharding time adds equally to both), so with
``h = 1 + (min(M, N + 1) - 1) rho``, ``D' <= SumX_lo - (h - 1) X``, which is at most
``X + Pre_hi`` when ``SumX_lo - Pre_hi <= h Xm_lo``; more stages only hide more. So
``lo`` *dominates* ``hi`` when it is ``<=`` in all five numbers, has at least as many
stages (within a DP cell ``min(M, N + 1)`` is the same for all), and either ``Xm_lo ==
Xm_hi`` or ``SumX_lo - Pre_hi <= h Xm_lo``. Prepending the same stage preserves this
relation (case by case: both keep their dominant and ``SumX_lo - Pre_hi`` is unchanged;
only ``lo``'s changes, to a larger ``Xm``; both change, to equal ``Xm``), so keeping the
non-dominated summaries per DP cell is exact.

[Note: DP cells]
``E_f`` of a stage includes receiving its input cut from the previous stage, which
depends on the previous stage's group and shares. A cell is therefore keyed by
``(r, l, iface)``: ``r`` stages remain, they start at layer ``l``, and the stage before
them has interface ``iface = (i, j, shares)`` (its device slice and shares, interned as a
small integer; -1 before the first stage). ``r`` fixes the in-flight count ``min(M, r)``
that memory needs; suffixes of ``M`` or more stages all have ``M`` in flight at their
first stage, so they share one class ``r = M`` ("at least M stages"). The class also
fixes the drain term of a stage prepended as the new dominant: its ``w = min(M, r + 1)``.
Per-stage times are taken from ``LayerSums`` and ``transfer_time`` with the same float
operations as ``evaluate``, so the dominant-stage comparisons agree bit for bit.

[Note: incumbent pruning]
Any plan's round latency is at least ``M X`` of each of its stages, and prepending a stage
whose ``X`` does not exceed ``Xm`` never lowers ``R``. So, given an incumbent plan of
latency ``I`` (from a first pass over a coarse subset of the cuts, then from every finished
micro-batch size), a summary with ``M Xm >= I`` is dropped, and one with ``R >= I`` is
kept only as a "ghost" (``R = Pre = inf``): it can still matter if a stage with a larger
``X`` is prepended, which makes ``R`` depend on ``G`` and ``SumX`` alone. A stage whose layers need
``M * work * b / (sum of its group's speeds) >= I`` even when perfectly balanced, and a
cell whose remaining layers need that on all remaining devices together, are skipped
too (some stage carries at least the average load). All these rules are exact.

[Note: candidate cuts]
Exactness costs time roughly quadratic in the number of cut positions. With more than
``max_cuts`` layers boundaries, cuts are restricted to ``max_cuts`` candidates: the
boundaries that split the model's total compute evenly, each moved to the boundary with
the fewest cut bytes within half a step. The DP is exact over the candidate cuts;
``max_cuts=None`` uses every boundary.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from asteroid_fx.errors import PlanError
from cost_models.table import CostTable
from solver.cluster import Cluster, Device
from solver.evaluate import (
    WORKSPACE_FRACTION,
    LayerSums,
    allreduce_from,
    drain_term,
    evaluate,
    stage_memory_parts,
    transfer_time,
)
from solver.plan import Plan, PlannerInfo, Stage
from solver.split import split_shares, split_stage

__all__ = ["DP_VERSION", "DEFAULT_MAX_CUTS", "DPResult", "PipelineSummary", "asteroid_dp",
           "sorted_devices", "candidate_cuts", "micro_batch_choices", "no_fit_error",
           "prepend", "dominates", "hiding_ratio"]

log = logging.getLogger(__name__)

DP_VERSION = "1"
DEFAULT_MAX_CUTS = 96
_COARSE_CUTS = 12

# A summary: (R, Xm, Pre, G, SumX, stage, tail); stage = (first, last, i, j, shares).
Summary = tuple[float, float, float, float, float,
                tuple[int, int, int, int, tuple[int, ...]], Any]


class PipelineSummary(tuple[float, float, float, float]):
    """``(R, Xm, Pre, G)`` of a suffix pipeline (see [Note: why a Pareto front]), with
    ``sum_x`` (``SumX``) and ``stages`` (``N``) as attributes, so that code written for
    the four numbers keeps working."""

    sum_x: float
    stages: int

    def __new__(cls, r: float, xm: float, pre: float, g: float, sum_x: float,
                stages: int) -> PipelineSummary:
        self = super().__new__(cls, (r, xm, pre, g))
        self.sum_x = sum_x
        self.stages = stages
        return self

    def __repr__(self) -> str:
        return (f"PipelineSummary({tuple(self)!r}, sum_x={self.sum_x!r}, "
                f"stages={self.stages!r})")


def sorted_devices(cluster: Cluster, host_flops: float) -> list[Device]:
    """Devices by capability: speed descending, then memory descending, then name."""
    speeds = cluster.speeds(host_flops)
    return sorted(cluster.devices, key=lambda d: (-speeds[d.name], -d.memory_bytes, d.name))


def micro_batch_choices(batch_size: int, micro_batch_sizes: Sequence[int] | None) -> list[int]:
    """The micro-batch sizes to try: divisors of the batch size (or the given ones)."""
    if batch_size < 1:
        raise PlanError(f"batch_size must be >= 1, got {batch_size}")
    if micro_batch_sizes is None:
        return [b for b in range(1, batch_size + 1) if batch_size % b == 0]
    bad = [b for b in micro_batch_sizes if b < 1 or batch_size % b]
    if bad:
        raise PlanError(f"micro-batch sizes {bad} do not divide the batch size {batch_size}; "
                        f"use divisors of {batch_size}")
    return sorted(set(micro_batch_sizes))


def candidate_cuts(costs: CostTable, max_cuts: int | None) -> list[int]:
    """Layer indices ``c`` after which a stage may end (``c`` in ``0..L-2``), sorted."""
    n = costs.num_layers
    if max_cuts is None or n - 1 <= max_cuts:
        return list(range(n - 1))
    work = [lc.fwd.at(1) + lc.bwd.at(1) for lc in costs.layers]
    total = sum(work) or 1.0
    prefix = [0.0]
    for w in work:
        prefix.append(prefix[-1] + w)
    chosen: set[int] = set()
    step = total / (max_cuts + 1)
    for k in range(1, max_cuts + 1):
        target = k * step
        # boundary c (after layer c) where prefix[c + 1] is closest to the target
        best = min(range(n - 1), key=lambda c: abs(prefix[c + 1] - target))
        window = [c for c in range(n - 1) if abs(prefix[c + 1] - target) <= step / 2] or [best]
        chosen.add(min(window, key=lambda c: (costs.cut_bytes[c],
                                              abs(prefix[c + 1] - target))))
    return sorted(chosen)


def prepend(m: int, f: float, b: float, a: float,
            tail: tuple[float, float, float, float] | None) -> PipelineSummary:
    """The summary of a pipeline after prepending a stage with ``E_f = f``, ``E_b = b``,
    ``T_a = a`` to ``tail`` (None: the stage alone); see [Note: why a Pareto front].

    ``tail`` must be a ``PipelineSummary`` returned by ``prepend`` (typed as the four
    numbers so that callers can keep their own summary aliases).
    """
    x = f + b
    if tail is None:
        return PipelineSummary(m * x + a, x, 0.0, a, x, 1)
    if not isinstance(tail, PipelineSummary):
        raise TypeError(f"prepend needs the PipelineSummary of the tail (from prepend), got "
                        f"the plain tuple {tail!r}, which lacks SumX and the stage count")
    r_t, xm_t, pre_t, g_t = tail
    g = max(a, g_t - b)
    sum_x = x + tail.sum_x
    if xm_t >= x:
        return PipelineSummary(max(f + r_t, m * xm_t + x + pre_t + a), xm_t, x + pre_t, g,
                               sum_x, tail.stages + 1)
    drain = drain_term(f, b, tail.sum_x, tail.stages, m)
    return PipelineSummary(m * x + max(a + drain, g_t - b), x, drain, g, sum_x,
                           tail.stages + 1)


def dominates(lo: PipelineSummary, hi: PipelineSummary, m: int, rho: float = 0.0) -> bool:
    """True when ``lo`` is never worse than ``hi`` after prepending any stages whose
    ``min(E_f, E_b) >= rho (E_f + E_b)``, with ``m`` micro-batches (the Pareto rule)."""
    h = 1.0 + (min(m, lo.stages + 1) - 1) * rho
    return (lo[0] <= hi[0] and lo[1] <= hi[1] and lo[2] <= hi[2] and lo[3] <= hi[3]
            and lo.sum_x <= hi.sum_x and lo.stages >= hi.stages
            and (lo[1] == hi[1] or lo.sum_x - hi[2] <= h * lo[1]))


def hiding_ratio(costs: CostTable) -> float:
    """A ``rho`` with ``min(E_f, E_b) >= rho (E_f + E_b)`` for every stage of any plan.

    Each device's forward / backward time ratio lies between the smallest and the
    largest ratio of the layers' fitted intercepts and slopes (a ratio of sums lies
    between the ratios of the terms), and so does ``compute_f / compute_b``; re-sharding
    time adds the same to both, which moves the share of the smaller one towards 1/2.
    """
    low, high = math.inf, 0.0
    for lc in costs.layers:
        for f, b in ((lc.fwd.intercept_s, lc.bwd.intercept_s),
                     (lc.fwd.per_sample_s, lc.bwd.per_sample_s)):
            if f == 0.0 and b == 0.0:
                continue
            ratio = f / b if b > 0.0 else math.inf
            low, high = min(low, ratio), max(high, ratio)
    if low == math.inf:  # no time anywhere
        return 0.0
    from_low = low / (1.0 + low)
    from_high = 0.0 if high == math.inf else 1.0 / (1.0 + high)
    # a hair below the bound: the DP's float sums may round the other way
    return max(0.0, min(from_low, from_high, 0.5) * (1.0 - 1e-9))


def _pareto(items: list[Summary], cap: int | None, h: float) -> list[Summary]:
    """The summaries no other one dominates (``h``: see [Note: why a Pareto front])."""
    items.sort(key=lambda s: (s[0], s[1], s[2], s[3], s[4]))
    kept: list[Summary] = []
    for s in items:
        xm, pre, g, sx = s[1], s[2], s[3], s[4]
        dominated = False
        for k in kept:  # a plain loop: this scan is the DP's hot spot
            kx = k[1]
            if (kx <= xm and k[2] <= pre and k[3] <= g and k[4] <= sx
                    and (kx == xm or k[4] - pre <= h * kx)):
                dominated = True
                break
        if dominated:
            continue
        kept.append(s)
        if cap is not None and len(kept) >= cap:
            break
    return kept


@dataclass
class DPResult:
    """The best plan found, its predicted round time, and search statistics."""

    plan: Plan | None
    round_time_s: float
    search_time_s: float
    cells: int
    max_front: int
    candidate_cuts: int


class _Search:
    """The DP for one micro-batch size (see the module notes)."""

    def __init__(self, costs: CostTable, cluster: Cluster, devices: list[Device],
                 speeds: list[float], sums: LayerSums, ends: list[int], micro_batch: int,
                 num_micro: int, osf: float, max_front: int | None,
                 incumbent: float = math.inf) -> None:
        self.costs, self.cluster, self.devices = costs, cluster, devices
        self.names = [d.name for d in devices]
        self.speeds, self.sums, self.osf = speeds, sums, osf
        self.mb, self.m = micro_batch, num_micro
        self.caps = [d.memory_bytes for d in devices]
        self.n = len(devices)
        self.np_fi = np.asarray(sums.fwd_intercept, dtype=np.float64)
        self.np_fs = np.asarray(sums.fwd_slope, dtype=np.float64)
        self.np_bi = np.asarray(sums.bwd_intercept, dtype=np.float64)
        self.np_bs = np.asarray(sums.bwd_slope, dtype=np.float64)
        self.speed_total = [[sum(speeds[a:b]) for b in range(len(speeds) + 1)]
                            for a in range(len(speeds))]
        self.slowest = [[min(speeds[a:b], default=1.0) for b in range(len(speeds) + 1)]
                        for a in range(len(speeds))]
        self.min_bw = [[0.0] * (self.n + 1) for _ in range(self.n)]
        for a in range(self.n):
            low = math.inf
            for b in range(a + 1, self.n):
                for c in range(a, b):
                    low = min(low, cluster.bandwidth_bytes_s(self.names[c], self.names[b]))
                self.min_bw[a][b + 1] = low
        self.num_layers = costs.num_layers
        self.ends = ends  # candidate last layers of a non-final stage
        self.max_front = max_front
        self.base_shares = {
            (i, j): split_shares(micro_batch, speeds[i:j])
            for i in range(self.n) for j in range(i + 1, min(self.n, i + micro_batch) + 1)}
        self._comm: dict[tuple[int, int, int], float] = {}
        self._options: dict[tuple[int, int, int, bool], list[Any]] = {}
        self._closed: dict[tuple[int, int, int], list[Summary]] = {}
        # interfaces (i, j, shares) as small integers; -1 = before the first stage
        self._iface_ids: dict[tuple[int, int, tuple[int, ...]], int] = {}
        self._ifaces: list[tuple[int, int, tuple[int, ...]]] = []
        self.max_front_seen = 0
        self.incumbent = incumbent
        self.rho = hiding_ratio(costs)

    # -- stage costs --------------------------------------------------------------------
    def iface(self, i: int, j: int, shares: tuple[int, ...]) -> int:
        key = (i, j, shares)
        found = self._iface_ids.get(key)
        if found is None:
            found = self._iface_ids[key] = len(self._ifaces)
            self._ifaces.append(key)
        return found

    def comm(self, prev: int, cur: int, first: int) -> float:
        """Re-sharding time of the cut before layer ``first`` between two interfaces."""
        if prev < 0:
            return 0.0
        key = (prev, cur, first)
        value = self._comm.get(key)
        if value is None:
            pi, pj, pshares = self._ifaces[prev]
            i, j, shares = self._ifaces[cur]
            value = self._comm[key] = transfer_time(
                self.cluster, self.names[pi:pj], pshares, self.names[i:j], shares,
                self.costs.cut_bytes[first - 1])
        return value

    # -- the recursion ------------------------------------------------------------------
    def options(self, first: int, i: int, flight: int, final: bool) -> list[Any]:
        """Stages starting at layer ``first`` on devices from ``i`` with ``flight``
        micro-batches in flight (``final``: the last stage, else one that ends before the
        last layer): ``(first, last, i, j, shares, compute_f, compute_b, t_a)``.

        Longer stages stop once even a perfectly balanced split over the largest group
        would cost ``M X >= incumbent`` (compute only grows with ``last``), and once a
        group cannot hold them (memory only grows with ``last``). Times are computed with
        numpy over all ``last`` at once, with the same float operations as
        ``LayerSums.compute``, so they are bit-identical to ``evaluate``'s."""
        key = (first, i, flight, final)
        found = self._options.get(key)
        if found is not None:
            return found
        out: list[Any] = []
        candidates = [self.num_layers - 1] if final else [e for e in self.ends if e >= first]
        upper = min(self.n, i + self.mb)
        sums = self.sums
        lasts: list[int] = []
        for last in candidates:
            slope = (sums.fwd_slope[last + 1] - sums.fwd_slope[first]
                     + sums.bwd_slope[last + 1] - sums.bwd_slope[first])
            if self.m * slope * self.mb / self.speed_total[i][upper] >= self.incumbent:
                break
            lasts.append(last)
        if not lasts:
            self._options[key] = out
            return out
        parts = [stage_memory_parts(sums, first, last, flight, self.osf) for last in lasts]
        # memory_from_parts over all `last` at once (exact while bytes stay below 2**53)
        fixed_arr = np.array([p[0] for p in parts], dtype=np.float64)
        per_arr = np.array([p[1] for p in parts], dtype=np.float64)
        stop = np.asarray(lasts) + 1
        f_int = self.np_fi[stop] - self.np_fi[first]
        f_slope = self.np_fs[stop] - self.np_fs[first]
        b_int = self.np_bi[stop] - self.np_bi[first]
        b_slope = self.np_bs[stop] - self.np_bs[first]
        caps = self.caps
        for j in range(i + 1, upper + 1):
            free = self.base_shares[(i, j)]
            if free is None:
                continue
            group = range(i, j)
            free_id = self.iface(i, j, free)
            ok = np.ones(len(lasts), dtype=bool)
            for b, d in zip(free, group, strict=True):
                acts = per_arr * b
                ok &= fixed_arr + acts + np.ceil(acts * WORKSPACE_FRACTION) <= caps[d]
            fits = len(lasts) if ok.all() else int(np.argmin(ok))
            if fits:
                cf = np.full(fits, -math.inf)
                cb = np.full(fits, -math.inf)
                for b, d in zip(free, group, strict=True):
                    v = self.speeds[d]
                    cf = np.maximum(cf, (f_int[:fits] + f_slope[:fits] * b) / v)
                    cb = np.maximum(cb, (b_int[:fits] + b_slope[:fits] * b) / v)
                for k in range(fits):
                    last = lasts[k]
                    ta = (allreduce_from(j - i, sums.params(first, last), self.min_bw[i][j])
                          + sums.update_time(first, last, self.slowest[i][j]))
                    out.append((first, last, i, j, free, float(cf[k]), float(cb[k]), ta,
                                free_id))
            for k in range(fits, len(lasts)):
                last = lasts[k]
                shares = split_stage(sums, first, last, self.speeds[i:j], caps[i:j], self.mb,
                                     flight, self.osf, free)
                if shares is None:  # longer stages need even more memory
                    break
                cfs, cbs = sums.compute(first, last, shares, self.speeds[i:j])
                ta = (allreduce_from(j - i, sums.params(first, last), self.min_bw[i][j])
                      + sums.update_time(first, last, self.slowest[i][j]))
                out.append((first, last, i, j, shares, cfs, cbs, ta, self.iface(i, j, shares)))
        self._options[key] = out
        return out

    def closed(self, r: int, first: int, prev: int) -> list[Summary]:
        """Non-dominated summaries of suffixes from layer ``first`` whose first stage
        receives from ``prev`` and that have exactly ``r`` stages (``r < M``) or at least
        ``M`` stages (``r == M``): beyond ``M`` the in-flight count no longer changes, so
        those classes merge (see [Note: incumbent pruning] for the pruning)."""
        key = (r, first, prev)
        found = self._closed.get(key)
        if found is not None:
            return found
        m = self.m
        i = 0 if prev < 0 else self._ifaces[prev][1]
        out: list[Summary] = []
        inf = math.inf
        # every plan has a stage with X >= (remaining work) / (remaining speed)
        sums = self.sums
        work = (sums.fwd_slope[-1] - sums.fwd_slope[first]
                + sums.bwd_slope[-1] - sums.bwd_slope[first]) * self.mb
        inc = self.incumbent
        if (self.n - i >= r and self.num_layers - first >= r
                and m * work / self.speed_total[i][self.n] < inc):
            flight = min(m, r)
            kinds: list[tuple[bool, tuple[int, ...]]] = []
            if r == 1:
                kinds.append((True, ()))
            if r >= 2 or m == 1:
                kinds.append((False, (r - 1, r) if r == m and r > 1 else
                              (r,) if r == m else (r - 1,)))
            j_max = self.n - (r - 1)
            for final, tail_classes in kinds:
                for (l0, l1, si, sj, shares, cf, cb, ta, cur) in self.options(first, i, flight,
                                                                               final):
                    if sj > j_max or m * (cf + cb) >= inc:
                        continue
                    c = self.comm(prev, cur, l0)
                    f = cf + c
                    b = cb + c
                    x = f + b
                    if m * x >= inc:
                        continue
                    stage = (l0, l1, si, sj, shares)
                    if final:
                        rr = m * x + ta
                        if rr >= inc:
                            out.append((inf, x, inf, ta, x, stage, None))
                        else:
                            out.append((rr, x, 0.0, ta, x, stage, None))
                        continue
                    for tail_class in tail_classes:
                        # the drain term if this stage becomes dominant: [Note: DP cells]
                        hidden = (min(m, tail_class + 1) - 1) * (f if f < b else b)
                        for t in self.closed(tail_class, l1 + 1, cur):
                            r_t, xm_t, pre_t, g_t, sx_t = t[0], t[1], t[2], t[3], t[4]
                            if m * xm_t >= inc:
                                continue
                            gb = g_t - b
                            g = gb if gb > ta else ta
                            sx = x + sx_t
                            if xm_t >= x:
                                rr = f + r_t
                                v = m * xm_t + x + pre_t + ta
                                if v > rr:
                                    rr = v
                                if rr >= inc:
                                    out.append((inf, xm_t, inf, g, sx, stage, t))
                                else:
                                    out.append((rr, xm_t, x + pre_t, g, sx, stage, t))
                            else:
                                drain = sx_t - hidden if sx_t > hidden else 0.0
                                v = ta + drain
                                rr = m * x + (v if v > gb else gb)
                                if rr >= inc:
                                    out.append((inf, x, inf, g, sx, stage, t))
                                else:
                                    out.append((rr, x, drain, g, sx, stage, t))
        front = _pareto(out, self.max_front, 1.0 + (min(m, r + 1) - 1) * self.rho)
        self.max_front_seen = max(self.max_front_seen, len(front))
        self._closed[key] = front
        return front

    def best(self) -> tuple[float, Summary | None]:
        """The best complete plan of this micro-batch size below the incumbent."""
        best: tuple[float, Summary | None] = (math.inf, None)
        for r in range(1, min(self.n, self.num_layers, self.m) + 1):
            front = self.closed(r, 0, -1)
            if front and front[0][0] < best[0]:
                best = (front[0][0], front[0])
                self.incumbent = min(self.incumbent, best[0])
        return best

    def to_stages(self, summary: Summary) -> tuple[Stage, ...]:
        stages = []
        node: Any = summary
        while node is not None:
            first, last, i, j, shares = node[5]
            stages.append(Stage((first, last), tuple(self.names[i:j]), shares))
            node = node[6]
        return tuple(stages)


def asteroid_dp(costs: CostTable, cluster: Cluster, batch_size: int, *,
                optimizer_state_factor: float = 0.0,
                micro_batch_sizes: Sequence[int] | None = None,
                max_cuts: int | None = DEFAULT_MAX_CUTS,
                max_front: int | None = None,
                device_order: Sequence[str] | None = None,
                incumbent: float = math.inf) -> DPResult:
    """Run Algorithm 2 and return the best plan of the DP's space (see the module notes).

    Args:
        costs, cluster, batch_size: the problem.
        optimizer_state_factor: optimizer state in units of the weights (memory model).
        micro_batch_sizes: micro-batch sizes to try (default: every divisor of the batch).
        max_cuts: at most this many candidate cut positions (None: all; see Note).
        max_front: cap on the Pareto front per cell (None: exact).
        device_order: the device order whose slices stages take (default: by capability,
            ``sorted_devices``); devices left out are not used.
        incumbent: a round time already achieved elsewhere; only better plans are
            returned (``plan`` is None when there is none).

    Returns:
        A ``DPResult``; ``plan`` is None when no plan of the space fits in memory (or
        none beats ``incumbent``, whose value ``round_time_s`` then keeps).
    """
    start = time.perf_counter()
    mbs = micro_batch_choices(batch_size, micro_batch_sizes)
    if device_order is None:
        devices = sorted_devices(cluster, costs.host_flops)
    else:
        devices = [cluster.device(name) for name in device_order]
        if len(set(device_order)) != len(devices):
            raise PlanError(f"device_order repeats a device: {list(device_order)}")
    speed_of = cluster.speeds(costs.host_flops)
    speeds = [speed_of[d.name] for d in devices]
    sums = LayerSums.of(costs)
    ends = candidate_cuts(costs, max_cuts)
    best_value = incumbent
    best_plan: Plan | None = None
    cells = 0
    biggest = 0
    # [Note: incumbent pruning] a coarse pass (a subset of the cuts) gives an incumbent;
    # the full pass then drops what provably cannot beat it
    passes: list[list[int]] = []
    if len(ends) > 2 * _COARSE_CUTS:
        passes.append(ends[::len(ends) // _COARSE_CUTS])
    passes.append(ends)
    order = list(mbs)
    for pass_ends in passes:
        found: dict[int, float] = {}
        for mb in order:
            m = batch_size // mb
            search = _Search(costs, cluster, devices, speeds, sums, pass_ends, mb, m,
                             optimizer_state_factor, max_front, best_value)
            value, summary = search.best()
            found[mb] = value
            cells += len(search._closed)
            biggest = max(biggest, search.max_front_seen)
            log.debug("micro-batch %d, %d cuts: round %.6g s, %d cells", mb, len(pass_ends),
                      value, len(search._closed))
            if summary is not None and value < best_value:
                best_value = value
                best_plan = Plan(
                    model_hash=costs.model_hash, cluster_hash=cluster.cluster_hash,
                    batch_size=batch_size, micro_batch_size=mb, num_micro_batches=m,
                    stages=search.to_stages(summary), num_layers=costs.num_layers,
                    model_name=costs.model_name, optimizer_state_factor=optimizer_state_factor,
                    planner=PlannerInfo("asteroid", DP_VERSION))
        # the next pass starts with the most promising micro-batch sizes
        order.sort(key=lambda b: found[b])
    elapsed = time.perf_counter() - start
    if best_plan is not None:
        best_plan = replace(best_plan, planner=PlannerInfo("asteroid", DP_VERSION, elapsed))
    return DPResult(plan=best_plan, round_time_s=best_value, search_time_s=elapsed,
                    cells=cells, max_front=biggest, candidate_cuts=len(ends))


def no_fit_error(costs: CostTable, cluster: Cluster, batch_size: int,
                 optimizer_state_factor: float = 0.0, planner: str = "asteroid") -> PlanError:
    """A ``PlanError`` naming the device closest to fitting and the bytes it lacks.

    The diagnosis uses the most memory-friendly plan shape: micro-batches of one sample,
    one device per stage on every device, layers split to balance memory per capacity.
    """
    devices = sorted(cluster.devices, key=lambda d: -d.memory_bytes)
    sums = LayerSums.of(costs)
    n_layers = costs.num_layers
    k = min(len(devices), n_layers)
    need = [sums.params(i, i) * (2 + optimizer_state_factor) + sums.activations(i, i) * k
            for i in range(n_layers)]
    total_need = sum(need)
    total_cap = sum(d.memory_bytes for d in devices[:k])
    # greedy contiguous split: fill each device up to its fraction of the total
    stages = []
    first = 0
    acc = 0.0
    for s, device in enumerate(devices[:k]):
        target = total_need * sum(d.memory_bytes for d in devices[:s + 1]) / total_cap
        last = first
        acc += need[first]
        while last + 1 < n_layers - (k - s - 1) and acc + need[last + 1] <= target:
            last += 1
            acc += need[last]
        if s == k - 1:
            last = n_layers - 1
        stages.append(Stage((first, last), (device.name,), (1,)))
        first = last + 1
    plan = Plan(model_hash=costs.model_hash, cluster_hash=cluster.cluster_hash,
                batch_size=batch_size, micro_batch_size=1, num_micro_batches=batch_size,
                stages=tuple(stages), optimizer_state_factor=optimizer_state_factor)
    shortfall = evaluate(plan, costs, cluster).memory_shortfall()
    if shortfall:
        name, short = min(shortfall.items(), key=lambda kv: kv[1])
        where = (f"device {name!r} is {short} bytes ({short / 2**20:.1f} MiB) short even "
                 f"with micro-batches of one sample and one device per stage")
    else:
        where = "every device would fit only with a plan shape outside this planner's space"
    return PlanError(
        f"no plan of planner {planner!r} fits in memory for batch size {batch_size}: {where}; "
        f"the model needs about {total_need / 2**20:.1f} MiB of weights, gradients, optimizer "
        f"state and activations against {total_cap / 2**20:.1f} MiB on the cluster. Use a "
        f"smaller batch or micro-batch size, a lighter optimizer, or add devices with more "
        f"memory")
