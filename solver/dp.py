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
candidate lists. Group compute times take the maximum over the devices that can decide
it (``_deciders``), memory checks over the devices that can bind first; both drop only
devices whose value is provably never larger. The searches of one ``asteroid_dp`` call
share prefix arrays, bound tables, interfaces and re-sharding times (``_Context``).

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
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple

import numpy as np

from contracts.cluster import Cluster
from contracts.errors import PlanError
from contracts.plan import SMALL_BUCKET_BYTES, Plan, PlannerInfo, Stage
from contracts.table import CostTable
from solver.bounds import StageBound, stage_bound
from solver.diagnose import no_fit_error
from solver.evaluate import (
    WORKSPACE_FRACTION,
    LayerSums,
    Pieces,
    accumulates,
    pieces_time,
    transient_gradient_bytes,
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
from solver.split import split_shares, split_stage
from solver.summary import PipelineSummary, Summary, dominates, hiding_ratio, prepend
from solver.timing import wire_counts

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

_NUMPY_LASTS = 16
"""Stage options use numpy for more candidate ``last`` layers than this."""

_KIND_TABLE_AFTER = 4
"""A group kind whose stage bases were built for this many first layers gets its
``_KindTable`` ([Note: kind tables])."""

_KIND_TABLES_MAX = 400
"""At most this many ``_KindTable`` per search (three floats per first and last layer
each: about 90 MB at the default 96 cuts); later kinds build their bases one by one."""

# A group kind's compute and T_a of every stage of one ``_Search``: arrays over (first
# layer's row, candidate last's column) of ``_Search._grid``.
_KindTable = tuple[np.ndarray, np.ndarray, np.ndarray]


def _np_stage_times(terms: dict[int, tuple[np.ndarray, ...]], deciders: Sequence[Any],
                    params: np.ndarray, info: Any) -> _KindTable:
    """``(compute_f, compute_b, T_a)`` of stages on a group, element by element over
    arrays of any shape (``_base``'s candidate lasts, or a kind table's whole grid): the
    slowest decider's compute, and T_a = the all-reduce (``allreduce_from``) plus the
    optimizer step on the slowest device (``Timing.group_update_time``), in the same float
    operations as ``evaluate``."""
    b, v, src = deciders[0]
    f_int, f_slope, b_int, b_slope = terms[src]
    cf = (f_int + f_slope * b) / v
    cb = (b_int + b_slope * b) / v
    for b, v, src in deciders[1:]:
        f_int, f_slope, b_int, b_slope = terms[src]
        cf = np.maximum(cf, (f_int + f_slope * b) / v)
        cb = np.maximum(cb, (b_int + b_slope * b) / v)
    size = info.size
    if size > 1:
        reduce = np.where(params > 0, 2.0 * (size - 1) * params.astype(np.float64)
                          / (size * info.min_bw) + 2.0 * (size - 1) * info.max_lat, 0.0)
    else:
        reduce = np.zeros(params.shape)
    pairs = info.update_pairs
    upb, div, fixed_s = pairs[0]
    step = (params * upb + fixed_s) / div
    for upb, div, fixed_s in pairs[1:]:
        step = np.maximum(step, (params * upb + fixed_s) / div)
    return cf, cb, reduce + step


class _Grid(NamedTuple):
    """``_layer_terms`` of every first layer at once ([Note: kind tables]): arrays over
    (first layer's row, candidate last's column), in the float operations of its numpy
    branch (cells of a ``last`` before ``first`` hold values never read)."""

    at: dict[int, tuple[int, int]]      # per first layer: its row and its first column
    lasts: list[int]                    # the candidate last layers, by column
    slopes: np.ndarray                  # slope sums (forward and backward)
    inters: np.ndarray                  # intercept sums
    terms: dict[int, tuple[np.ndarray, ...]]   # per time source: (fi, fs, bi, bs) with calls
    params: np.ndarray                  # parameter bytes (int64)
    fixed: np.ndarray                   # fixed bytes on one device
    fixed_dp: np.ndarray                # fixed bytes in a data-parallel group
    acts: np.ndarray                    # activation bytes per sample (int64)
    edges: list[int]                    # per column: the cut after the stage, per sample

# The options of one group kind: (shares, lasts, compute_f, compute_b, t_a).
_Option = tuple[tuple[int, ...], list[int], list[float], list[float], list[float]]

# The share-independent part of a group kind's options: (free shares, lasts, compute_f,
# compute_b, t_a, keep, fixed bytes, per sample the activations and the cut after the
# stage), lists over ``lasts``.
_Base = tuple[tuple[int, ...], list[int], list[float], list[float], list[float],
              int, list[float], list[tuple[int, int]]]

# The cut-offs of a cell ([Note: exact bounds]): (ghost when R >= this, ghost when M Xm +
# Pre >= this, drop a ghost when (M - (w-1)/2) max(Xm, head) + SumX >= this, drop any
# summary when (M - 1 - (w-1)/2) max(Xm, head) + SumX >= this, head, M - (w-1)/2,
# M - 1 - (w-1)/2, drop any summary when G >= this); with a cap only the first is finite.
_Bounds = tuple[float, float, float, float, float, float, float, float]


class SearchTimeout(Exception):
    """Raised inside a search when its deadline passes (``asteroid_dp`` catches it)."""


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


class _Context:
    """What the searches of one ``asteroid_dp`` call share: prefix sums as arrays, the
    space, interned interfaces and their re-sharding times, and per micro-batch size the
    bound tables and Algorithm-1 shares of every group."""

    def __init__(self, costs: CostTable, cluster: Cluster, space: SearchSpace,
                 sums: LayerSums) -> None:
        self.costs, self.cluster, self.sums, self.space = costs, cluster, sums, space
        timing = self.timing = space.timing
        self.np_src = [tuple(np.asarray(values, dtype=np.float64)
                             for values in (src.fwd_intercept, src.fwd_slope,
                                            src.bwd_intercept, src.bwd_slope))
                       for src in timing.sources]
        self.np_params = np.asarray(sums.param_bytes, dtype=np.int64)
        self.np_buffers = np.asarray(sums.buffer_bytes, dtype=np.int64)
        self.np_acts = np.asarray(sums.activation_bytes, dtype=np.int64)
        self.np_edges = np.asarray(sums.boundary_bytes or [0] * len(sums.activation_bytes),
                                   dtype=np.int64)   # LayerSums.in_flight_bytes
        self.np_layer_params = np.diff(self.np_params)   # LayerSums.largest_params
        # the base sums of the stage filter in _Search._layer_terms
        self.np_sums = tuple(np.asarray(values, dtype=np.float64)
                             for values in (sums.fwd_slope, sums.bwd_slope,
                                            sums.fwd_intercept, sums.bwd_intercept))
        self.rho = hiding_ratio(costs, cluster)
        # (group, shares) and (what the next stage receives from it, pool left) as small
        # integers; an interface keeps the first (group, shares) of its signature
        self.gs_ids: dict[tuple[int, tuple[int, ...]], int] = {}
        self.gs: list[tuple[int, tuple[int, ...]]] = []
        self.gs_sig: list[Any] = []
        self.iface_ids: dict[tuple[Any, int], int] = {}
        self.iface_gs: list[int] = []
        self.iface_pool: list[int] = []
        self.comm: dict[tuple[int, int, int], float] = {}
        self.pieces: dict[tuple[int, int], tuple[Pieces, int, int]] = {}
        self._per_mb: dict[int, tuple[list[float], list[float], list[float], list[float]]] = {}
        self._group_mb: dict[int, dict[int, Any]] = {}

    def gs_id(self, gid: int, shares: tuple[int, ...]) -> int:
        key = (gid, shares)
        found = self.gs_ids.get(key)
        if found is None:
            found = self.gs_ids[key] = len(self.gs)
            self.gs.append(key)
            self.gs_sig.append(self.space.signature(gid, shares))
        return found

    def iface(self, gs: int, pool: int) -> int:
        """The interface of a stage on ``gs`` that leaves ``pool``: stages whose groups
        send the same way (``SearchSpace.signature``) share it ([Note: DP cells])."""
        key = (self.gs_sig[gs], pool)
        found = self.iface_ids.get(key)
        if found is None:
            found = self.iface_ids[key] = len(self.iface_gs)
            self.iface_gs.append(gs)
            self.iface_pool.append(pool)
        return found

    def transfer(self, prev_gs: int, cur_gs: int, first: int) -> float:
        """Re-sharding time of the cut before layer ``first`` between two (group, shares)."""
        key = (prev_gs, cur_gs, first)
        value = self.comm.get(key)
        if value is None:
            pair = (prev_gs, cur_gs)
            found = self.pieces.get(pair)
            if found is None:
                pg, pshares = self.gs[prev_gs]
                cg, shares = self.gs[cur_gs]
                found = self.pieces[pair] = (self.space.pieces(pg, pshares, cg, shares),
                                             len(pshares), len(shares))
            value = self.comm[key] = pieces_time(found[0], found[1], found[2],
                                                 self.costs.cut_bytes[first - 1])
        return value

    def for_micro_batch(self, mb: int) -> tuple[list[float], list[float], list[float],
                                                 list[float]]:
        """``(work, work_i, head_f, head_x)`` for micro-batches of ``mb`` samples: compute
        of layers ``l..`` for one micro-batch at speed 1, per sample (``work``) and with the
        intercepts (``work_i``); ``head_f`` / ``head_x``: the same of layers ``< l``,
        forward only / forward and backward, with the intercepts."""
        found = self._per_mb.get(mb)
        if found is not None:
            return found
        sums = self.sums
        layers = range(sums.num_layers + 1)
        work = [(sums.fwd_slope[-1] - sums.fwd_slope[first]
                 + sums.bwd_slope[-1] - sums.bwd_slope[first]) * mb for first in layers]
        work_i = [work[first] + (sums.fwd_intercept[-1] - sums.fwd_intercept[first]
                                 + sums.bwd_intercept[-1] - sums.bwd_intercept[first])
                  for first in layers]
        head_f = [sums.fwd_intercept[first] + sums.fwd_slope[first] * mb for first in layers]
        head_x = [head_f[first] + sums.bwd_intercept[first] + sums.bwd_slope[first] * mb
                  for first in layers]
        found = self._per_mb[mb] = (work, work_i, head_f, head_x)
        return found

    def group_mb(self, mb: int, kind: int) -> Any:
        """``(free shares, compute deciders, memory holders (share, bytes))`` of the groups
        of ``kind`` for micro-batches of ``mb`` samples, or None when they have more
        devices than samples. A device with at most the share of another and at least its
        speed (memory) never decides (the float operations are monotone, so dropping it
        changes no bit)."""
        table = self._group_mb.setdefault(mb, {})
        if kind in table:
            return table[kind]
        space = self.space
        info = space.group(space.kind_group[kind])
        shares = split_shares(mb, info.speeds)
        if shares is None:
            table[kind] = None
            return None
        members = list(zip(shares, info.members, strict=True))
        deciders = _source_deciders([(share, space.divs[d], space.srcs[d])
                                     for share, d in members])
        caps = space.caps
        holders = [(share, caps[d]) for share, d in members
                   if not any((s2 >= share and caps[d2] <= caps[d])
                              and (s2, -caps[d2], d2) > (share, -caps[d], d)
                              for s2, d2 in members)]
        found = table[kind] = (shares, deciders, holders)
        return found


class _Search:
    """The DP for one micro-batch size (see the module notes)."""

    def __init__(self, ctx: _Context, ends: list[int], micro_batch: int, num_micro: int,
                 osf: float, max_front: int | None, incumbent: float = math.inf,
                 deadline: float | None = None, bound: StageBound | None = None) -> None:
        self.ctx = ctx
        self.bound = bound
        self.space = ctx.space
        self.costs, self.sums, self.timing = ctx.costs, ctx.sums, ctx.timing
        self.osf = osf
        self.mb, self.m = micro_batch, num_micro
        self.n = ctx.space.n
        self.work, self.work_i, self.head_f, self.head_x = ctx.for_micro_batch(micro_batch)
        self.num_layers = ctx.costs.num_layers
        self.ends = ends  # candidate last layers of a non-final stage
        self.max_front = max_front
        self.deadline = deadline
        self._layers: dict[tuple[int, bool], tuple[Any, ...]] = {}
        self._bases: dict[tuple[int, int, bool], _Base | None] = {}
        # [Note: kind tables]: bases built per (kind, final), the tables, the grids
        self._kind_misses: dict[tuple[int, bool], int] = {}
        self._kind_tables: dict[tuple[int, bool], _KindTable] = {}
        self._grids: dict[bool, _Grid] = {}
        self._options: dict[tuple[int, int, int, bool, float], list[_Option]] = {}
        self._pool_options: dict[tuple[int, int, int, bool, int],
                                 list[tuple[int, int, list[_Option]]]] = {}
        self._closed: dict[tuple[int, int, int], list[Summary]] = {}
        self._kind_cache: dict[int, tuple[int, list[tuple[bool, int, list[tuple[int, int]]]]]] = {}
        # wire_counts by (in flight, final)
        self._wires: dict[tuple[int, bool], tuple[int, int]] = {}
        # fronts as float arrays, by id() of the (cached, hence alive) front list
        self._arrays: dict[int, Any] = {}
        self.max_front_seen = 0
        self.incumbent = incumbent
        self.rho = ctx.rho
        self._top_speed = ctx.space.best_speed(ctx.space.root, micro_batch)

    # -- stage costs --------------------------------------------------------------------
    def _layer_terms(self, first: int, final: bool) -> tuple[Any, ...]:
        """Per candidate ``last`` (up to where even the fastest group of the cluster costs
        ``M X >= incumbent``): the stage's slope and intercept sums, per time source its
        (fwd intercepts, fwd slopes, bwd intercepts, bwd slopes), params, and the memory
        parts (fixed bytes; per sample the activations and the cut after the stage), as
        numpy arrays for long lists and Python lists for short ones, in the float
        operations of ``LayerSums``,
        ``allreduce_from`` and ``stage_memory_parts``."""
        key = (first, final)
        found = self._layers.get(key)
        if found is not None:
            return found
        sums = self.sums
        m, inc, mb = self.m, self.incumbent, self.mb
        inc_hi = inc * (1.0 + 1e-9)
        speed = self._top_speed
        grid = self._grid(final)
        spot = grid.at.get(first)
        if spot is not None:
            # the row of the grid ([Note: kind tables]): the same numbers
            row, col = spot
            slope_r, inter_r = grid.slopes[row, col:], grid.inters[row, col:]
            over = (m * slope_r * mb / speed >= inc) | (m * (inter_r + slope_r * mb) / speed
                                                        >= inc_hi)
            cut = int(np.argmax(over)) if over.any() else len(over)
            end = col + cut
            use_np = cut > _NUMPY_LASTS
            spans = {src: tuple(t[row, col:end] for t in ts) for src, ts in grid.terms.items()}
            params_r = grid.params[row, col:end]
            found = (grid.lasts[col:end], slope_r[:cut].tolist(), inter_r[:cut].tolist(),
                     spans if use_np else {src: list(zip(*(t.tolist() for t in ts),
                                                         strict=True))
                                           for src, ts in spans.items()},
                     params_r if use_np else params_r.tolist(),
                     grid.fixed[row, col:end].tolist(), grid.fixed_dp[row, col:end].tolist(),
                     list(zip(grid.acts[row, col:end].tolist(), grid.edges[col:end],
                              strict=True)), use_np)
            self._layers[key] = found
            return found
        candidates = [self.num_layers - 1] if final else [e for e in self.ends if e >= first]
        lasts: list[int] = []
        slopes: list[float] = []
        inters: list[float] = []
        if len(candidates) > _NUMPY_LASTS:
            # the loop below over every candidate at once, in the same float operations
            stop = np.asarray(candidates) + 1
            f_s, b_s, f_i, b_i = self.ctx.np_sums
            slope_a = f_s[stop] - f_s[first] + b_s[stop] - b_s[first]
            inter_a = f_i[stop] - f_i[first] + b_i[stop] - b_i[first]
            over = (m * slope_a * mb / speed >= inc) | (m * (inter_a + slope_a * mb) / speed
                                                         >= inc_hi)
            cut = int(np.argmax(over)) if over.any() else len(candidates)
            lasts = candidates[:cut]
            slopes = slope_a[:cut].tolist()
            inters = inter_a[:cut].tolist()
            candidates = []
        for last in candidates:
            slope = (sums.fwd_slope[last + 1] - sums.fwd_slope[first]
                     + sums.bwd_slope[last + 1] - sums.bwd_slope[first])
            if m * slope * mb / speed >= inc:
                break
            inter = (sums.fwd_intercept[last + 1] - sums.fwd_intercept[first]
                     + sums.bwd_intercept[last + 1] - sums.bwd_intercept[first])
            if m * (inter + slope * mb) / speed >= inc_hi:
                break
            lasts.append(last)
            slopes.append(slope)
            inters.append(inter)
        use_np = len(lasts) > _NUMPY_LASTS
        sources = self.timing.sources
        used = sorted(set(self.space.srcs))
        if not lasts:
            found = (lasts, slopes, inters, {}, [], [], [], [], use_np)
        elif use_np:
            stop = np.asarray(lasts) + 1
            terms: dict[int, Any] = {}
            for src in used:
                f_i, f_s, b_i, b_s = (a[stop] - a[first] for a in self.ctx.np_src[src])
                # LayerSums.fwd_time's float operations: (sum + call) + slope * share
                terms[src] = (f_i + sources[src].call_fwd, f_s, b_i + sources[src].call_bwd,
                              b_s)
            params = self.ctx.np_params[stop] - self.ctx.np_params[first]
            largest = np.maximum.accumulate(self.ctx.np_layer_params[first:])[stop - 1 - first]
            # stage_memory_parts over all `last` at once (exact while bytes stay below 2**53),
            # for one device and for a data-parallel group (transient_gradient_bytes)
            held = (np.ceil(params * (2.0 + self.osf))
                    + (self.ctx.np_buffers[stop] - self.ctx.np_buffers[first]))
            bucket = np.minimum(params, np.maximum(largest, SMALL_BUCKET_BYTES))
            fixed_dp = (held + bucket).tolist()
            fixed = (held + largest).tolist() if accumulates(self.m, self.osf) \
                else held.tolist()
            # LayerSums.flight_bytes' parts: activations, and the cut after the stage
            acts = list(zip((self.ctx.np_acts[stop] - self.ctx.np_acts[first]).tolist(),
                            self.ctx.np_edges[stop].tolist(), strict=True))
            found = (lasts, slopes, inters, terms, params, fixed, fixed_dp, acts, use_np)
        else:
            pb, bb = sums.param_bytes, sums.buffer_bytes
            factor = 2.0 + self.osf
            params_l = [pb[last + 1] - pb[first] for last in lasts]
            grows = accumulates(self.m, self.osf)
            held_l = [math.ceil(p * factor) + (bb[last + 1] - bb[first])
                      for p, last in zip(params_l, lasts, strict=True)]
            fixed = [float(h + transient_gradient_bytes(sums, first, last, 1, grows))
                     for h, last in zip(held_l, lasts, strict=True)]
            fixed_dp = [float(h + transient_gradient_bytes(sums, first, last, 2))
                        for h, last in zip(held_l, lasts, strict=True)]
            edges = sums.boundary_bytes
            acts = [(sums.activations(first, last), edges[last + 1] if edges else 0)
                    for last in lasts]
            terms = {}
            for src in used:
                t = sources[src]
                fi, fs, bi, bs = t.fwd_intercept, t.fwd_slope, t.bwd_intercept, t.bwd_slope
                cf_t, cb_t = t.call_fwd, t.call_bwd
                terms[src] = [(fi[last + 1] - fi[first] + cf_t, fs[last + 1] - fs[first],
                               bi[last + 1] - bi[first] + cb_t, bs[last + 1] - bs[first])
                              for last in lasts]
            found = (lasts, slopes, inters, terms, params_l, fixed, fixed_dp, acts, use_np)
        self._layers[key] = found
        return found

    def _base(self, first: int, kind: int, final: bool) -> _Base | None:
        """The flight-independent part of ``options``: the group's free shares (Algorithm 1
        without a memory cap), the candidate ``last`` layers and their compute times, T_a
        and memory parts. Candidates stop once even a perfectly balanced split over the
        group costs ``M X >= incumbent`` (compute only grows with ``last``). Times are
        bit-identical to ``evaluate``'s."""
        key = (first, kind, final)
        if key in self._bases:
            return self._bases[key]
        self._bases[key] = None
        per = self.ctx.group_mb(self.mb, kind)
        if per is None:
            return None
        free, deciders, _ = per
        info = self.space.group(self.space.kind_group[kind])
        lasts_all, slopes, inters, terms, params, fixed, fixed_dp, acts, use_np = \
            self._layer_terms(first, final)
        m, inc, mb = self.m, self.incumbent, self.mb
        inc_hi = inc * (1.0 + 1e-9)
        speed = info.bound_speed
        # the stages that even a perfectly balanced split cannot keep below the incumbent
        # (slopes and intercepts only grow with `last`): bisect the first of them
        count, hi_k = 0, len(slopes)
        while count < hi_k:
            mid = (count + hi_k) // 2
            if (m * slopes[mid] * mb / speed >= inc
                    or m * (inters[mid] + slopes[mid] * mb) / speed >= inc_hi):
                hi_k = mid
            else:
                count = mid + 1
        if not count:
            return None
        lasts = lasts_all[:count]
        size = info.size
        pairs = info.update_pairs
        table = self._kind_table(kind, final, first)
        if table is not None:
            # [Note: kind tables]: the row of the kind's table, the same float operations
            row, col = self._grid(final).at[first]
            cf_a, cb_a, ta_a = table
            cf_l = cf_a[row, col:col + count].tolist()
            cb_l = cb_a[row, col:col + count].tolist()
            ta = ta_a[row, col:col + count].tolist()
            # compute grows with `last`: stages from `keep` on cost M X >= incumbent
            keep, hi_k = 0, count
            while keep < hi_k:
                mid = (keep + hi_k) // 2
                if m * (cf_l[mid] + cb_l[mid]) >= inc:
                    hi_k = mid
                else:
                    keep = mid + 1
        elif use_np:
            cf, cb, ta_np = _np_stage_times(
                {src: tuple(a[:count] for a in terms[src]) for _b, _v, src in deciders},
                deciders, params[:count], info)
            ta = ta_np.tolist()
            # compute grows with `last`: stages past `keep` cost M X >= incumbent
            keep = int(np.count_nonzero(m * (cf + cb) < inc))
            cf_l, cb_l = cf.tolist(), cb.tolist()
        else:
            cf_l, cb_l = [], []
            if len(info.sources) == 1:
                for f_i, f_s, b_i, b_s in terms[info.sources[0]][:count]:
                    cf_l.append(max((f_i + f_s * b) / v for b, v, _ in deciders))
                    cb_l.append(max((b_i + b_s * b) / v for b, v, _ in deciders))
            else:
                for k in range(count):
                    cf_l.append(max((terms[src][k][0] + terms[src][k][1] * b) / v
                                    for b, v, src in deciders))
                    cb_l.append(max((terms[src][k][2] + terms[src][k][3] * b) / v
                                    for b, v, src in deciders))
            min_bw, lat = info.min_bw, info.max_lat
            upb, slowest, fixed_s = pairs[0]
            if len(pairs) == 1:
                steps = [(p * upb + fixed_s) / slowest for p in params[:count]]
            else:
                steps = [max((p * u + r) / d for u, d, r in pairs) for p in params[:count]]
            ta = [(2.0 * (size - 1) * p / (size * min_bw) + 2.0 * (size - 1) * lat
                   if size > 1 and p > 0 else 0.0)
                  + step for p, step in zip(params[:count], steps, strict=True)]
            keep = 0
            for x_f, x_b in zip(cf_l, cb_l, strict=True):
                if m * (x_f + x_b) >= inc:
                    break
                keep += 1
        held = fixed if size == 1 else fixed_dp     # a group's all-reduce bucket copy
        found = (free, lasts, cf_l, cb_l, ta, keep, held[:count], acts[:count])
        self._bases[key] = found
        return found

    def _grid(self, final: bool) -> _Grid:
        """The ``_Grid`` of the final stage or of the others ([Note: kind tables]): rows
        for the first layers (0 and after each candidate end), columns for the candidate
        last layers."""
        found = self._grids.get(final)
        if found is not None:
            return found
        ctx = self.ctx
        lasts = [self.num_layers - 1] if final else list(self.ends)
        firsts = [0, *(e + 1 for e in self.ends if e + 1 < self.num_layers)]
        at = {f: (k, 0 if final else bisect_left(lasts, f)) for k, f in enumerate(firsts)}
        stop = np.asarray(lasts, dtype=np.intp) + 1
        rows = np.asarray(firsts, dtype=np.intp)

        def span(a: np.ndarray) -> np.ndarray:
            """``a[stop] - a[first]`` over (row, column)."""
            out: np.ndarray = a[stop][None, :] - a[rows][:, None]
            return out

        f_s, b_s, f_i, b_i = ctx.np_sums
        slopes = span(f_s) + b_s[stop][None, :] - b_s[rows][:, None]
        inters = span(f_i) + b_i[stop][None, :] - b_i[rows][:, None]
        sources = self.timing.sources
        terms: dict[int, tuple[np.ndarray, ...]] = {}
        for src in sorted(set(self.space.srcs)):
            s_fi, s_fs, s_bi, s_bs = (span(a) for a in ctx.np_src[src])
            terms[src] = (s_fi + sources[src].call_fwd, s_fs, s_bi + sources[src].call_bwd,
                          s_bs)
        params = span(ctx.np_params)
        # the largest layer's params from `first` to `last` (LayerSums.largest_params)
        largest = np.zeros_like(params)
        for k, first in enumerate(firsts):
            ahead = stop > first
            if ahead.any():
                largest[k, ahead] = np.maximum.accumulate(
                    ctx.np_layer_params[first:])[stop[ahead] - 1 - first]
        # stage_memory_parts (exact while bytes stay below 2**53), for one device and for
        # a data-parallel group (transient_gradient_bytes)
        held = np.ceil(params * (2.0 + self.osf)) + span(ctx.np_buffers)
        bucket = np.minimum(params, np.maximum(largest, SMALL_BUCKET_BYTES))
        fixed = held + largest if accumulates(self.m, self.osf) else held
        found = self._grids[final] = _Grid(at, lasts, slopes, inters, terms, params, fixed,
                                           held + bucket, span(ctx.np_acts),
                                           ctx.np_edges[stop].tolist())
        return found

    def _kind_table(self, kind: int, final: bool, first: int) -> _KindTable | None:
        """``(compute_f, compute_b, t_a)`` of every stage of the grid on a group of
        ``kind`` ([Note: kind tables]), built once the kind's bases were built for
        ``_KIND_TABLE_AFTER`` first layers; None before that or where ``first`` is not on
        the grid.

        [Note: kind tables]
        A group kind's bases are asked for at nearly every first layer in the order's
        space (every slice of the order at every candidate cut), and building each from
        its own short lists costs more in Python and small numpy calls than the arithmetic
        itself. So once a kind has been asked for a few first layers, its compute times
        and ``T_a`` are computed for every (first, last) of the grid at once, in the float
        operations of ``_base``'s numpy branch element by element (``_base``'s Python
        branch gives the same bits), and each later base reads its row. The incumbent's
        cut-offs still come from ``_layer_terms`` and the count bisection; ``keep`` is
        bisected on the row (compute grows with ``last``). ``tests/test_dp.py`` checks the
        tables against the bases built without them."""
        key = (kind, final)
        table = self._kind_tables.get(key)
        if table is not None:
            return table if first in self._grid(final).at else None
        misses = self._kind_misses[key] = self._kind_misses.get(key, 0) + 1
        if misses <= _KIND_TABLE_AFTER or len(self._kind_tables) >= _KIND_TABLES_MAX:
            return None
        grid = self._grid(final)
        if first not in grid.at:
            return None
        deciders = self.ctx.group_mb(self.mb, kind)[1]
        info = self.space.group(self.space.kind_group[kind])
        table = self._kind_tables[key] = _np_stage_times(grid.terms, deciders, grid.params,
                                                         info)
        return table

    def options(self, first: int, kind: int, flight: int, final: bool,
                rest: float) -> list[_Option]:
        """Stages starting at layer ``first`` on a group of ``kind`` with ``flight``
        micro-batches in flight (``final``: the last stage, else one that ends before the
        last layer and leaves devices of at most ``rest`` bound speed for the tail), as
        ``(shares, lasts, compute_f, compute_b, t_a)``: one stage per ``last``
        (ascending).

        The free shares (Algorithm 1 without a memory cap) have compute times
        non-decreasing in ``last``; memory-capped stages come one per entry, in the order
        of their ``last``. The free entry stops where its own compute reaches ``M X >=
        incumbent`` (the recursion would drop those, and the incumbent only decreases) and
        where a device runs out of memory (memory only grows with ``last``); then
        Algorithm 1 caps the shares until the group cannot hold the stage at all."""
        key = (first, kind, flight, final, rest)
        found = self._options.get(key)
        if found is not None:
            return found
        out: list[_Option] = []
        self._options[key] = out
        base = self._base(first, kind, final)
        if base is None:
            return out
        free, sel, cf, cb, ta, keep, fixed, acts = base
        m, inc = self.m, self.incumbent
        holders = self.ctx.group_mb(self.mb, kind)[2]
        frac = WORKSPACE_FRACTION
        # LayerSums.flight_bytes: activations of `flight` micro-batches and wire buffers
        edges = self.sums.boundary_bytes
        wires = self._wires.get((flight, final))
        if wires is None:
            wires = self._wires[(flight, final)] = wire_counts(flight, m, final)
        ins, outs = wires
        wire_in = ins * (edges[first] if edges else 0)

        def fit(k: int) -> bool:
            act, c_out = acts[k]
            per = act * flight + wire_in + outs * c_out
            for b, cap in holders:  # memory_from_parts, in the same float operations
                a = per * b
                if fixed[k] + a + math.ceil(a * frac) > cap:
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
        # where the devices left cannot take the tail below the incumbent ([Note:
        # candidate windows]), the window starts later
        start = 0
        if not final:
            limit = self.incumbent * (1.0 + 1e-9) / m
            work = self.work_i
            if rest <= 0.0 or work[sel[-1] + 1] / rest >= limit:
                return out
            hi_k = len(sel) - 1
            while start < hi_k:
                mid = (start + hi_k) // 2
                if work[sel[mid] + 1] / rest >= limit:
                    start = mid + 1
                else:
                    hi_k = mid
        n_free = min(fits, keep)
        if n_free > start:
            if start:
                out.append((free, sel[start:n_free], cf[start:n_free], cb[start:n_free],
                            ta[start:n_free]))
            elif n_free < len(sel):
                out.append((free, sel[:n_free], cf[:n_free], cb[:n_free], ta[:n_free]))
            else:   # the base's own lists (nothing writes to them)
                out.append((free, sel, cf, cb, ta))
        if fits == len(sel):    # no stage of the group is memory-capped
            return out
        info = self.space.group(self.space.kind_group[kind])
        for k in range(max(fits, start), len(sel)):
            last = sel[k]
            shares = split_stage(self.sums, first, last, info.speeds, info.caps, self.mb,
                                 flight, self.osf, free, num_micro_batches=m)
            if shares is None:  # longer stages need even more memory
                break
            cfs, cbs = self.timing.compute(first, last, info.names, shares)
            if m * (cfs + cbs) >= inc:
                continue
            out.append((shares, [last], [cfs], [cbs], [ta[k]]))
        return out

    def _usable(self, first: int, groups: list[tuple[int, int]], flight: int,
                final: bool, need: int) -> list[tuple[int, int, list[_Option]]]:
        """``(group, pool left, options)`` of the groups of a pool that have options and
        leave at least ``need`` devices."""
        out = []
        space = self.space
        kinds_of, options, sizes = space.group_kind, self._options, space.pool_sizes
        for gid, left in groups:
            if sizes[left] < need:
                continue
            kind = kinds_of[gid]
            rest = 0.0 if final else space.rest_speed(gid, left)
            opts = options.get((first, kind, flight, final, rest))
            if opts is None:
                opts = self.options(first, kind, flight, final, rest)
            if opts:
                out.append((gid, left, opts))
        return out

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
    context = _Context(costs, cluster, searched, sums)
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
