"""Algorithm 2, the Asteroid planner: an exact Pareto-front DP over stages, groups and shares.

[Note: the DP's space]
A plan is a sequence of stages; stage ``s`` takes a contiguous run of layers and a group
of devices that no other stage uses. Which groups a stage may take is the *search space*
(``solver.space``, [Note: group spaces]): consecutive slices of one device order (the
paper's space, ``space="order"``; by default the capability order, [Note: the capability
order]), or any group, searched as counts of interchangeable devices (``space="classes"``,
the wide space of ``planner="ilp-wide"``). The shares inside a stage come from Algorithm 1
(``solver.split``) for the stage's layers, group, micro-batch size and in-flight count
``min(M, S - s)``. The micro-batch size ranges over the divisors of the batch size (or
the sizes given), the cuts over ``solver.space.candidate_cuts``. The DP returns the plan
of its space with the smallest ``evaluate()`` round latency; ``solver.brute`` enumerates
both spaces and the tests check that they agree. The summary algebra that makes the DP
exact is in ``solver.summary`` ([Note: why a Pareto front]), the front kernels in
``solver.pareto``.

[Note: DP cells]
``E_f`` of a stage includes receiving its input cut from the previous stage, which
depends on the previous stage's group and shares. A cell is therefore keyed by
``(r, l, iface)``: ``r`` stages remain, they start at layer ``l``, and the stage before
them has interface ``iface`` = (how its group sends the cut: the shares and each member's
links, ``SearchSpace.signature``; the pool of devices it leaves), interned as a small
integer; -1 before the first stage. Two groups with the same signature re-shard to any
next group in the same time, so their suffixes are the same. ``r`` fixes the in-flight count
``min(M, r)`` that memory needs; suffixes of ``M`` or more stages all have ``M`` in flight
at their first stage, so they share one class ``r = M`` ("at least M stages"). The class
also fixes the drain term of a stage prepended as the new dominant: its ``w = min(M, r +
1)``. Per-stage times are taken from ``LayerSums`` and ``transfer_time`` with the same
float operations as ``evaluate``, so the dominant-stage comparisons agree bit for bit.
Stage costs depend on the group, not on the pool, so they are built once per (first
layer, group) and shared by every pool that offers the group.

[Note: incumbent pruning]
Any plan's round latency is at least ``M X`` of each of its stages, and prepending a stage
whose ``X`` does not exceed ``Xm`` never lowers ``R``. So, given an incumbent plan of
latency ``I`` (from first passes over subsets of the cuts, then from every finished
micro-batch size), a summary with ``M Xm >= I`` is dropped, and one with ``R >= I`` is
kept only as a "ghost" (``R = Pre = inf``): it can still matter if a stage with a larger
``X`` is prepended, which makes ``R`` depend on ``G`` and ``SumX`` alone. A stage whose
layers need ``M * work * b / (sum of its group's speeds) >= I`` even when perfectly
balanced, and a cell whose remaining layers need that on all the pool's devices together,
are skipped too (some stage carries at least the average load). All these rules are
exact, and they hold with or without a cap on the fronts: what they remove would be
dropped anyway.

[Note: candidate windows]
A stage ``first..last`` on a group that leaves the pool ``P'`` is only worth combining
with a tail that can itself stay below the incumbent, i.e. ``M * work_i(last + 1..) /
(speed of P') < I`` (``work_i``: slopes times the micro-batch plus the intercepts; a
group's ``X * (sum of its speeds) >= intercepts + slopes * b`` by averaging its devices'
times weighted by speed). That rules out the short stages, and the stage's own ``M X <
I`` rules out the long ones, so per group the usable ``last`` form a window, which
``closed`` bisects for the current interface (``X`` grows with ``last``: the float
operations are monotone). Tails ruled out this way would have had every summary dropped
by ``M Xm >= I`` (a relative slack of ``1e-9`` covers float rounding), so the fronts do
not change.

[Note: exact bounds]
Without a cap on the fronts (``max_front=None``) the DP also drops what provably cannot
lead to a plan below ``I`` given the layers before the cell: they run on devices outside
the cell's pool, so the stages there have ``sum F >= head_f / V`` and ``sum X >= head_x /
V`` and the largest ``X >= head_x / V`` (``head_*``: the forward / both times of layers
``< first`` with intercepts, ``V``: the speed of the devices outside the pool). With
``d`` the dominant stage of the whole plan and ``w <= min(M, stages)`` (at most one stage
per device outside the pool, plus ``r``), the round is at least ``T_e`` of the first
stage, ``M X_d + sum_{s<d} X_s + D`` with ``D >= (sum of X after d) - (w - 1) X_d / 2``, so

* every plan: ``round >= (M - 1 - (w - 1) / 2) X_d + sum_all X``: a summary, a stage
  with the average of its tail, or a whole cell whose bound reaches ``I`` is dropped;
* the dominant in the suffix (``R`` and ``Pre`` stay meaningful): ``round >= R + sum F``
  of the layers before, and ``round >= M Xm + Pre + sum X`` of them; a summary reaching
  ``I`` in either becomes a ghost;
* the dominant before the suffix (what a ghost waits for): ``round >= (M - (w - 1) / 2)
  X_d + SumX`` with ``X_d > Xm``; a ghost reaching ``I`` is dropped;
* the all-reduce: every pipeline has ``R >= M Xm + G`` and prepending a stage keeps ``G'
  >= G - B``; the ``k`` stages before the cell (at most one per device outside its pool)
  have ``sum B <= k Xm_final``, so ``round >= (M - k) Xm_final + G``, i.e. ``round >= G
  min(1, M / k)`` (``Xm_final <= round / M``). A summary (or a stage, whose ``T_a`` is a
  lower bound of ``G``; ``T_a`` grows with ``last``) with ``G min(1, M / k) >= I`` is
  dropped. This prunes the data-parallel groups whose all-reduce alone is slower than
  the incumbent, which on slow links is most of them.

* the stage bound (``solver.bounds``, [Note: the stage bound]; opt-in with
  ``stage_bounds_prune=True``, the paper's space, without a cap or deadline): every plan
  has ``round >= M X_s + max(0, T_a^s - s X_s)`` for each stage ``s`` and ``round >=
  alpha X_d + sum X``, with each ``X_s`` bounded below by its compute at the best integer
  split and its transfers at the fastest links. A DP over (first layer, devices used,
  stages before) finds where no completion can beat ``I``: a micro-batch size hopeless
  at its first layer is not searched, and a hopeless cell is dropped (with the stages
  before it counted as ``min(M, devices used)``, the bound's weakest case, and their sum
  as ``head_x / V``).

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
passes can only pick another plan of equal round time). Cells with many candidate
summaries are combined with numpy (``_combine_np``: the same float operations element by
element, a stable ``lexsort`` and ``solver.pareto.pareto_np``, exact because dominance is
transitive); small ones in plain Python, where ghosts are sorted and scanned only if the
finite summaries leave room under the cap. Stage options are built once per (first
layer, group) and shared by all in-flight counts and pools, with numpy only for long
candidate lists (``solver.stage_options``). Group compute times take the maximum over the
devices that can decide it (``_deciders``), memory checks over the devices that can bind
first; both drop only devices whose value is provably never larger. The searches of one
``asteroid_dp`` call share prefix arrays, bound tables, interfaces and re-sharding times
(``SearchContext``).

[Note: cost columns in the DP]
A device whose type has a column in the cost table takes the column's times as measured
([Note: cost columns] in ``solver.timing``), so a group's devices no longer share one
time function scaled by speed. The DP keeps every rule above exact as follows:

* order and shares use the capability speed (a column device: its whole-model ratio of
  base to column work), which does not depend on the stage, so the free shares stay
  per group and micro-batch;
* stage times are taken per device from its time source (the base or its column) and
  divisor (speed, or 1 for a column), in the same float operations as ``evaluate``;
  ``_deciders`` compares devices only within one time source (``_source_deciders``);
  ``T_a``'s optimizer step is the maximum over the group's sources of ``(params *
  update_per_byte + round_s) / (smallest divisor)`` (``Timing.update_pairs``); a
  source's per-call runtime overhead enters its intercept terms as in ``LayerSums``;
* every bound that divides base work by a sum of speeds (``work``, ``work_i``,
  ``head_*``: cell and stage cut-offs, candidate windows, exact bounds) divides by the
  *bound speeds* ``u_d`` instead (``SearchSpace.pool_speed`` and friends): no stage is
  faster on ``d`` than the base times over ``u_d`` (the largest base / column ratio of
  any layer's intercept or slope), so a group's ``X * sum(u) >= intercepts + slopes * b``
  still holds and the bounds stay lower bounds;
* ``hiding_ratio`` takes the forward / backward ratios of every time source the
  cluster uses (the group maximum of forward and of backward may come from different
  devices, each within the smallest and largest ratio of its own source).

Without columns the bound speeds are the speeds, there is one time source, and every
number, the order of equal summaries and the time taken are those of before
(``tests/test_dp.py`` keeps the reference implementation and checks DP = brute force
with and without columns).
"""

from __future__ import annotations

import logging
import math
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from contracts.cluster import Cluster
from contracts.errors import PlanError
from contracts.plan import Plan, PlannerInfo, Stage
from contracts.table import CostTable
from solver.bounds import StageBound, stage_bound
from solver.diagnose import no_fit_error
from solver.evaluate import (
    LayerSums,
)
from solver.pareto import pareto, pareto_np
from solver.space import (
    DEFAULT_MAX_CUTS,
    ClassSpace,
    EvenSpace,
    GroupsTimeout,
    SearchSpace,
    SliceSpace,
    balanced_cuts,
    candidate_cuts,
    micro_batch_choices,
    sorted_devices,
)
from solver.stage_options import Option, SearchContext, StageOptions
from solver.summary import PipelineSummary, Summary, dominates, hiding_ratio, prepend

__all__ = ["DP_VERSION", "DEFAULT_MAX_CUTS", "DPResult", "SearchTimeout", "asteroid_dp",
           "make_space", "PipelineSummary", "prepend", "dominates", "hiding_ratio",
           "sorted_devices", "candidate_cuts", "micro_batch_choices", "no_fit_error"]

log = logging.getLogger(__name__)

DP_VERSION = "1"
_COARSE_CUTS = 12
_REFINE_MBS = 2
"""[Note: refining two sizes]: the micro-batch sizes each refining pass searches."""

SpaceName = Literal["order", "classes", "even"]

_NUMPY_ITEMS = 400
"""Cells with at least this many candidate summaries are combined with numpy."""



# The cut-offs of a cell ([Note: exact bounds]): (ghost when R >= this, ghost when M Xm +
# Pre >= this, drop a ghost when (M - (w-1)/2) max(Xm, head) + SumX >= this, drop any
# summary when (M - 1 - (w-1)/2) max(Xm, head) + SumX >= this, head, M - (w-1)/2,
# M - 1 - (w-1)/2, drop any summary when G >= this); with a cap only the first is finite.
_Bounds = tuple[float, float, float, float, float, float, float, float]


class SearchTimeout(Exception):
    """Raised inside a search when its deadline passes (``asteroid_dp`` catches it)."""


@dataclass
class DPResult:
    """The best plan found, its predicted round time, and search statistics.

    ``complete`` is False when the search stopped at its deadline: ``plan`` is then the
    best plan found before it (or None), not a proven optimum. ``bounds`` holds, per
    micro-batch size whose exact search over all candidate cuts finished, a proven lower
    bound on the round time of its plans (its optimum, or the incumbent it could not
    beat).
    """

    plan: Plan | None
    round_time_s: float
    search_time_s: float
    cells: int
    max_front: int
    candidate_cuts: int
    complete: bool = True
    bounds: dict[int, float] = field(default_factory=dict)
    #: micro-batch sizes left out of the pass over every candidate cut (``full_sizes``)
    skipped: tuple[int, ...] = ()
    #: the micro-batch sizes, most promising first (by the best round each pass found)
    ranking: tuple[int, ...] = ()


def make_space(costs: CostTable, cluster: Cluster, space: SpaceName | SearchSpace = "order",
               device_order: Sequence[str] | None = None) -> SearchSpace:
    """The search space of ``asteroid_dp`` ([Note: group spaces] in ``solver.space``); a
    ``SearchSpace`` given as ``space`` is that space (built on ``cluster.for_costs(costs)``)."""
    given = isinstance(space, SearchSpace)
    if device_order is not None and (given or space in ("classes", "even")):
        raise PlanError("device_order applies to space='order' only; " + (
            "a given space holds its own groups" if given
            else f"the {space} space searches every order"))
    if isinstance(space, SearchSpace):
        return space
    if space in ("classes", "even"):
        return ClassSpace(costs, cluster) if space == "classes" else EvenSpace(costs, cluster)
    if space != "order":
        raise PlanError(f"unknown search space {space!r}; use 'order', 'classes' or 'even'")
    if device_order is None:
        return SliceSpace(costs, cluster, sorted_devices(cluster, costs))
    devices = [cluster.device(name) for name in device_order]
    if len(set(device_order)) != len(devices):
        raise PlanError(f"device_order repeats a device: {list(device_order)}")
    return SliceSpace(costs, cluster, devices)


class _Search(StageOptions):
    """The DP for one micro-batch size (see the module notes): the cells over the stage
    options of ``StageOptions``."""

    def __init__(self, ctx: SearchContext, ends: list[int], micro_batch: int, num_micro: int,
                 osf: float, max_front: int | None, incumbent: float = math.inf,
                 deadline: float | None = None, bound: StageBound | None = None) -> None:
        super().__init__(ctx, ends, micro_batch, num_micro, osf, incumbent)
        self.bound = bound
        self.max_front = max_front
        self.deadline = deadline
        self._pool_options: dict[tuple[int, int, int, bool, int],
                                 list[tuple[int, int, list[Option]]]] = {}
        self._closed: dict[tuple[int, int, int], list[Summary]] = {}
        self._kind_cache: dict[int, tuple[int, list[tuple[bool, int, list[tuple[int, int]]]]]] = {}
        # fronts as float arrays, by id() of the (cached, hence alive) front list
        self._arrays: dict[int, Any] = {}
        self.max_front_seen = 0

    # -- the recursion ------------------------------------------------------------------
    def closed(self, r: int, first: int, prev: int) -> list[Summary]:
        """Non-dominated summaries of suffixes from layer ``first`` whose first stage
        receives from ``prev`` and that have exactly ``r`` stages (``r < M``) or at least
        ``M`` stages (``r == M``): beyond ``M`` the in-flight count no longer changes, so
        those classes merge (see [Note: incumbent pruning] for the pruning)."""
        key = (r, first, prev)
        found = self._closed.get(key)
        if found is not None:
            return found
        if self.deadline is not None and time.perf_counter() > self.deadline:
            raise SearchTimeout
        ctx, space = self.ctx, self.space
        m = self.m
        pool = space.root if prev < 0 else ctx.iface_pool[prev]
        prev_gs = ctx.iface_gs[prev] if prev >= 0 else -1
        sizes, speeds = space.pool_sizes, space.pool_speeds
        pool_speed = speeds[pool]
        pool_size = sizes[pool]
        finals: list[tuple[float, float, Any]] = []
        segs: list[tuple[float, float, float, float, float, Any, list[Summary]]] = []
        total = 0
        # every plan has a stage with X >= (remaining work) / (remaining speed)
        inc = self.incumbent
        bounds: _Bounds = (inc, math.inf, math.inf, math.inf, 0.0, 0.0, 0.0, math.inf)
        rest = self.work_i[first] / pool_speed
        if (pool_size >= r and self.num_layers - first >= r
                and m * self.work[first] / pool_speed < inc
                and m * rest < inc * (1.0 + 1e-9)
                and (self.bound is None or not self.bound.hopeless(
                    first, self.n - pool_size, self.head_x[first] / space.outside_speeds[pool]
                    if first > 0 else 0.0, inc))):
            if self.max_front is None:  # [Note: exact bounds]
                cut = inc * (1.0 + 1e-12)
                outside = space.outside_speeds[pool]
                xpre = self.head_x[first] / outside if first > 0 else 0.0
                # at most one stage per device outside the pool, plus r: the dominant
                # stage hides at most w - 1 halves
                w = min(m, self.n - pool_size + r) if r < m else m
                half = m - (w - 1) / 2
                low = half - 1
                if low * (xpre if xpre > rest else rest) + xpre + rest >= cut:
                    self._closed[key] = []
                    return []
                # G reaches the round unless the stages before hide it: at most k of them
                k = self.n - pool_size
                g_cut = cut if k <= m else cut * k / m
                if first > 0:
                    bounds = (cut - self.head_f[first] / outside, cut - xpre,
                              cut, cut - xpre, xpre, half, low, g_cut)
                else:
                    bounds = (inc, cut, cut, cut, 0.0, half, low, g_cut)
            flight, kinds = self._kinds(r)
            work = self.work_i
            exact = self.max_front is None
            _, _, _, low_cut, xpre, _, low, g_cut = bounds
            # a tail from layer `last + 1` on the pool left needs M X < incumbent for its
            # average stage ([Note: candidate windows])
            tail_limit = inc * (1.0 + 1e-9) / m
            cache = self._closed
            comm_cache = ctx.comm
            try:
                groups = space.groups(pool, self.mb, self.deadline)
            except GroupsTimeout:
                raise SearchTimeout from None
            for final, min_class, hidden_mult in kinds:
                last_ok = self.num_layers - 1 - min_class
                gs_ids = ctx.gs_ids
                # the groups that leave at least r - 1 devices (and the tail's smallest
                # class): the options of the others are never built for this cell
                need = r - 1 if final else max(r - 1, min_class)
                pool_key = (first, pool, flight, final, need)
                usable = self._pool_options.get(pool_key)
                if usable is None:
                    usable = self._pool_options[pool_key] = self._usable(first, groups,
                                                                         flight, final, need)
                for gid, left, opts in usable:
                    speed_rest = speeds[left] if not final else 0.0
                    for shares, lasts, cfl, cbl, tal in opts:
                        # first what needs no re-sharding time: T_a grows with `last`
                        hi = len(lasts)
                        if tal[hi - 1] >= g_cut:
                            lo_k, hi_k = 0, hi - 1
                            while lo_k < hi_k:
                                mid = (lo_k + hi_k) // 2
                                if tal[mid] >= g_cut:
                                    hi_k = mid
                                else:
                                    lo_k = mid + 1
                            hi = lo_k
                        lo = 0
                        if not final:
                            while hi > 0 and lasts[hi - 1] > last_ok:
                                hi -= 1
                            if hi == 0 or work[lasts[hi - 1] + 1] / speed_rest >= tail_limit:
                                continue
                            if work[lasts[0] + 1] / speed_rest >= tail_limit:
                                # the window starts later: bisect its first `last`
                                lo_k, hi_k = 0, hi
                                while lo_k < hi_k:
                                    mid = (lo_k + hi_k) // 2
                                    if work[lasts[mid] + 1] / speed_rest >= tail_limit:
                                        lo_k = mid + 1
                                    else:
                                        hi_k = mid
                                lo = lo_k
                        if hi <= lo or m * (cfl[lo] + cbl[lo]) >= inc:
                            continue
                        cur_gs = gs_ids.get((gid, shares))
                        if cur_gs is None:
                            cur_gs = ctx.gs_id(gid, shares)
                        c = 0.0
                        if prev >= 0:
                            known = comm_cache.get((prev_gs, cur_gs, first))
                            c = ctx.transfer(prev_gs, cur_gs, first) if known is None else known
                        # f, b and X grow with `last` inside a group: bisect the last usable
                        if m * ((cfl[hi - 1] + c) + (cbl[hi - 1] + c)) >= inc:
                            lo_k, hi_k = lo, hi - 1
                            while lo_k < hi_k:
                                mid = (lo_k + hi_k) // 2
                                if m * ((cfl[mid] + c) + (cbl[mid] + c)) >= inc:
                                    hi_k = mid
                                else:
                                    lo_k = mid + 1
                            hi = lo_k
                        if final:
                            for k in range(lo, hi):
                                finals.append(((cfl[k] + c) + (cbl[k] + c), tal[k],
                                               (first, lasts[k], gid, shares)))
                            total += hi - lo
                            continue
                        cur = ctx.iface(cur_gs, left)
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
                                        stage = (first, nxt - 1, gid, shares)
                                    # the drain term if this stage becomes dominant: [Note:
                                    # DP cells]
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
        inc_r, inc_p, ghost_cut, low_cut, xpre, half, low, g_cut = bounds
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
                if g >= g_cut:
                    continue
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
        return pareto(out, self.max_front, h, ghosts)

    def _combine_np(self, finals: list[tuple[float, float, Any]],
                    segs: list[tuple[float, float, float, float, float, Any, list[Summary]]],
                    bounds: _Bounds, h: float) -> list[Summary]:
        """``_combine_py`` with numpy: the same float operations element by element, the
        same stable order and the same front (see ``solver.pareto.pareto_np``)."""
        m, inc = self.m, self.incumbent
        inc_r, inc_p, ghost_cut, low_cut, xpre, half, low, g_cut = bounds
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
            keep &= (low * np.maximum(xm, xpre) + sx < low_cut) & (g < g_cut)
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
        chosen = pareto_np(table, self.max_front, h)
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
        parts = []
        node: Any = summary
        while node is not None:
            parts.append(node[5])
            node = node[6]
        names = self.space.assign([gid for _, _, gid, _ in parts])
        return tuple(Stage((first, last), group, shares)
                     for (first, last, _, shares), group in zip(parts, names, strict=True))


Progress = Callable[[int, int, str, float], None]
"""``(done, total, what, best)``: called after each micro-batch size of each pass, with
the best round time found so far (the incumbent it was given, else ``inf``)."""


def asteroid_dp(costs: CostTable, cluster: Cluster, batch_size: int, *,
                optimizer_state_factor: float = 0.0,
                micro_batch_sizes: Sequence[int] | None = None,
                max_cuts: int | None = DEFAULT_MAX_CUTS,
                max_front: int | None = None,
                device_order: Sequence[str] | None = None,
                space: SpaceName | SearchSpace = "order",
                incumbent: float = math.inf,
                deadline: float | None = None,
                progress: Progress | None = None,
                stage_bounds_prune: bool = False,
                full_sizes: int | None = None) -> DPResult:
    """Run Algorithm 2 and return the best plan of the DP's space (see the module notes).

    Args:
        costs, cluster, batch_size: the problem.
        optimizer_state_factor: optimizer state in units of the weights (memory model).
        micro_batch_sizes: micro-batch sizes to try (default: every divisor of the batch).
        max_cuts: at most this many candidate cut positions (None: all; see
            ``solver.space.candidate_cuts``).
        max_front: cap on the Pareto front per cell (None: exact).
        device_order: the device order whose slices stages take (``space="order"``;
            default: the capability order, ``sorted_devices``); devices left out are not
            used.
        space: ``"order"`` (slices of one order, the paper's space), ``"classes"`` (any
            group, as counts of interchangeable devices: every order is searched) or
            ``"even"`` (the groups of ``"classes"`` whose size divides the micro-batch,
            nearly all of one class: [Note: even groups] in ``solver.space``; its
            ``bounds`` hold for it alone), or a ``SearchSpace`` of the caller's, built on
            ``cluster.for_costs(costs)`` (``tools/bound_bed.py`` narrows the classes'
            groups to a few count vectors).
        incumbent: a round time already achieved elsewhere; only better plans are
            returned (``plan`` is None when there is none).
        deadline: a ``time.perf_counter()`` value; the search stops there and returns the
            best plan found so far with ``complete=False``.
        progress: called after every micro-batch size of every pass.
        stage_bounds_prune: also prune with the stage bound of ``solver.bounds`` (the
            paper's space, no cap, no deadline). Exact, but off by default: measured
            slower than without on issue 14's instances (docs/planner.md).
        full_sizes: the pass over every candidate cut runs only this many micro-batch
            sizes, the most promising of the coarse pass first, without the refining
            passes (None: all sizes, after the refining passes); the others are in
            ``skipped``, and ``complete`` is False where any is.

    Returns:
        A ``DPResult``; ``plan`` is None when no plan of the space fits in memory (or
        none beats ``incumbent``, whose value ``round_time_s`` then keeps).
    """
    cluster = cluster.for_costs(costs)
    start = time.perf_counter()
    mbs = micro_batch_choices(batch_size, micro_batch_sizes)
    searched = make_space(costs, cluster, space, device_order)
    sums = LayerSums.of(costs)
    ends = candidate_cuts(costs, max_cuts)
    context = SearchContext(costs, cluster, searched, sums)
    best_value = incumbent
    best_plan: Plan | None = None
    cells = 0
    biggest = 0
    # [Note: incumbent pruning] a coarse pass (every micro-batch size on a subset of the
    # cuts) gives an incumbent; without a cap, passes on twice as many cuts each refine it
    # with the two most promising micro-batch sizes, the smaller search first ([Note:
    # refining two sizes]; each pass is exact over its subset, so each incumbent is a real
    # plan); the full pass then drops what provably cannot beat it.
    # With a cap the passes stay as they were (coarse, then full): the capped search's
    # result depends on the incumbents it is given. With `full_sizes` there are no
    # refining passes either: the caller proves the sizes left out otherwise ([Note: the
    # order's sizes after the bound] in solver.anytime), the coarse pass ranks the sizes,
    # and a sharper incumbent prunes little of the full pass (issue 14's MLP x 8, micro-
    # batch 16 over 96 cuts: 0.21 s with the coarse pass's incumbent and with the refined
    # one, 1 % apart), while the refining passes cost 0.09 s.
    # [Note: coarse passes] a coarse pass takes its cuts from the candidates as the
    # candidates are taken from every boundary (``balanced_cuts``: even compute, fewest
    # bytes), not every k-th: ResNet-50 on 16 Jetsons, micro-batch 4 over every order,
    # found nothing below the paper's space's 1.464 s on every 6th cut and 1.434 s on 12
    # balanced ones (the optimum over the 92 candidates: 1.371 s)
    # [Note: refining two sizes] a size that ranks second on few cuts may win on more: on
    # ResNet-50 x 64 Jetsons (the paper's space, 96 cuts) micro-batch 16 leads the coarse
    # pass (0.6584 s against 0.6684 s at 8) and its refining pass on 24 cuts (0.6193 s,
    # 9 s), but micro-batch 8 on 24 cuts gives 0.5962 s, the space's optimum, which the
    # pass over every cut reached only after 165 s. So each refining pass searches the
    # two sizes that lead the pass before, the one whose search there was smaller first
    # (fewer cells: a pass costs several times more per doubling of the cuts, and less for
    # the smaller micro-batch count: 1.7 s against 5.3 s at 24 cuts here; cells, not
    # seconds, so that the order does not depend on the host). Measured with
    # `tools/time_planner.py --once jetsons 64 --time-limit 30`: 0.6193 s (found at
    # 14.9 s) -> 0.5962 s (at 10.7 s), gap 12.9 % -> 8.7 %; in 15 s the same. The other
    # rows of the fleet and issue-14 tables kept their plans and gaps, and the exact
    # searches their results (their time within noise: MLP x 8 0.84-0.86 s, ResNet-50 x 8
    # Jetsons 1.9-2.1 s, x 16 without a limit 21.2 s, the 8-device fleets 2.1 s and 15.4 s).
    passes: list[tuple[list[int], int]] = []
    if len(ends) > 2 * _COARSE_CUTS:
        stride = len(ends) // _COARSE_CUTS
        passes.append((balanced_cuts(costs, ends, len(ends[::stride])), len(mbs)))
        if max_front is None and full_sizes is None:
            stride //= 2
            while stride > 1:
                passes.append((balanced_cuts(costs, ends, len(ends[::stride])), _REFINE_MBS))
                stride //= 2
    # without coarser passes there is no ranking of the sizes: all of them
    full = len(mbs) if full_sizes is None or not passes else max(1, min(full_sizes, len(mbs)))
    passes.append((ends, full))
    skipped: tuple[int, ...] = ()
    order = list(mbs)
    found: dict[int, float] = {}
    steps = sum(min(count, len(mbs)) for _, count in passes)
    done = 0
    complete = True
    bounds: dict[int, float] = {}
    stage_bounds: dict[int, StageBound] = {}

    def keep(search: _Search, value: float, summary: Summary | None, mb: int) -> None:
        nonlocal best_value, best_plan
        if summary is not None and value < best_value:
            best_value = value
            best_plan = Plan(
                model_hash=costs.model_hash, cluster_hash=cluster.cluster_hash,
                batch_size=batch_size, micro_batch_size=mb, num_micro_batches=batch_size // mb,
                stages=search.to_stages(summary), num_layers=costs.num_layers,
                model_name=costs.model_name, optimizer_state_factor=optimizer_state_factor,
                planner=PlannerInfo("asteroid", DP_VERSION))

    spent: dict[int, int] = {}     # the cells of each size's last pass (its work)
    try:
        for pass_ends, count in passes:
            if pass_ends is ends:
                skipped = tuple(order[count:])
            chosen = order[:count]
            if pass_ends is not ends and count < len(mbs):
                chosen = sorted(chosen, key=lambda b: spent.get(b, 0))
            for mb in chosen:
                m = batch_size // mb
                if (max_front is not None and math.isfinite(best_value)
                        and not math.isfinite(found.get(mb, math.inf))):
                    # [Note: proofs for capped fronts]
                    proof = _Search(context, pass_ends, mb, m, optimizer_state_factor, None,
                                    best_value, deadline)
                    if proof.best()[1] is None:
                        if pass_ends is ends:
                            bounds[mb] = best_value
                        found[mb] = math.inf
                        cells += len(proof._closed)
                        done += 1
                        if progress is not None:
                            progress(done, steps, f"micro-batch {mb}", best_value)
                        continue
                stage_lb: StageBound | None = None
                if (stage_bounds_prune and max_front is None and deadline is None
                        and pass_ends is ends and math.isfinite(best_value)
                        and isinstance(searched, SliceSpace)):
                    # [Note: the stage bound] in solver.bounds: once per micro-batch size,
                    # in the pass over every candidate cut
                    stage_lb = stage_bounds.get(mb)
                    if stage_lb is None:
                        stage_lb = stage_bound(searched, sums, costs.cut_bytes, ends, mb, m,
                                               best_value, deadline)
                        if stage_lb is None:
                            raise SearchTimeout
                        stage_bounds[mb] = stage_lb
                    if stage_lb.hopeless(0, 0, 0.0, best_value):
                        if pass_ends is ends:
                            bounds[mb] = best_value
                        found[mb] = math.inf
                        done += 1
                        if progress is not None:
                            progress(done, steps, f"micro-batch {mb}", best_value)
                        continue
                search = _Search(context, pass_ends, mb, m, optimizer_state_factor, max_front,
                                 best_value, deadline, stage_lb)
                start_value = best_value
                try:
                    value, summary = search.best()
                except SearchTimeout:
                    # a cell of r stages finished before the deadline is a real plan
                    for r in range(1, min(search.n, search.num_layers, m) + 1):
                        front = search._closed.get((r, 0, -1))
                        if front and front[0][0] < best_value:
                            keep(search, front[0][0], front[0], mb)
                    raise
                found[mb] = value
                if pass_ends is ends and max_front is None:
                    bounds[mb] = min(value, start_value)
                cells += len(search._closed)
                biggest = max(biggest, search.max_front_seen)
                log.debug("micro-batch %d, %d cuts: round %.6g s, %d cells", mb,
                          len(pass_ends), value, len(search._closed))
                keep(search, value, summary, mb)
                spent[mb] = len(search._closed)
                done += 1
                if progress is not None:
                    progress(done, steps, f"micro-batch {mb}", best_value)
            # the next pass starts with the most promising micro-batch sizes
            order.sort(key=lambda b: found.get(b, math.inf))
    except SearchTimeout:
        complete = False
    complete = complete and not skipped
    elapsed = time.perf_counter() - start
    if best_plan is not None:
        best_plan = replace(best_plan, planner=PlannerInfo("asteroid", DP_VERSION, elapsed))
    return DPResult(plan=best_plan, round_time_s=best_value, search_time_s=elapsed,
                    cells=cells, max_front=biggest, candidate_cuts=len(ends),
                    complete=complete, bounds=bounds, skipped=skipped,
                    ranking=tuple(sorted(mbs, key=lambda b: found.get(b, math.inf))))
