"""Algorithm 2, the Asteroid planner: an exact Pareto-front DP over stages, groups and shares.

[Note: the DP's space]
Devices are sorted by capability (speed descending, then memory descending, then
name; the capability speeds of ``solver.timing``, see [Note: cost columns in the DP]).
A plan is a sequence of stages; stage ``s`` takes a contiguous run of layers and a
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
latency ``I`` (from first passes over subsets of the cuts, then from every finished
micro-batch size), a summary with ``M Xm >= I`` is dropped, and one with ``R >= I`` is
kept only as a "ghost" (``R = Pre = inf``): it can still matter if a stage with a larger
``X`` is prepended, which makes ``R`` depend on ``G`` and ``SumX`` alone. A stage whose layers need
``M * work * b / (sum of its group's speeds) >= I`` even when perfectly balanced, and a
cell whose remaining layers need that on all remaining devices together, are skipped
too (some stage carries at least the average load). All these rules are exact, and they
hold with or without a cap on the fronts: what they remove would be dropped anyway.

[Note: candidate windows]
A stage ``first..last`` on devices ``i..j-1`` is only worth combining with a tail that
can itself stay below the incumbent, i.e. ``M * work_i(last + 1..) / (speed of devices
j..) < I`` (``work_i``: slopes times the micro-batch plus the intercepts; a group's
``X * (sum of its speeds) >= intercepts + slopes * b`` by averaging its devices' times
weighted by speed). That rules out the short stages, and the stage's own ``M X < I``
rules out the long ones, so per group the usable ``last`` form a window: ``options``
keeps, per group, the ``last`` from where the tail fits, and ``closed`` bisects the
window for the current interface (``X`` grows with ``last``: the float operations are
monotone). Tails ruled out this way would have had every summary dropped by ``M Xm >=
I`` (a relative slack of ``1e-9`` covers float rounding), so the fronts do not change.

[Note: exact bounds]
Without a cap on the fronts (``max_front=None``) the DP also drops what provably cannot
lead to a plan below ``I`` given the layers before the cell: they run on the devices
before it, so the stages there have ``sum F >= head_f / V`` and ``sum X >= head_x / V``
and the largest ``X >= head_x / V`` (``head_*``: the forward / both times of layers
``< first`` with intercepts, ``V``: the speed of the devices before the cell). With ``d``
the dominant stage of the whole plan and ``w <= min(M, stages)`` (at most ``i + r``
stages), the round is at least ``T_e`` of the first stage, ``M X_d + sum_{s<d} X_s + D``
with ``D >= (sum of X after d) - (w - 1) X_d / 2``, so

* every plan: ``round >= (M - 1 - (w - 1) / 2) X_d + sum_all X``: a summary, a stage
  with the average of its tail, or a whole cell whose bound reaches ``I`` is dropped;
* the dominant in the suffix (``R`` and ``Pre`` stay meaningful): ``round >= R + sum F``
  of the layers before, and ``round >= M Xm + Pre + sum X`` of them; a summary reaching
  ``I`` in either becomes a ghost;
* the dominant before the suffix (what a ghost waits for): ``round >= (M - (w - 1) / 2)
  X_d + SumX`` with ``X_d > Xm``; a ghost reaching ``I`` is dropped.

A summary that one of these rules removes or turns into a ghost dominates only summaries
the same rule removes or turns into ghosts (the bounds grow with ``R``, ``Xm``, ``Pre``
and ``SumX``; ghosts compare on ``Xm``, ``G`` and ``SumX``, which is all that matters once
a larger stage is prepended), so no summary that can still lead to a better plan loses
its dominator, and the optimum is unchanged. The bounds compare against ``I (1 + 1e-12)``
to stay clear of float rounding. With a cap they are not used: a capped front keeps its
first ``max_front`` summaries, so removing hopeless ones would let others in and change
the (heuristic) result.

[Note: proofs for capped fronts]
With a cap, a micro-batch size whose search cannot beat the incumbent returns nothing,
whatever the cap. So for a micro-batch size that looked hopeless in the previous pass, a
search without cap (with the bounds above) runs first; when it proves that no plan of
this size beats the incumbent, the capped search is skipped. The result is the same;
the proof is much cheaper because it prunes harder.

[Note: cost of the search]
Every speed-up here keeps the floats bit for bit and the order of equal summaries, so a
capped search returns the same plan as the plain implementation and an uncapped one the
same optimum (``tests/test_dp.py`` keeps that implementation as a reference; the extra
passes can only pick another plan of equal round time). Cells with many
candidate summaries are combined with numpy (``_combine_np``: the same float operations
element by element, a stable ``lexsort`` and a blocked dominance scan, ``_pareto_np``,
exact because dominance is transitive); small ones in plain Python, where ghosts are
sorted and scanned only if the finite summaries leave room under the cap. Stage options
are built once per (first layer, first device) and shared by all in-flight counts, with
numpy only for long candidate lists (``_base`` / ``_base_py``). Group compute times take
the maximum over the devices that can decide it (``_deciders``), memory checks over the
devices that can bind first; both drop only devices whose value is provably never larger.
The searches of one ``asteroid_dp`` call share prefix arrays, bound tables, interfaces and
re-sharding times (``_Context``).

[Note: cost columns in the DP]
A device whose type has a column in the cost table takes the column's times as measured
([Note: cost columns] in ``solver.timing``), so a group's devices no longer share one
time function scaled by speed. The DP keeps every rule above exact as follows:

* order and shares use the capability speed (a column device: its whole-model ratio of
  base to column work), which does not depend on the stage, so ``base_shares`` stay
  per group and micro-batch;
* stage times are taken per device from its time source (the base or its column) and
  divisor (speed, or 1 for a column), in the same float operations as ``evaluate``;
  ``_deciders`` compares devices only within one time source (``_source_deciders``);
  ``T_a``'s optimizer step is the maximum over the group's sources of ``params *
  update_per_byte / (smallest divisor)`` (``Timing.update_pairs``);
* every bound that divides base work by a sum of speeds (``work``, ``work_i``,
  ``head_*``: cell and stage cut-offs, candidate windows, exact bounds) divides by the
  *bound speeds* ``u_d`` instead (``_Context.speed_total``): no stage is faster on ``d``
  than the base times over ``u_d`` (the largest base / column ratio of any layer's
  intercept or slope), so a group's ``X * sum(u) >= intercepts + slopes * b`` still
  holds and the bounds stay lower bounds;
* ``hiding_ratio`` takes the forward / backward ratios of every time source the
  cluster uses (the group maximum of forward and of backward may come from different
  devices, each within the smallest and largest ratio of its own source).

Without columns the bound speeds are the speeds, there is one time source, and every
number, the order of equal summaries and the time taken are those of before
(``tests/test_dp.py`` keeps the reference implementation and checks DP = brute force
with and without columns).

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
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, replace
from operator import itemgetter
from typing import Any

import numpy as np

from asteroid_fx.errors import PlanError
from cost_models.table import CostTable, TimeFit
from solver.cluster import Cluster, Device
from solver.evaluate import (
    WORKSPACE_BYTES,
    WORKSPACE_FRACTION,
    LayerSums,
    drain_term,
    evaluate,
    transfer_time,
)
from solver.plan import Plan, PlannerInfo, Stage
from solver.split import split_shares, split_stage
from solver.timing import Timing

__all__ = ["DP_VERSION", "DEFAULT_MAX_CUTS", "DPResult", "PipelineSummary", "asteroid_dp",
           "sorted_devices", "candidate_cuts", "micro_batch_choices", "no_fit_error",
           "prepend", "dominates", "hiding_ratio"]

log = logging.getLogger(__name__)

DP_VERSION = "1"
DEFAULT_MAX_CUTS = 96
_COARSE_CUTS = 12
_REFINE_MBS = 1

# A group of stage options: (j, shares, iface, lasts, compute_f, compute_b, t_a).
_Group = tuple[int, tuple[int, ...], int, list[int], list[float], list[float], list[float]]

# The flight-independent part of a group: (j, shares, iface, lasts, compute_f, compute_b,
# t_a, keep, fixed bytes, activation bytes per sample), lists over ``lasts``.
_Base = tuple[int, tuple[int, ...], int, list[int], list[float], list[float], list[float],
              int, list[float], list[float]]

# The cut-offs of a cell ([Note: exact bounds]): (ghost when R >= this, ghost when M Xm +
# Pre >= this, drop a ghost when (M - (w-1)/2) max(Xm, head) + SumX >= this, drop any
# summary when (M - 1 - (w-1)/2) max(Xm, head) + SumX >= this, head, M - (w-1)/2,
# M - 1 - (w-1)/2); with a cap only the first is finite.
_Bounds = tuple[float, float, float, float, float, float, float]

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


def sorted_devices(cluster: Cluster, costs: CostTable | float) -> list[Device]:
    """Devices by capability: speed descending, then memory descending, then name.

    ``costs`` is the cost table (capability speeds of ``solver.timing.Timing``: a device
    with a column has its whole-model ratio) or a host's FLOP/s (the declared speeds).
    """
    if isinstance(costs, CostTable):
        speeds = Timing.of(costs, cluster).speeds
    else:
        speeds = cluster.speeds(costs)
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


def hiding_ratio(costs: CostTable, cluster: Cluster | None = None) -> float:
    """A ``rho`` with ``min(E_f, E_b) >= rho (E_f + E_b)`` for every stage of any plan.

    Each device's forward / backward time ratio lies between the smallest and the
    largest ratio of the layers' fitted intercepts and slopes (a ratio of sums lies
    between the ratios of the terms), and so does ``compute_f / compute_b`` (the device
    with the largest backward has a forward of at least the smallest ratio times it);
    re-sharding time adds the same to both, which moves the share of the smaller one
    towards 1/2. With ``cluster``, the layers of every time source its devices use
    count (the base times and the columns of their types, [Note: cost columns]).
    """
    fits: list[tuple[TimeFit, TimeFit]] = []
    if cluster is None:
        fits = [(lc.fwd, lc.bwd) for lc in costs.layers]
    else:
        base_used = False
        seen: set[str] = set()
        for device in cluster.devices:
            col = costs.column(device.type)
            if col is None:
                base_used = True
            elif device.type not in seen:
                seen.add(device.type)
                fits.extend(zip(col.fwd, col.bwd, strict=True))
        if base_used:
            fits = [(lc.fwd, lc.bwd) for lc in costs.layers] + fits
    low, high = math.inf, 0.0
    for fwd, bwd in fits:
        for f, b in ((fwd.intercept_s, bwd.intercept_s),
                     (fwd.per_sample_s, bwd.per_sample_s)):
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


def _deciders(pairs: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The ``(share, speed)`` pairs whose ``(intercept + slope * share) / speed`` can be the
    group maximum: drop a pair with at most the share and at least the speed of another
    (ties: keep one)."""
    kept: list[tuple[int, float]] = []
    for k, (b, v) in enumerate(pairs):
        if any(b2 >= b and v2 <= v and ((b2, -v2) != (b, -v) or k2 < k)
               for k2, (b2, v2) in enumerate(pairs) if k2 != k):
            continue
        kept.append((b, v))
    return kept


def _source_deciders(triples: list[tuple[int, float, int]]) -> list[tuple[int, float, int]]:
    """``_deciders`` for ``(share, divisor, time source)``: only devices of one source
    share a time function, so each source keeps its own deciders ([Note: cost columns])."""
    sources = sorted({src for _, _, src in triples})
    out: list[tuple[int, float, int]] = []
    for src in sources:
        out.extend((b, v, src) for b, v in _deciders([(b, v) for b, v, k in triples
                                                       if k == src]))
    return out


_KEY = itemgetter(0, 1, 2, 3, 4)

_NUMPY_ITEMS = 400
"""Cells with at least this many candidate summaries are combined with numpy."""

_NUMPY_LASTS = 16
"""``_base`` uses numpy for more candidate ``last`` layers than this."""

_BLOCK = 64
"""Rows per block of ``_pareto_np``."""


def _dominated(k_xm: Any, k_pre: Any, k_g: Any, k_sx: Any, xm: Any, pre: Any, g: Any,
               sx: Any, h: float) -> Any:
    """Entry ``[p, q]``: does row ``p`` of the first four arrays dominate row ``q`` of the
    last four (the rule of ``_pareto``, ``R`` order assumed)?"""
    return ((k_xm[:, None] <= xm[None, :]) & (k_pre[:, None] <= pre[None, :])
            & (k_g[:, None] <= g[None, :]) & (k_sx[:, None] <= sx[None, :])
            & ((k_xm[:, None] == xm[None, :])
               | (k_sx[:, None] - pre[None, :] <= h * k_xm[:, None])))


def _pareto_np(table: Any, cap: int | None, h: float) -> list[int]:
    """``_pareto`` on rows ``(R, Xm, Pre, G, SumX)`` already in sorted order: the indices
    of the rows kept.

    The dominance relation of ``_pareto`` is transitive (for a fixed ``h``), so a row is
    dominated by an earlier kept row exactly when it is dominated by any earlier row;
    each block of rows is checked against the earlier rows of the block and against the
    rows kept before it (in chunks, dropping the rows already found dominated)."""
    n = len(table)
    kept: list[int] = []
    k_xm, k_pre, k_g, k_sx = (np.empty(0) for _ in range(4))
    for start in range(0, n, _BLOCK):
        blk = table[start:start + _BLOCK]
        xm, pre, g, sx = blk[:, 1], blk[:, 2], blk[:, 3], blk[:, 4]
        alive = ~np.triu(_dominated(xm, pre, g, sx, xm, pre, g, sx, h), 1).any(axis=0)
        for c0 in range(0, len(k_xm), _BLOCK):
            idx = np.flatnonzero(alive)
            if not len(idx):
                break
            c1 = c0 + _BLOCK
            hit = _dominated(k_xm[c0:c1], k_pre[c0:c1], k_g[c0:c1], k_sx[c0:c1],
                             xm[idx], pre[idx], g[idx], sx[idx], h).any(axis=0)
            alive[idx[hit]] = False
        new = np.flatnonzero(alive)
        if len(new):
            kept.extend((new + start).tolist())
            if cap is not None and len(kept) >= cap:
                return kept[:cap]
            k_xm = np.concatenate([k_xm, xm[new]])
            k_pre = np.concatenate([k_pre, pre[new]])
            k_g = np.concatenate([k_g, g[new]])
            k_sx = np.concatenate([k_sx, sx[new]])
    return kept


def _pareto(items: list[Summary], cap: int | None, h: float,
            ghosts: list[Summary] | None = None) -> list[Summary]:
    """The summaries no other one dominates (``h``: see [Note: why a Pareto front]), in
    sorted order, at most ``cap`` of them.

    ``ghosts`` (``R = inf``, optional) sort after all of ``items`` (finite ``R``); they
    are only sorted and scanned when ``items`` leave room under the cap."""
    items.sort(key=_KEY)
    kept = _scan(items, [], cap, h)
    if ghosts and (cap is None or len(kept) < cap):
        ghosts.sort(key=_KEY)
        kept = _scan(ghosts, kept, cap, h)
    return kept


def _scan(items: list[Summary], kept: list[Summary], cap: int | None,
          h: float) -> list[Summary]:
    """``_pareto``'s scan of sorted ``items`` after the summaries ``kept`` so far."""
    if cap is not None and len(kept) >= cap:
        return kept
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


class _Context:
    """What the searches of one ``asteroid_dp`` call share: prefix sums as arrays, speed
    and bandwidth tables, interned interfaces and their re-sharding times, and per
    micro-batch size the bound tables and Algorithm-1 shares."""

    def __init__(self, costs: CostTable, cluster: Cluster, devices: list[Device],
                 speeds: list[float], sums: LayerSums) -> None:
        self.costs, self.cluster, self.sums = costs, cluster, sums
        self.names = [d.name for d in devices]
        self.speeds = speeds
        self.caps = [d.memory_bytes for d in devices]
        n = self.n = len(devices)
        # [Note: cost columns in the DP]: per device its time source and divisor; the
        # bounds divide base work by the bound speeds (equal to the speeds without columns)
        timing = self.timing = Timing.of(costs, cluster)
        per = [timing.device(name) for name in self.names]
        self.srcs = [t.source for t in per]
        self.divs = [t.divisor for t in per]
        bounds = [t.bound_speed for t in per]
        self.np_src = [tuple(np.asarray(values, dtype=np.float64)
                             for values in (src.fwd_intercept, src.fwd_slope,
                                            src.bwd_intercept, src.bwd_slope))
                       for src in timing.sources]
        self.np_fi, self.np_fs, self.np_bi, self.np_bs = self.np_src[0]
        self.np_params = np.asarray(sums.param_bytes, dtype=np.int64)
        self.np_buffers = np.asarray(sums.buffer_bytes, dtype=np.int64)
        self.np_acts = np.asarray(sums.activation_bytes, dtype=np.int64)
        self.np_edges = np.asarray(sums.boundary_bytes or [0] * len(sums.activation_bytes),
                                   dtype=np.int64)   # LayerSums.in_flight_bytes
        self.np_layer_params = np.diff(self.np_params)   # LayerSums.largest_params
        self.speed_total = [[sum(bounds[a:b]) for b in range(n + 1)] for a in range(n)]
        # the optimizer step of group a..b-1: max over (update_per_byte, divisor) pairs;
        # the time sources of devices a..b-1
        self.update_pairs = [[timing.update_pairs(self.names[a:b]) for b in range(n + 1)]
                             for a in range(n)]
        self.group_srcs = [[sorted(set(self.srcs[a:b])) for b in range(n + 1)]
                           for a in range(n)]
        self.min_bw = [[0.0] * (n + 1) for _ in range(n)]
        self.max_lat = [[0.0] * (n + 1) for _ in range(n)]    # as allreduce_time's
        for a in range(n):
            low, high = math.inf, 0.0
            for b in range(a + 1, n):
                for c in range(a, b):
                    low = min(low, cluster.bandwidth_bytes_s(self.names[c], self.names[b]))
                    high = max(high, cluster.latency_s(self.names[c], self.names[b]))
                self.min_bw[a][b + 1] = low
                self.max_lat[a][b + 1] = high
        self.rho = hiding_ratio(costs, cluster)
        # interfaces (i, j, shares) as small integers; -1 = before the first stage
        self.iface_ids: dict[tuple[int, int, tuple[int, ...]], int] = {}
        self.ifaces: list[tuple[int, int, tuple[int, ...]]] = []
        self.comm: dict[tuple[int, int, int], float] = {}
        self._per_mb: dict[int, tuple[Any, ...]] = {}

    def for_micro_batch(self, mb: int) -> tuple[Any, ...]:
        """``(work, work_i, head_f, head_x, base_shares, compute_devices,
        memory_devices)`` for micro-batches of ``mb`` samples (see ``_Search``)."""
        found = self._per_mb.get(mb)
        if found is not None:
            return found
        sums, n, speeds, caps = self.sums, self.n, self.speeds, self.caps
        layers = range(sums.num_layers + 1)
        # compute of layers l.. for one micro-batch at speed 1, per sample (``work``, as
        # the cell bound has always used it) and with the intercepts (``work_i``, for the
        # bounds of [Note: exact bounds]); ``head_f`` / ``head_x``: the same of layers < l,
        # forward only / forward and backward, with the intercepts
        work = [(sums.fwd_slope[-1] - sums.fwd_slope[first]
                 + sums.bwd_slope[-1] - sums.bwd_slope[first]) * mb for first in layers]
        work_i = [work[first] + (sums.fwd_intercept[-1] - sums.fwd_intercept[first]
                                 + sums.bwd_intercept[-1] - sums.bwd_intercept[first])
                  for first in layers]
        head_f = [sums.fwd_intercept[first] + sums.fwd_slope[first] * mb for first in layers]
        head_x = [head_f[first] + sums.bwd_intercept[first] + sums.bwd_slope[first] * mb
                  for first in layers]
        base_shares = {(i, j): split_shares(mb, speeds[i:j])
                       for i in range(n) for j in range(i + 1, min(n, i + mb) + 1)}
        # the devices that decide a group's compute time and memory fit: a device with at
        # most the share of another and at least its speed (memory) never decides (the
        # float operations are monotone, so dropping it changes no bit)
        compute_devices: dict[tuple[int, int], list[tuple[int, float, int]]] = {}
        memory_devices: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for (a, b), shares in base_shares.items():
            if shares is None:
                continue
            members = list(zip(shares, range(a, b), strict=True))
            compute_devices[(a, b)] = _source_deciders(
                [(share, self.divs[d], self.srcs[d]) for share, d in members])
            memory_devices[(a, b)] = [
                (share, d) for share, d in members
                if not any((s2 >= share and caps[d2] <= caps[d])
                           and (s2, -caps[d2], d2) > (share, -caps[d], d)
                           for s2, d2 in members)]
        found = self._per_mb[mb] = (work, work_i, head_f, head_x, base_shares,
                                    compute_devices, memory_devices)
        return found


class _Search:
    """The DP for one micro-batch size (see the module notes)."""

    def __init__(self, costs: CostTable, cluster: Cluster, devices: list[Device],
                 speeds: list[float], sums: LayerSums, ends: list[int], micro_batch: int,
                 num_micro: int, osf: float, max_front: int | None,
                 incumbent: float = math.inf, context: _Context | None = None) -> None:
        ctx = context if context is not None else _Context(costs, cluster, devices, speeds,
                                                             sums)
        self.costs, self.cluster, self.devices = costs, cluster, devices
        self.names = ctx.names
        self.speeds, self.sums, self.osf = speeds, sums, osf
        self.mb, self.m = micro_batch, num_micro
        self.caps = ctx.caps
        self.n = ctx.n
        self.np_fi, self.np_fs, self.np_bi, self.np_bs = ctx.np_fi, ctx.np_fs, ctx.np_bi, ctx.np_bs
        self.np_params, self.np_buffers, self.np_acts = (ctx.np_params, ctx.np_buffers,
                                                         ctx.np_acts)
        self.np_edges, self.np_layer_params = ctx.np_edges, ctx.np_layer_params
        (self.work, self.work_i, self.head_f, self.head_x, self.base_shares,
         self.compute_devices, self.memory_devices) = ctx.for_micro_batch(micro_batch)
        self.speed_total = ctx.speed_total
        self.timing, self.srcs, self.np_src = ctx.timing, ctx.srcs, ctx.np_src
        self.update_pairs, self.group_srcs = ctx.update_pairs, ctx.group_srcs
        self.min_bw = ctx.min_bw
        self.max_lat = ctx.max_lat
        self.num_layers = costs.num_layers
        self.ends = ends  # candidate last layers of a non-final stage
        self.max_front = max_front
        self._comm = ctx.comm
        self._options: dict[tuple[int, int, int, bool], list[_Group]] = {}
        self._bases: dict[tuple[int, int, bool], list[_Base]] = {}
        self._closed: dict[tuple[int, int, int], list[Summary]] = {}
        self._kind_cache: dict[int, tuple[int, list[tuple[bool, int, list[tuple[int, int]]]]]] = {}
        # fronts as float arrays, by id() of the (cached, hence alive) front list
        self._arrays: dict[int, Any] = {}
        self._iface_ids = ctx.iface_ids
        self._ifaces = ctx.ifaces
        self.max_front_seen = 0
        self.incumbent = incumbent
        self.rho = ctx.rho

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
    def _base(self, first: int, i: int, final: bool) -> list[_Base]:
        """The flight-independent part of ``options``: per group ``i..j-1`` with the
        speed-proportional shares, the candidate ``last`` layers and their compute times.

        Candidates stop once even a perfectly balanced split over the largest group would
        cost ``M X >= incumbent`` (compute only grows with ``last``); for a non-final stage
        they start where the layers left after it fit the devices after it ([Note:
        candidate windows]). Times are computed with numpy over all ``last`` at once, with
        the same float operations as ``LayerSums.compute`` and ``allreduce_from``, so they
        are bit-identical to ``evaluate``'s."""
        key = (first, i, final)
        found = self._bases.get(key)
        if found is not None:
            return found
        out: list[_Base] = []
        self._bases[key] = out
        candidates = [self.num_layers - 1] if final else [e for e in self.ends if e >= first]
        upper = min(self.n, i + self.mb)
        sums = self.sums
        m, inc = self.m, self.incumbent
        inc_hi = inc * (1.0 + 1e-9)
        lasts: list[int] = []
        for last in candidates:
            slope = (sums.fwd_slope[last + 1] - sums.fwd_slope[first]
                     + sums.bwd_slope[last + 1] - sums.bwd_slope[first])
            if m * slope * self.mb / self.speed_total[i][upper] >= inc:
                break
            inter = (sums.fwd_intercept[last + 1] - sums.fwd_intercept[first]
                     + sums.bwd_intercept[last + 1] - sums.bwd_intercept[first])
            if m * (inter + slope * self.mb) / self.speed_total[i][upper] >= inc_hi:
                break
            lasts.append(last)
        if not lasts:
            return out
        work = self.work_i
        tail_limit = inc_hi / m
        if len(lasts) <= _NUMPY_LASTS:
            return self._base_py(first, i, final, lasts, upper, out)
        stop = np.asarray(lasts) + 1
        # per time source: (fwd intercepts, fwd slopes, bwd intercepts, bwd slopes) of the
        # stages first..last (one source without columns)
        terms = {src: tuple(a[stop] - a[first] for a in self.np_src[src])
                 for src in self.group_srcs[i][upper]}
        params = self.np_params[stop] - self.np_params[first]
        params_f = params.astype(np.float64)
        positive = params > 0
        # stage_memory_parts over all `last` at once (exact while bytes stay below 2**53)
        largest = np.maximum.accumulate(self.np_layer_params[first:])[stop - 1 - first]
        fixed = (np.ceil(params * (2.0 + self.osf))
                 + (self.np_buffers[stop] - self.np_buffers[first]) + WORKSPACE_BYTES
                 + largest).tolist()
        acts = (self.np_acts[stop] - self.np_acts[first] + self.np_edges[first]
                + self.np_edges[stop]).astype(np.float64).tolist()
        for j in range(i + 1, upper + 1):
            free = self.base_shares[(i, j)]
            if free is None:
                continue
            lo = 0
            if not final:
                if j >= self.n:
                    continue
                speed_rest = self.speed_total[j][self.n]
                while lo < len(lasts) and work[lasts[lo] + 1] / speed_rest >= tail_limit:
                    lo += 1
                if lo == len(lasts):
                    continue
            deciders = self.compute_devices[(i, j)]
            b, v, src = deciders[0]
            f_int, f_slope, b_int, b_slope = terms[src]
            cf = (f_int[lo:] + f_slope[lo:] * b) / v
            cb = (b_int[lo:] + b_slope[lo:] * b) / v
            for b, v, src in deciders[1:]:
                f_int, f_slope, b_int, b_slope = terms[src]
                cf = np.maximum(cf, (f_int[lo:] + f_slope[lo:] * b) / v)
                cb = np.maximum(cb, (b_int[lo:] + b_slope[lo:] * b) / v)
            # T_a: all-reduce (allreduce_from) plus the optimizer step on the slowest
            # device (Timing.group_update_time), in the same float operations
            size = j - i
            if size > 1:
                reduce = np.where(positive[lo:], 2.0 * (size - 1) * params_f[lo:]
                                  / (size * self.min_bw[i][j])
                                  + 2.0 * (size - 1) * self.max_lat[i][j], 0.0)
            else:
                reduce = np.zeros(len(lasts) - lo)
            pairs = self.update_pairs[i][j]
            upb, div = pairs[0]
            step = params[lo:] * upb / div
            for upb, div in pairs[1:]:
                step = np.maximum(step, params[lo:] * upb / div)
            ta = (reduce + step).tolist()
            # compute grows with `last`: stages past `keep` cost M X >= incumbent
            keep = int(np.count_nonzero(m * (cf + cb) < inc))
            out.append((j, free, self.iface(i, j, free), lasts[lo:], cf.tolist(), cb.tolist(),
                        ta, keep, fixed[lo:], acts[lo:]))
        return out

    def _base_py(self, first: int, i: int, final: bool, lasts: list[int], upper: int,
                 out: list[_Base]) -> list[_Base]:
        """``_base`` for a few ``last`` in plain Python: the same float operations as the
        numpy path (and as ``LayerSums``, ``allreduce_from``, ``stage_memory_parts``)."""
        sums = self.sums
        m, inc = self.m, self.incumbent
        pb, bb = sums.param_bytes, sums.buffer_bytes
        factor = 2.0 + self.osf
        params = [pb[last + 1] - pb[first] for last in lasts]
        fixed = [float(math.ceil(p * factor) + (bb[last + 1] - bb[first]) + WORKSPACE_BYTES
                       + sums.largest_params(first, last))
                 for p, last in zip(params, lasts, strict=True)]
        acts = [float(sums.in_flight_bytes(first, last)) for last in lasts]
        # per time source, per `last`: (fwd intercept, fwd slope, bwd intercept, bwd slope)
        sources = self.timing.sources
        terms: dict[int, list[tuple[float, float, float, float]]] = {}
        for src in self.group_srcs[i][upper]:
            t = sources[src]
            fi, fs, bi, bs = t.fwd_intercept, t.fwd_slope, t.bwd_intercept, t.bwd_slope
            terms[src] = [(fi[last + 1] - fi[first], fs[last + 1] - fs[first],
                           bi[last + 1] - bi[first], bs[last + 1] - bs[first])
                          for last in lasts]
        single = terms[self.srcs[i]] if len(terms) == 1 else None
        work = self.work_i
        tail_limit = inc * (1.0 + 1e-9) / m
        for j in range(i + 1, upper + 1):
            free = self.base_shares[(i, j)]
            if free is None:
                continue
            lo = 0
            if not final:
                if j >= self.n:
                    continue
                speed_rest = self.speed_total[j][self.n]
                while lo < len(lasts) and work[lasts[lo] + 1] / speed_rest >= tail_limit:
                    lo += 1
                if lo == len(lasts):
                    continue
            deciders = self.compute_devices[(i, j)]
            cf: list[float] = []
            cb: list[float] = []
            if single is not None:
                for f_int, f_slope, b_int, b_slope in single[lo:]:
                    cf.append(max((f_int + f_slope * b) / v for b, v, _ in deciders))
                    cb.append(max((b_int + b_slope * b) / v for b, v, _ in deciders))
            else:
                for k in range(lo, len(lasts)):
                    cf.append(max((terms[src][k][0] + terms[src][k][1] * b) / v
                                  for b, v, src in deciders))
                    cb.append(max((terms[src][k][2] + terms[src][k][3] * b) / v
                                  for b, v, src in deciders))
            size = j - i
            min_bw, pairs = self.min_bw[i][j], self.update_pairs[i][j]
            lat = self.max_lat[i][j]
            upb, slowest = pairs[0]
            if len(pairs) == 1:
                steps = [p * upb / slowest for p in params[lo:]]
            else:
                steps = [max(p * u / d for u, d in pairs) for p in params[lo:]]
            ta = [(2.0 * (size - 1) * p / (size * min_bw) + 2.0 * (size - 1) * lat
                   if size > 1 and p > 0 else 0.0)
                  + step for p, step in zip(params[lo:], steps, strict=True)]
            keep = 0
            for x_f, x_b in zip(cf, cb, strict=True):
                if m * (x_f + x_b) >= inc:
                    break
                keep += 1
            out.append((j, free, self.iface(i, j, free), lasts[lo:], cf, cb, ta, keep,
                        fixed[lo:], acts[lo:]))
        return out

    def options(self, first: int, i: int, flight: int, final: bool) -> list[_Group]:
        """Stages starting at layer ``first`` on devices from ``i`` with ``flight``
        micro-batches in flight (``final``: the last stage, else one that ends before the
        last layer), as groups ``(j, shares, iface, lasts, compute_f, compute_b, t_a)``:
        the stages on devices ``i..j-1`` with those shares, one per ``last`` (ascending).

        A group with the speed-proportional shares (Algorithm 1 without a memory cap) has
        compute times non-decreasing in ``last``; memory-capped stages come as groups of
        one, in the order of their ``last``. A group stops where its own compute reaches
        ``M X >= incumbent`` (the recursion would drop those, and the incumbent only
        decreases) and where a device runs out of memory (memory only grows with
        ``last``); then Algorithm 1 caps the shares until the group cannot hold the stage
        at all."""
        key = (first, i, flight, final)
        found = self._options.get(key)
        if found is not None:
            return found
        out: list[_Group] = []
        m, inc = self.m, self.incumbent
        sums, caps = self.sums, self.caps
        frac = WORKSPACE_FRACTION
        for j, free, free_id, sel, cf, cb, ta, keep, fixed, acts in self._base(first, i, final):
            holders = self.memory_devices[(i, j)]

            def fit(k: int, holders: list[tuple[int, int]] = holders,
                    fixed: list[float] = fixed, acts: list[float] = acts) -> bool:
                per = acts[k] * flight
                for b, d in holders:  # memory_from_parts, in the same float operations
                    a = per * b
                    if fixed[k] + a + math.ceil(a * frac) > caps[d]:
                        return False
                return True

            fits = len(sel)
            if not fit(fits - 1):  # memory grows with `last`: bisect the first misfit
                lo_k, hi_k = 0, fits - 1
                while lo_k < hi_k:
                    mid = (lo_k + hi_k) // 2
                    if fit(mid):
                        lo_k = mid + 1
                    else:
                        hi_k = mid
                fits = lo_k
            n_free = min(fits, keep)
            if n_free:
                out.append((j, free, free_id, sel[:n_free], cf[:n_free], cb[:n_free],
                            ta[:n_free]))
            for k in range(fits, len(sel)):
                last = sel[k]
                shares = split_stage(sums, first, last, self.speeds[i:j], caps[i:j], self.mb,
                                     flight, self.osf, free)
                if shares is None:  # longer stages need even more memory
                    break
                cfs, cbs = self.timing.compute(first, last, self.names[i:j], shares)
                if m * (cfs + cbs) >= inc:
                    continue
                out.append((j, shares, self.iface(i, j, shares), [last], [cfs], [cbs],
                            [ta[k]]))
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
        finals: list[tuple[float, float, Any]] = []
        segs: list[tuple[float, float, float, float, float, Any, list[Summary]]] = []
        total = 0
        # every plan has a stage with X >= (remaining work) / (remaining speed)
        inc = self.incumbent
        bounds: _Bounds = (inc, math.inf, math.inf, math.inf, 0.0, 0.0, 0.0)
        rest = self.work_i[first] / self.speed_total[i][self.n]
        if (self.n - i >= r and self.num_layers - first >= r
                and m * self.work[first] / self.speed_total[i][self.n] < inc
                and m * rest < inc * (1.0 + 1e-9)):
            if self.max_front is None:  # [Note: exact bounds]
                cut = inc * (1.0 + 1e-12)
                xpre = self.head_x[first] / self.speed_total[0][i] if first > 0 else 0.0
                # at most i + r stages, so the dominant stage hides at most w - 1 halves
                w = min(m, i + r) if r < m else m
                half = m - (w - 1) / 2
                low = half - 1
                if low * (xpre if xpre > rest else rest) + xpre + rest >= cut:
                    self._closed[key] = []
                    return []
                if first > 0:
                    bounds = (cut - self.head_f[first] / self.speed_total[0][i], cut - xpre,
                              cut, cut - xpre, xpre, half, low)
                else:
                    bounds = (inc, cut, cut, cut, 0.0, half, low)
            flight, kinds = self._kinds(r)
            j_max = self.n - (r - 1)
            work = self.work_i
            exact = self.max_front is None
            _, _, _, low_cut, xpre, _, low = bounds
            # a tail from layer `last + 1` on devices from j needs M X < incumbent for its
            # average stage ([Note: candidate windows])
            tail_limit = inc * (1.0 + 1e-9) / m
            cache = self._closed
            comm_cache = self._comm
            for final, min_class, hidden_mult in kinds:
                last_ok = self.num_layers - 1 - min_class
                for j, shares, cur, lasts, cfl, cbl, tal in self.options(first, i, flight,
                                                                         final):
                    if j > j_max:
                        continue
                    c = comm_cache.get((prev, cur, first)) if prev >= 0 else 0.0
                    if c is None:
                        c = self.comm(prev, cur, first)
                    hi = len(lasts)
                    # f, b and X grow with `last` inside a group: bisect the last usable one
                    if m * ((cfl[-1] + c) + (cbl[-1] + c)) >= inc:
                        lo_k, hi_k = 0, hi - 1
                        while lo_k < hi_k:
                            mid = (lo_k + hi_k) // 2
                            if m * ((cfl[mid] + c) + (cbl[mid] + c)) >= inc:
                                hi_k = mid
                            else:
                                lo_k = mid + 1
                        hi = lo_k
                    lo = 0
                    if not final:
                        if self.n - j < min_class:
                            continue
                        speed_rest = self.speed_total[j][self.n]
                        while hi > 0 and lasts[hi - 1] > last_ok:
                            hi -= 1
                        if hi == 0 or work[lasts[hi - 1] + 1] / speed_rest >= tail_limit:
                            continue
                        if work[lasts[0] + 1] / speed_rest >= tail_limit:
                            # `_base` cut the window for a larger incumbent: bisect again
                            lo_k, hi_k = 0, hi
                            while lo_k < hi_k:
                                mid = (lo_k + hi_k) // 2
                                if work[lasts[mid] + 1] / speed_rest >= tail_limit:
                                    lo_k = mid + 1
                                else:
                                    hi_k = mid
                            lo = lo_k
                    if final:
                        for k in range(lo, hi):
                            finals.append(((cfl[k] + c) + (cbl[k] + c), tal[k],
                                           (first, lasts[k], i, j, shares)))
                        total += hi - lo
                        continue
                    for k in range(lo, hi):
                        f = cfl[k] + c
                        b = cbl[k] + c
                        x = f + b
                        nxt = lasts[k] + 1
                        if exact:
                            # prefix, this stage and the tail's average: [Note: exact bounds]
                            rest_k = work[nxt] / speed_rest
                            top = rest_k if rest_k > x else x
                            if top < xpre:
                                top = xpre
                            if low * top + x + rest_k >= low_cut:
                                continue
                        stage = None
                        for tail_class, mult in hidden_mult:
                            tail = cache.get((tail_class, nxt, cur))
                            if tail is None:
                                tail = self.closed(tail_class, nxt, cur)
                            if tail:
                                if stage is None:
                                    stage = (first, nxt - 1, i, j, shares)
                                # the drain term if this stage becomes dominant: [Note: DP
                                # cells]
                                segs.append((f, b, x, tal[k], mult * (f if f < b else b),
                                             stage, tail))
                                total += len(tail)
        h = 1.0 + (min(m, r + 1) - 1) * self.rho
        if total >= _NUMPY_ITEMS:
            front = self._combine_np(finals, segs, bounds, h)
        else:
            front = self._combine_py(finals, segs, bounds, h)
        self.max_front_seen = max(self.max_front_seen, len(front))
        self._closed[key] = front
        return front

    def _kinds(self, r: int) -> tuple[int, list[tuple[bool, int, list[tuple[int, int]]]]]:
        """For a cell of class ``r``: the in-flight count and, for the final stage and the
        stages with a tail, ``(final, smallest tail class, [(tail class, drain multiple)])``
        (the drain multiple ``min(M, class + 1) - 1``: [Note: DP cells])."""
        found = self._kind_cache.get(r)
        if found is not None:
            return found
        m = self.m
        kinds: list[tuple[bool, int, list[tuple[int, int]]]] = []
        if r == 1:
            kinds.append((True, 0, []))
        if r >= 2 or m == 1:
            classes = (r - 1, r) if r == m and r > 1 else (r,) if r == m else (r - 1,)
            kinds.append((False, min(classes), [(tc, min(m, tc + 1) - 1) for tc in classes]))
        found = self._kind_cache[r] = (min(m, r), kinds)
        return found

    def _combine_py(self, finals: list[tuple[float, float, Any]],
                    segs: list[tuple[float, float, float, float, float, Any, list[Summary]]],
                    bounds: _Bounds, h: float) -> list[Summary]:
        """Prepend each stage to each tail summary and keep the Pareto front (pure Python,
        for small cells; ``_combine_np`` is the same computation vectorised)."""
        m, inc = self.m, self.incumbent
        inc_r, inc_p, ghost_cut, low_cut, xpre, half, low = bounds
        inf = math.inf
        out: list[Summary] = []
        ghosts: list[Summary] = []
        for x, ta, stage in finals:
            rr = m * x + ta
            if low * (x if x > xpre else xpre) + x >= low_cut:
                continue
            if rr >= inc_r or m * x >= inc_p:
                if half * (x if x > xpre else xpre) + x < ghost_cut:
                    ghosts.append((inf, x, inf, ta, x, stage, None))
            else:
                out.append((rr, x, 0.0, ta, x, stage, None))
        for f, b, x, ta, hidden, stage, tail in segs:
            for t in tail:
                r_t, xm_t, pre_t, g_t, sx_t = t[0], t[1], t[2], t[3], t[4]
                if m * xm_t >= inc:
                    continue
                gb = g_t - b
                g = gb if gb > ta else ta
                sx = x + sx_t
                if xm_t >= x:
                    if low * (xm_t if xm_t > xpre else xpre) + sx >= low_cut:
                        continue
                    rr = f + r_t
                    v = m * xm_t + x + pre_t + ta
                    if v > rr:
                        rr = v
                    pre = x + pre_t
                    if rr >= inc_r or m * xm_t + pre >= inc_p:
                        if half * (xm_t if xm_t > xpre else xpre) + sx < ghost_cut:
                            ghosts.append((inf, xm_t, inf, g, sx, stage, t))
                    else:
                        out.append((rr, xm_t, pre, g, sx, stage, t))
                else:
                    if low * (x if x > xpre else xpre) + sx >= low_cut:
                        continue
                    drain = sx_t - hidden if sx_t > hidden else 0.0
                    v = ta + drain
                    rr = m * x + (v if v > gb else gb)
                    if rr >= inc_r or m * x + drain >= inc_p:
                        if half * (x if x > xpre else xpre) + sx < ghost_cut:
                            ghosts.append((inf, x, inf, g, sx, stage, t))
                    else:
                        out.append((rr, x, drain, g, sx, stage, t))
        return _pareto(out, self.max_front, h, ghosts)

    def _combine_np(self, finals: list[tuple[float, float, Any]],
                    segs: list[tuple[float, float, float, float, float, Any, list[Summary]]],
                    bounds: _Bounds, h: float) -> list[Summary]:
        """``_combine_py`` with numpy: the same float operations element by element, the
        same stable order and the same front (see ``_pareto_np``)."""
        m, inc = self.m, self.incumbent
        inc_r, inc_p, ghost_cut, low_cut, xpre, half, low = bounds
        inf = math.inf
        cols: list[Any] = []
        if finals:
            fx = np.array([x for x, _, _ in finals])
            fta = np.array([ta for _, ta, _ in finals])
            rr = m * fx + fta
            ghost = (rr >= inc_r) | (m * fx >= inc_p)
            keep = ~(ghost & (half * np.maximum(fx, xpre) + fx >= ghost_cut))
            keep &= low * np.maximum(fx, xpre) + fx < low_cut
            rr = np.where(ghost, inf, rr)
            pre = np.where(ghost, inf, 0.0)
            cols.append((rr, fx, pre, fta, fx, keep))
        if segs:
            counts = [len(seg[6]) for seg in segs]
            tails = np.concatenate([self._front_array(seg[6]) for seg in segs])
            r_t, xm_t, pre_t, g_t, sx_t = tails.T
            scal = np.repeat(np.array([seg[:5] for seg in segs]), counts, axis=0)
            f, b, x, ta, hidden = scal.T
            valid = m * xm_t < inc
            gb = g_t - b
            g = np.where(gb > ta, gb, ta)
            sx = x + sx_t
            stay = xm_t >= x
            rr_a = f + r_t
            v_a = m * xm_t + x + pre_t + ta
            rr_a = np.where(v_a > rr_a, v_a, rr_a)
            drain = np.where(sx_t > hidden, sx_t - hidden, 0.0)
            v_b = ta + drain
            rr_b = m * x + np.where(v_b > gb, v_b, gb)
            rr = np.where(stay, rr_a, rr_b)
            xm = np.where(stay, xm_t, x)
            pre = np.where(stay, x + pre_t, drain)
            ghost = (rr >= inc_r) | (m * xm + pre >= inc_p)
            keep = valid & ~(ghost & (half * np.maximum(xm, xpre) + sx >= ghost_cut))
            keep &= low * np.maximum(xm, xpre) + sx < low_cut
            rr = np.where(ghost, inf, rr)
            pre = np.where(ghost, inf, pre)
            cols.append((rr, xm, pre, g, sx, keep))
        table = np.concatenate([np.stack(c[:5], axis=1) for c in cols])
        keep = np.concatenate([c[5] for c in cols])
        index = np.flatnonzero(keep)
        table = table[index]
        order = np.lexsort((table[:, 4], table[:, 3], table[:, 2], table[:, 1], table[:, 0]))
        table = table[order]
        index = index[order]
        chosen = _pareto_np(table, self.max_front, h)
        n_final = len(finals)
        starts = np.cumsum([n_final] + [len(seg[6]) for seg in segs]).tolist()
        rows = table[chosen].tolist()
        front: list[Summary] = []
        for row, at in zip(rows, index[chosen].tolist(), strict=True):
            if at < n_final:
                stage, t = finals[at][2], None
            else:
                s_idx = bisect_right(starts, at) - 1
                seg = segs[s_idx]
                stage, t = seg[5], seg[6][at - starts[s_idx]]
            front.append((row[0], row[1], row[2], row[3], row[4], stage, t))
        self._arrays[id(front)] = table[chosen]
        return front

    def _front_array(self, front: list[Summary]) -> Any:
        """The five numbers of a front as an ``(n, 5)`` float array (cached)."""
        arr = self._arrays.get(id(front))
        if arr is None:
            arr = self._arrays[id(front)] = np.array([t[:5] for t in front], dtype=np.float64)
        return arr

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
    cluster = cluster.for_costs(costs)
    start = time.perf_counter()
    mbs = micro_batch_choices(batch_size, micro_batch_sizes)
    if device_order is None:
        devices = sorted_devices(cluster, costs)
    else:
        devices = [cluster.device(name) for name in device_order]
        if len(set(device_order)) != len(devices):
            raise PlanError(f"device_order repeats a device: {list(device_order)}")
    speed_of = Timing.of(costs, cluster).speeds
    speeds = [speed_of[d.name] for d in devices]
    sums = LayerSums.of(costs)
    ends = candidate_cuts(costs, max_cuts)
    context = _Context(costs, cluster, devices, speeds, sums)
    best_value = incumbent
    best_plan: Plan | None = None
    cells = 0
    biggest = 0
    # [Note: incumbent pruning] a coarse pass (every micro-batch size on a subset of the
    # cuts) gives an incumbent; without a cap, passes on twice as many cuts each refine it
    # with the most promising micro-batch size (each is exact over its subset, so each
    # incumbent is a real plan); the full pass then drops what provably cannot beat it.
    # With a cap the passes stay as they were (coarse, then full): the capped search's
    # result depends on the incumbents it is given.
    passes: list[tuple[list[int], int]] = []
    if len(ends) > 2 * _COARSE_CUTS:
        stride = len(ends) // _COARSE_CUTS
        passes.append((ends[::stride], len(mbs)))
        if max_front is None:
            stride //= 2
            while stride > 1:
                passes.append((ends[::stride], _REFINE_MBS))
                stride //= 2
    passes.append((ends, len(mbs)))
    order = list(mbs)
    found: dict[int, float] = {}
    for pass_ends, count in passes:
        for mb in order[:count]:
            m = batch_size // mb
            if (max_front is not None and math.isfinite(best_value)
                    and not math.isfinite(found.get(mb, math.inf))):
                # [Note: proofs for capped fronts]
                proof = _Search(costs, cluster, devices, speeds, sums, pass_ends, mb, m,
                                optimizer_state_factor, None, best_value, context)
                if proof.best()[1] is None:
                    found[mb] = math.inf
                    cells += len(proof._closed)
                    continue
            search = _Search(costs, cluster, devices, speeds, sums, pass_ends, mb, m,
                             optimizer_state_factor, max_front, best_value, context)
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
