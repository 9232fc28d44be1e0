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

import bisect
import heapq
import itertools
import math
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from solver.evaluate import WORKSPACE_FRACTION
from solver.space import ClassSpace, SearchSpace, SliceSpace
from solver.timing import LayerSums

__all__ = ["StageBound", "stage_bound", "proven_bound", "GRID", "class_bound",
           "bound_classes", "counts_pools", "counted_classes", "CLASS_GROUPS_MAX",
           "CLASS_POOLS_MAX", "CLASS_COUNTED_STATES"]

GRID = 8
"""Values ``T_j`` of the largest stage time the fill bound (F) is split over."""

_SLACK = 1.0 - 1e-9
_ABOVE = 1.0 + 1e-9
_TAIL_SLACK = 1.0 - 1e-6
_CUT_ABOVE = 1.0 + 1e-6
"""``_counted`` skips a pool only where its speed falls short of the suffix's work, and a
stage only where its plans' lower bounds reach the limit, by more than the float error of
the tables' sums (each ``x`` is at least its work over its group's bound speed times
``_SLACK``)."""


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


@dataclass(frozen=True)
class _Links:
    """Every link of a space's devices, by device index: ``bw[a, b]`` the bandwidth from
    ``a`` to ``b`` (bytes/s) and ``lat[a, b]`` its latency (s), the numbers of
    ``Cluster.bandwidth_bytes_s`` and ``Cluster.latency_s`` (the diagonal: ``-inf`` and
    ``inf``, no link); ``sym_bw`` and ``sym_lat`` the faster way and the smaller latency
    of each pair. Read once per space (``_links``): the helpers below asked the cluster
    again for every pair of every table, O(n^3) lookups per table for ``_pair_links``
    (4 s of 15 in the class bound on 64 Jetsons)."""

    bw: np.ndarray
    lat: np.ndarray
    sym_bw: np.ndarray
    sym_lat: np.ndarray
    pairs: dict[Any, Any] = field(default_factory=dict)    # _pair_links' results


_LINKS: weakref.WeakKeyDictionary[SearchSpace, _Links] = weakref.WeakKeyDictionary()


def _links(space: SearchSpace) -> _Links:
    """The space's ``_Links``, read from its cluster on the first call."""
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
        found = _LINKS[space] = _Links(bw, lat, np.maximum(bw, bw.T), np.minimum(lat, lat.T))
    return found


def _in_bandwidth(space: SearchSpace) -> list[float]:
    """The fastest link into each device of the space (bytes/s; inf alone)."""
    if space.n < 2:
        return [math.inf] * space.n
    return [float(v) for v in _links(space).bw.max(axis=0)]


def _min_latency(space: SearchSpace) -> float:
    if space.n < 2:
        return 0.0
    return float(_links(space).lat.min())


def _min_max_ratio(micro_batch: int, rates: Sequence[float]) -> float | None:
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
    bw_in = _in_bandwidth(space)
    lat0 = _min_latency(space)
    # per slice group (devices c..c+size-1): its constants
    rows = []
    for c in range(n):
        for gid, _ in space.groups(c, n):
            info = space.group(gid)
            us = [space.bounds[d] for d in info.members]
            beta = _min_max_ratio(micro_batch, us)
            gamma = _min_max_ratio(micro_batch, [bw_in[d] for d in info.members])
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
        x = (i_s[None] * inv_u[:, None] + s_s[None] * beta_g[:, None]) * _SLACK \
            + comm[:, None] * _SLACK                                      # (G, lasts)
        ta = (np.where(p_s[None] > 0, p_s[None] * red_a[:, None] + red_b[:, None], 0.0)
              + p_s[None] * step_g[:, None]) * _SLACK
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


# -- the class bound: every order, as counts of each class ----------------------------------
CLASS_GROUPS_MAX = 1500
"""``class_bound`` uses at most this many groups (count vectors); above, groups with
counts in the same geometric bucket of every class merge into one that is at least as
good as each of them."""

CLASS_VECTORS_MAX = 20_000
"""``class_bound`` counts devices in coarser classes (same compute, links bounded by
their best) on clusters with more count vectors than this (``prod (n_k + 1)`` over the
classes), and gives up (None) where those too have more."""

CLASS_POOLS_MAX = 128
"""``class_bound`` counts the devices of every relaxed plan exactly (no prices) and reads
each transfer at the links of the stage before, where the classes have at most this
many count vectors (``prod (n_k + 1)``): [Note: counted pools]. The 200-layer MLP on
eight mixed devices has 72; BERT-small on the 16-device fleet (252, coarse classes)
was measured slower than its time limit with them, so it keeps the prices."""

CLASS_BUCKETS = 10
"""Buckets of the dominant stage's ``X`` in ``class_bound``'s first grid."""

CLASS_COUNTED_BUCKETS = 2
CLASS_COUNTED_EVALS = 40
"""The first grid and the most DP runs of ``class_bound`` where the pools are counted:
its DP proves wide buckets more often, and each run is cheap (measured on issue 14's
MLP: every micro-batch size proven with 2 buckets, 2-18 runs)."""

_BUCKET_RATIO = 0.93
"""Each bucket's top is this share of the next one's in the first grid."""

_COUNTED_BUCKET_RATIO = _BUCKET_RATIO ** 2
"""``_BUCKET_RATIO`` of the counted bound's first grid: ``(0, r T]`` and ``(r T, T]`` for
``T = target / M``. The top bucket has ``M X_d > r target``, and the counted DP nearly
always proves the rest there at once; where it does not, its split at ``sqrt(r) T`` gives
the two top buckets of a grid of ratio ``sqrt(r)`` (one run more). Measured against
three buckets of ratio 0.93 on eight mixed devices (issue 14): the 200-layer MLP at
batch 32, 64 and 128, ResNet-50, BERT-small and MobileNetV2, the same bound of every
micro-batch size in 40-106 runs instead of 46-111 (one run fewer for most sizes, one more
for two sizes of BERT-small)."""

_FINEST = 0.992
"""Buckets narrower than this ratio are not split."""

_FINEST_LOW = 0.05
"""The lowest bucket (from 0) is not split below this share of ``target / M``."""

_REACHED = 1.0 - 1e-6
"""A bucket whose bound is within this share of the target is not split (the float
slack of the tables keeps a bucket that holds a plan of the target's round just below
it)."""

_TERMS_AT_ONCE = 200_000
"""``_counted_run`` computes the terms of every stage of a run at once where they have at
most this many values (stages x sender profiles), else per row for the stages it keeps."""

_AFTER_LEVELS = 4
"""Stages right after the dominant one whose all-reduce ``_relaxed`` checks."""

_PRICED_AFTER_LEVELS = 12
"""The same for ``_relaxed`` (each level costs it little: one table of suffixes by ``a``);
a deep pipeline after the dominant stage otherwise hides all-reduces behind
``_rest_gate``, which is no bound past ``j (1 - rho) > M``."""

_CHORD_POINTS = 3
"""``a`` values at which ``_relaxed`` takes the dominant stage's minimum exactly."""

_PRICE_START = 0.1
_PRICE_MIN, _PRICE_MAX = 1e-6, 1e6
_PRICE_STEP = 4.0
"""Device prices (Lagrange multipliers) in units of (bucket top) x (bound speed /
fastest): the first tried, and the factor of the walk along their ray."""

CLASS_COUNTED_STATES = 2000
"""The polish of ``class_bound``'s priced bound counts the devices of its slowest classes
exactly where that takes at most this many states (``prod (n_k + 1)`` over them): [Note:
counted classes]."""

_COUNT_SPAN = 1.06
"""A bucket of ``X_d`` whose slowest classes ``class_bound`` counts is counted together
with its neighbours within this ratio of ``top`` to ``low`` (``_count_span``)."""

_COUNTED_DTYPE: type[np.floating[Any]] = np.float32
"""The tables of ``_relaxed_many`` where classes are counted ([Note: counted classes]):
single precision, 1.7 times quicker than double on ResNet-50 x 32 Jetsons with all
three classes counted (2.9 s a pass against 5.0 s); its rounding is taken off the value."""

_POLISH_BEFORE_COUNT = 4
"""[Note: the polish before counting]: rounds of a bucket's polish where its classes are
counted next.

[Note: the polish before counting]
With ``count=True`` a bucket that still sets the bound after its polish is counted, but
not once ``class_bound`` has made ``2 max_evals`` DP runs, and the polish itself had no
cap: on ResNet-50 x 32 Jetsons (micro-batch 8, target 0.8208 s) the polish of (0.07675,
0.08253] s took 10 runs of 26 prices each, from 0.7847 to 0.8141 s, and left no runs to
count it; the bound fell short (0.8141 s in 4.6 s), while at 0.8218 s, whose grid put
that bucket at (0.07684, 0.08263] s, three polish runs reached 0.8017 s and counting two
classes then 0.8267 s (0.8218 s proven in 3.5 s). Where classes are counted next the
polish now stops after this many rounds: 0.8208 s proven in 3.9-4.1 s (3 and 4 rounds;
6: 4.4 s), 0.8218 s the same."""

_CLASS_PRICE_STEP, _CLASS_PRICE_FINEST = 2.0, 1.02
_PATTERN_CLASSES = 4
"""The polish of [Note: prices per class]: the classes' factors from ``_CLASS_PRICE_STEP``
down to ``_CLASS_PRICE_FINEST``, every combination up to ``_PATTERN_CLASSES`` classes."""


@dataclass(frozen=True)
class _ClassTables:
    """Per first layer ``firsts[i]``: ``(x, big, t_a, next, shortest)``: lower bounds of
    the stage's ``X = E_f + E_b`` and ``max(E_f, E_b)`` and its exact ``T_a`` (groups x
    candidate ends), the row of the layer after each end, and the smallest ``x`` over the
    groups per end (non-decreasing); ``counts``: devices per class of each group.
    ``pooled``, where the pools are counted ([Note: counted pools]): per group and sender
    profile the smallest latency and the smallest ``max_e b_e / bw_e`` of a transfer into
    the group from a group of that profile; each group's own profile as a sender; per row
    the work of the layers before it and of the layers from it on, ``sum (intercepts +
    slopes b)`` forward and backward; the pools (count vectors of the classes, in the order
    of ``np.unravel_index`` over ``totals + 1``): ``src[g, q]``, the pool a suffix leaves
    after a stage on group ``g`` when it uses ``q`` (``n_pools``: none), the devices in
    each pool (and 0 for none), the bound speed each pool leaves free and the bound speed
    in it; and per row what ``_counted`` reads: the transfer bounds (groups x profiles),
    ``x`` without them, ``x`` with the smallest, the upper bound of ``_rigid_uppers``
    (groups x ends; inf: none), the compute part of ``max(E_f, E_b)``, ``T_a``, the next
    rows and the non-decreasing smallest ``x`` per end."""

    firsts: tuple[int, ...]
    rows: tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], ...]
    counts: np.ndarray
    totals: np.ndarray
    speeds: np.ndarray
    pooled: _Pooled | None = None
    uppers: tuple[np.ndarray, ...] = ()
    fast: np.ndarray | None = None
    """Per group, the members it lets receive over a partner's link (priced tables where
    [Note: partner links] applies; None elsewhere), at most ``fast_total`` in a plan."""
    fast_total: float = 0.0
    work: tuple[np.ndarray, np.ndarray] | None = None
    """Per row the work of the layers before it and of the layers from it on (as in
    ``_Pooled``), where every group's ``x`` is at least its work over its bound speed
    (priced tables with no merged groups; None elsewhere): [Note: states by speed]."""


@dataclass(frozen=True)
class _Pooled:
    """The parts of ``_ClassTables`` that ``_counted`` needs (see there)."""

    latency: np.ndarray
    gamma: np.ndarray
    profile: np.ndarray
    head: np.ndarray
    tail: np.ndarray
    src: np.ndarray
    sizes: np.ndarray
    free_speed: np.ndarray
    speed: np.ndarray
    rows: tuple[tuple[np.ndarray, ...], ...]
    flat: dict[tuple[float, float], _Flat] = field(default_factory=dict, compare=False)
    """``_flat_stages`` by its caps (``top``, ``T_a`` limit)."""


@dataclass(frozen=True)
class _Flat:
    """The stages of every row of a ``_Pooled`` whose ``lowest`` and ``T_a`` are below caps,
    one array per field, rows in order (``row``): the group, the row after the stage
    (``nxt``), the smallest ``x`` of its row's ends up to its own (``shortest``: a run
    with ``top`` below it does not take the stage), ``lowest``, ``T_a``, the upper bound
    ``upper``, ``x`` and the bound of ``max(E_f, E_b)`` without the transfers (``x0``,
    ``big0``), and the transfer bounds of every row (rows x groups x sender profiles):
    what ``_counted_run`` reads per row, gathered once for every run."""

    row: np.ndarray
    group: np.ndarray
    nxt: np.ndarray
    shortest: np.ndarray
    lowest: np.ndarray
    t_a: np.ndarray
    upper: np.ndarray
    x0: np.ndarray
    big0: np.ndarray
    comm: np.ndarray
    at: np.ndarray
    """Per stage the flat position of the row after it in a (row, pool, profile) table, at
    the stage's own profile: the suffix after the stage in pool ``q`` is at ``at + q
    n_prof``."""
    x: np.ndarray
    """Per stage and sender profile ``x0 + 2 comm`` (its transfers both ways)."""
    big: np.ndarray
    """Per stage and sender profile ``big0 + comm``."""


def _bucket(count: int) -> int:
    """Geometric bucket of a device count: 0, 1, 2, 3, 4-5, 6-7, 8-11, 12-15, ..."""
    if count < 4:
        return count
    top = count.bit_length() - 1
    return 2 * top + (1 if count >= 3 << (top - 1) else 0)


def _class_tables(space: ClassSpace, sums: LayerSums, cut_bytes: Sequence[int],
                  ends: Sequence[int], micro_batch: int,
                  deadline: float | None = None, pools: bool = True,
                  memory: tuple[float, int] | None = None,
                  partner_links: bool = True, top_cap: float = math.inf) -> _ClassTables | None:
    """The per-stage lower bounds of [Note: the class bound] for every group of at most
    ``micro_batch`` devices (merged into buckets above ``CLASS_GROUPS_MAX``); ``_Late``
    when the ``time.perf_counter()`` deadline passes first. ``partner_links``: count the
    members over partners' links where the pools are priced ([Note: partner links]; False:
    fewer groups, quicker tables). ``top_cap``: where the pools are counted, each row's
    ends stop before the first whose stages all have ``x`` above it (``shortest``: no
    counted run with a ``top`` at most the cap takes them). ``memory``: the optimizer
    state factor and the micro-batches a round, where known: mixed groups whose shares
    fit get upper bounds of ``X`` too ([Note: rigid groups]; priced tables only)."""
    classes = bound_classes(space)
    if classes is None:
        return None
    n_classes = len(classes)
    counts_all = tuple(len(c) for c in classes)
    bw_in = _in_bandwidth(space)
    lat0 = _min_latency(space)
    names, timing = space.names, space.timing
    heads = [members[0] for members in classes]
    # per pair of classes: an upper bound on the bandwidth and a lower bound on the latency
    # of a link between two of their members, either way (T_a's slowest link and largest
    # latency, so T_a below is a lower bound of the group's); 0 where no such pair
    net = _links(space)
    link_bw = [[0.0] * n_classes for _ in range(n_classes)]
    link_lat = [[math.inf] * n_classes for _ in range(n_classes)]
    for k, a_members in enumerate(classes):
        for j, b_members in enumerate(classes):
            # (the diagonal is -inf and inf: no device links to itself)
            block = np.ix_(a_members, b_members)
            link_bw[k][j] = max(0.0, float(net.sym_bw[block].max()))
            link_lat[k][j] = float(net.sym_lat[block].min())
    tri_bw, tri_lat = _triangle_links(space)
    # per class: bound speed, fastest links into its members (fastest first), time
    # source and divisor (the same for every member, bound_classes)
    per_class = [(space.bounds[d], sorted((bw_in[e] for e in members), reverse=True),
                  timing.device(names[d]).source, timing.device(names[d]).divisor)
                 for d, members in zip(heads, classes, strict=True)]
    pooled = pools and math.prod(c + 1 for c in counts_all) <= CLASS_POOLS_MAX
    profiles = _sender_profiles(link_bw, link_lat) if pooled else []
    # the one-device upper bounds need the stage bound's compute on the base times exact
    base = timing.base
    exact = all(list(getattr(sums, f)) == list(getattr(base, f))
                for f in ("fwd_intercept", "fwd_slope", "bwd_intercept", "bwd_slope")) \
        and (sums.call_fwd, sums.call_bwd) == (base.call_fwd, base.call_bwd)
    # the runtime's seconds per stage call, in every device's compute (the lower bounds
    # leave it out; the upper bounds of rigid groups add it)
    call = base.call_fwd + base.call_bwd
    uppers = (_rigid_uppers(space, classes, micro_batch) if exact
              else [[math.inf, math.inf]] * n_classes)
    rigid = [_same_memory(space, members) for members in classes]
    mixed = memory is not None and not pooled
    # per group: 1 / its slowest bound speed, whether it is rigid, and the most samples
    # a member of each class takes in Algorithm 1's split without memory caps
    # keyed by (count vector, variant): a count vector of two devices has a variant per
    # pair of devices that differs in its links ([Note: pairs of devices])
    extra: dict[tuple[tuple[int, ...], int], tuple[float, bool, tuple[int, ...]]] = {}
    ratios: dict[tuple[float, ...], float] = {}
    found: dict[tuple[tuple[int, ...], int], list[float]] = {}
    # [Note: partner links]: priced tables count the members that receive over a partner's
    # link (None: no such budget, every group as before)
    partners = None if pooled or not partner_links else _partners(space)
    duos = _pair_links(space, classes, partners)
    fasts: dict[tuple[tuple[int, ...], int], int] = {}
    gammas: dict[tuple[float, ...], float | None] = {}
    if partners is not None:
        second = partners[1]
        # per class, the members' fastest links in from anyone else but their partner
        slow_in = [sorted((second[e] for e in members), reverse=True) for members in classes]
    for seen, take in enumerate(itertools.product(*(range(c + 1) for c in counts_all))):
        if deadline is not None and not seen % 256 and time.perf_counter() > deadline:
            raise _Late
        size = sum(take)
        if size == 0 or size > micro_batch:
            continue
        present = [k for k, t in enumerate(take) if t]
        us = [per_class[k][0] for k in present for _ in range(take[k])]
        beta = _min_max_ratio(micro_batch, us)
        if beta is None:
            continue
        # per variant: the slowest link and largest latency inside (T_a) and, per class,
        # the links into its members from outside the group (fastest first)
        variants: list[tuple[float, float, tuple[tuple[float, ...], ...], int]] = []
        if size == 2:
            variants = duos.get(take, [])
        else:
            # the members with the fastest links into them: a lower bound for any members
            ins = tuple(tuple(per_class[k][1][:take[k]]) if take[k] else ()
                        for k in range(n_classes))
            if size > 1:
                pairs = [(k, j) for k in present for j in present
                         if j > k or (j == k and take[k] > 1)]
                min_bw = min(link_bw[k][j] for k, j in pairs)
                max_lat = max(link_lat[k][j] for k, j in pairs)
                # the group holds a triangle of devices
                min_bw, max_lat = min(min_bw, tri_bw), max(max_lat, tri_lat)
            else:
                min_bw, max_lat = math.inf, 0.0
            if partners is None or size > FAST_GROUP_MAX:
                # (a larger group receives over every member's fastest link for free: a
                # relaxation of the count, [Note: partner links])
                variants = [(min_bw, max_lat, ins, 0)]
            else:
                # f members over their partners' links (the f fastest such links of the
                # group's classes), the others over the fastest of the rest
                fast_in = sorted((bw for k in present for bw in per_class[k][1][:take[k]]),
                                 reverse=True)
                slow = sorted((bw for k in present for bw in slow_in[k][:take[k]]),
                              reverse=True)
                # the most members over partners' links that still speed the group up
                # (once a partner's link is no faster than the second link it replaces,
                # more of them only slow it down)
                most = 0
                while (most < min(size, int(partners[2]))
                       and fast_in[most] > slow[size - most - 1]):
                    most += 1
                # f = 0 exactly, then f in [g, 2g - 1] (g = 1, 2, 4, ...) as one variant of
                # cost g at the links of min(2g - 1, most) (no slower than any f there),
                # the last up to `most` and beyond (fewer variants, each a relaxation)
                grid = [0] + [1 << j for j in range(most.bit_length())]
                for at, f in enumerate(grid):
                    upto = min(most, 2 * f - 1) if at + 1 < len(grid) else most
                    links = tuple(sorted(fast_in[:upto] + slow[:size - upto], reverse=True))
                    # (priced tables read only the rates: one class holds them all)
                    variants.append((min_bw, max_lat, (links,) + ((),) * (n_classes - 1),
                                     f))
        divisors: dict[int, float] = {}
        for k in present:
            src, div = per_class[k][2], per_class[k][3]
            divisors[src] = min(div, divisors.get(src, math.inf))
        step = max(timing.sources[src].update_per_byte / div for src, div in divisors.items())
        # [Note: rigid groups]: one device, or devices of one class of equal memory; and
        # (priced, with the memory model) any group where its shares fit
        firm = len(present) == 1 and (size == 1 or rigid[present[0]])
        for v, (min_bw, max_lat, ins, f) in enumerate(variants):
            rates = tuple(sorted(bw for row in ins for bw in row))
            if rates not in gammas:     # (the same links recur over many count vectors)
                gammas[rates] = (math.inf if rates[0] <= 0.0
                                 else _min_max_ratio(micro_batch, rates))
            gamma = gammas[rates]
            if gamma is None:
                continue
            if size > 1:
                reduce_a = 2.0 * (size - 1) / (size * min_bw)
                reduce_b = 2.0 * (size - 1) * max_lat
            else:
                reduce_a = reduce_b = 0.0
            key = (take, v)
            fasts[key] = f
            found[key] = [1.0 / max(us), beta, gamma, reduce_a, reduce_b, step]
            if pooled:
                found[key] += _profile_terms(take, per_class, profiles, link_bw, link_lat,
                                             micro_batch, ratios, ins)
            found[key] += ([max(uppers[k][0] for k in present),
                            max(uppers[k][1] for k in present)] if firm or mixed
                           else [math.inf, math.inf])
            extra[key] = (1.0 / min(us), firm, tuple(
                min(micro_batch, math.floor(beta * per_class[k][0] * _ABOVE)) if t else 0
                for k, t in enumerate(take)))
    if not found:
        return None
    # (a merged group's x may be below its work over the speed of its smaller counts)
    exact_counts = len(found) <= CLASS_GROUPS_MAX
    if not exact_counts:
        # a merged group has the smallest count of each class and the smallest of every
        # constant of its members: every stage of a member costs at least as much
        # (and the fewest members over partners' links)
        merged: dict[tuple[int, ...], tuple[list[int], list[float]]] = {}
        for key, consts in found.items():
            vec = (*key[0], fasts[key])
            where = tuple(_bucket(c) for c in vec)
            old = merged.get(where)
            if old is None:
                merged[where] = (list(vec), list(consts))
            else:
                old[0][:] = [min(a, b) for a, b in zip(old[0], vec, strict=True)]
                old[1][:] = [min(a, b) for a, b in zip(old[1], consts, strict=True)]
        # a merged group has no upper bound (its compute is no member's)
        found = {(tuple(c[:-1]), c[-1]): k[:-2] + [math.inf, math.inf]
                 for c, k in merged.values()}
        fasts = {key: key[1] for key in found}
        extra = {c: (0.0, False, (0,) * n_classes) for c in found}
    keys = list(found)
    table = np.asarray([found[k] for k in keys], dtype=np.float64)
    counts = np.asarray([k[0] for k in keys], dtype=np.float64).reshape(len(keys), n_classes)
    fast_g = np.asarray([fasts[k] for k in keys], dtype=np.float64)
    # (a group dominates another only with no more members over partners' links too)
    counted_f = np.concatenate([counts, fast_g[:, None]], axis=1)
    inv_min = np.asarray([extra[k][0] for k in keys])
    firm_g = np.asarray([extra[k][1] for k in keys], dtype=bool)
    shares_g = np.asarray([extra[k][2] for k in keys], dtype=np.float64).reshape(
        len(keys), n_classes)
    # the upper bounds' constants: 1 / slowest speed, largest share per speed, latency and
    # gamma of the messages in, whether no memory check is needed, the shares to check
    ups = np.concatenate([inv_min[:, None], table[:, 1:2], table[:, -2:]], axis=1)
    if mixed:
        # [Note: rigid groups]: dominance on the lower bounds alone; a kept group takes
        # the largest upper constants, the largest shares and the memory check of the
        # groups it drops (an upper bound may always be raised, and where it holds it is
        # above theirs, so a plan of a dropped group as the dominant stage has one of the
        # kept group)
        kept = _undominated(counted_f, table[:, :-2])
        lower = np.concatenate([counted_f, table[:, :-2]], axis=1)
        for g in np.setdiff1d(np.arange(len(keys)), kept):
            h = kept[int(np.argmax(np.all(lower[kept] <= lower[g], axis=1)))]
            ups[h] = np.maximum(ups[h], ups[g])
            firm_g[h] &= firm_g[g]
            shares_g[h] = np.maximum(shares_g[h], shares_g[g])
    else:
        # a group with an upper bound may be kept from being the dominant stage where a
        # group with a larger one (or none) is not: a group dominates only where its upper
        # bound is no smaller on every layer range
        has_up = np.isfinite(table[:, -2])
        kept = _undominated(counted_f, np.concatenate(
            [table[:, :-2], np.where(has_up[:, None], -ups, -math.inf)], axis=1),
            firm_g | ~has_up)
    counts, table, fast_g = counts[kept], table[kept], fast_g[kept]
    ups, firm_g, shares_g = ups[kept], firm_g[kept], shares_g[kept]
    inv_u, beta, gamma, red_a, red_b, step = table[:, :6].T
    num_layers = len(sums.fwd_slope) - 1
    firsts = [0] + [e + 1 for e in ends if e + 1 < num_layers]
    lasts = [e for e in ends if e < num_layers - 1] + [num_layers - 1]
    fi, fs = np.asarray(sums.fwd_intercept), np.asarray(sums.fwd_slope)
    bi, bs = np.asarray(sums.bwd_intercept), np.asarray(sums.bwd_slope)
    params = np.asarray(sums.param_bytes, dtype=np.float64)
    rows = []
    compute = []
    # per row, the upper bounds of X of [Note: rigid groups] (inf: none)
    up_inv, up_beta, up_lat, up_gamma = ups.T
    no_comm = np.where(np.isfinite(up_lat), 0.0, math.inf)
    tops = []
    fits = _fits(space, classes, base, memory, shares_g) if mixed and memory is not None \
        else None
    before: list[float] = []
    after: list[float] = []
    stops = np.asarray(lasts) + 1
    row_of = np.full(num_layers + 1, len(firsts))     # the row of each first layer
    row_of[firsts] = np.arange(len(firsts))
    for first in firsts:
        if deadline is not None and time.perf_counter() > deadline:
            raise _Late
        stop = stops[stops > first]
        cut = cut_bytes[first - 1] if first > 0 else 0
        comm = (lat0 + cut * gamma) if cut > 0 else np.zeros_like(gamma)
        c_f = ((fi[stop] - fi[first])[None] * inv_u[:, None]
               + (fs[stop] - fs[first])[None] * beta[:, None])
        c_b = ((bi[stop] - bi[first])[None] * inv_u[:, None]
               + (bs[stop] - bs[first])[None] * beta[:, None])
        e_f = (c_f + comm[:, None]) * _SLACK
        e_b = (c_b + comm[:, None]) * _SLACK
        # the smallest x over the groups per end (non-decreasing: see _relaxed)
        x = e_f + e_b
        shortest = np.maximum.accumulate(x.min(axis=0))
        if pooled and top_cap < math.inf:
            # the ends up to the first whose stages all have x above the cap
            k = int(np.searchsorted(shortest, top_cap, side="right"))
            if k < len(stop):
                stop, shortest, x = stop[:k], shortest[:k], x[:, :k]
                c_f, c_b, e_f, e_b = c_f[:, :k], c_b[:, :k], e_f[:, :k], e_b[:, :k]
        compute.append((c_f * _SLACK, c_b * _SLACK, float(cut)))
        if not pooled:      # (counted pools take their upper bounds below)
            up_c = up_lat + cut * up_gamma if cut > 0 else no_comm
            # the slowest member's intercepts, the largest share per bound speed
            top_x = ((fi[stop] - fi[first] + bi[stop] - bi[first] + call)[None]
                     * up_inv[:, None]
                     + (fs[stop] - fs[first] + bs[stop] - bs[first])[None] * up_beta[:, None]
                     + 2.0 * up_c[:, None]) * _ABOVE
            if fits is not None:
                top_x = np.where(firm_g[:, None] | fits(first, stop - 1), top_x, math.inf)
            tops.append(np.where(np.isfinite(up_lat)[:, None], top_x, math.inf))
        before.append(float(fi[first] + bi[first] + micro_batch * (fs[first] + bs[first])))
        after.append(float((fi[-1] - fi[first]) + (bi[-1] - bi[first])
                           + micro_batch * ((fs[-1] - fs[first]) + (bs[-1] - bs[first]))))
        p = (params[stop] - params[first])[None]
        t_a = (np.where(p > 0, p * red_a[:, None] + red_b[:, None], 0.0)
               + p * step[:, None]) * _SLACK
        nxt = row_of[stop]
        rows.append((x, np.maximum(e_f, e_b), t_a, nxt, shortest))
    speeds = np.asarray([space.bounds[members[0]] for members in classes])
    totals = np.asarray(counts_all, dtype=np.float64)
    if not pooled:
        return _ClassTables(tuple(firsts), tuple(rows), counts, totals, speeds,
                            uppers=tuple(tops),
                            fast=None if partners is None else fast_g,
                            fast_total=0.0 if partners is None else partners[2],
                            work=(np.asarray(before), np.asarray(after)) if exact_counts
                            else None)
    n_prof = len(profiles)
    lat_prof, gamma_prof = table[:, 6:6 + n_prof], table[:, 6 + n_prof:6 + 2 * n_prof]
    own = [profiles.index(_profile_of(
        [k for k in range(n_classes) if c[k] > 0], link_bw, link_lat)) for c in counts]
    lat_prof, gamma_prof = lat_prof * _SLACK, gamma_prof * _SLACK
    uppers = table[:, -2:] * _ABOVE
    shape = [c + 1 for c in counts_all]
    n_pools = math.prod(shape)
    vecs = np.asarray(np.unravel_index(np.arange(n_pools), shape)).T
    diff = vecs[None] - counts.astype(np.int64)[:, None]
    leaves = np.where((diff >= 0).all(axis=2),
                      np.ravel_multi_index(tuple(np.clip(diff, 0, None).transpose(2, 0, 1)),
                                           shape), n_pools)
    cached = []
    for (c_f, c_b, cut_b), (_, _, t_a, nxt, shortest), row0 in zip(compute, rows, firsts,
                                                                    strict=True):
        if row0 == 0:
            comm, up = np.zeros_like(gamma_prof), np.where(np.isfinite(uppers[:, 0]), 0.0,
                                                           math.inf)
        elif cut_b > 0:
            comm, up = lat_prof + cut_b * gamma_prof, uppers[:, 0] + cut_b * uppers[:, 1]
        else:
            comm = np.where(np.isfinite(gamma_prof), 0.0, math.inf)
            up = np.where(np.isfinite(uppers[:, 0]), 0.0, math.inf)
        x0 = c_f + c_b
        cached.append((comm, x0, x0 + 2.0 * comm.min(axis=1)[:, None],
                       (x0 / _SLACK + (call * inv_u)[:, None]) * _ABOVE + 2.0 * up[:, None],
                       np.maximum(c_f, c_b),
                       t_a, nxt, shortest))
    return _ClassTables(tuple(firsts), tuple(rows), counts, totals, speeds,
                        _Pooled(lat_prof, gamma_prof, np.asarray(own, dtype=np.intp),
                                np.asarray(before), np.asarray(after), leaves,
                                np.append(vecs.sum(axis=1), 0), (totals[None] - vecs) @ speeds,
                                vecs @ speeds, tuple(cached)))


def _rigid_uppers(space: ClassSpace, classes: list[list[int]],
                  micro_batch: int) -> list[list[float]]:
    """Per class, for a stage on a rigid group of its devices ([Note: rigid groups]):
    ``[lat, gamma]`` with ``X <= compute + 2 (lat + cut gamma)``, where the stage bound's
    compute is exact (base times, bound speed = the speed); ``[inf, inf]`` elsewhere.

    [Note: rigid groups]
    A group is *rigid* when its shares, and so its compute, are known exactly: one device
    (it takes the whole micro-batch ``b``), or ``k`` devices of one class of the same speed
    and the same usable memory (``_same_memory``): Algorithm 1 (``solver.split``) gives
    them ``ceil(b / k)`` at most, since with equal speeds and equal caps the caps either
    hold that split or hold no split (``k c < b``, no plan). Its compute is then the
    class bound's lower bound ``I / u + S beta`` exactly, plus the runtime's seconds per
    stage call over ``u`` (which the lower bounds leave out). Its transfer is at most
    ``lat + cut gamma`` each way: a receiver gets its share from at most ``min(b, n -
    1)`` senders and a sender sends at most ``b`` samples to at most ``min(b, n - 1)``
    receivers, each message of at most the largest latency into the class and the samples
    at the slowest link into it. A stage whose upper bound is at most the bucket's ``low``
    cannot be the dominant one (``X_d > low``); without this the relaxation names a small
    stage dominant and hides ``a min(E_f, E_b)`` behind it at ``X_d = low``. Only a group
    with an upper bound no smaller on every layer range may dominate another in
    ``_undominated``.

    With the memory model (the optimizer state factor and ``M``; the priced tables only)
    any group of exact classes has one too, on the layer ranges where its free split
    (Algorithm 1 without caps) provably fits every member (``_fits``): ``split_stage``
    then keeps that split, so the compute is at most the slowest member's intercepts over
    its speed plus ``S beta``, and the transfer as above with the largest latency and
    gamma of its classes. There dominance looks at the lower bounds alone, and a kept
    group takes the largest upper constants, shares and memory checks of the groups it
    drops: raised, its upper bound still holds, and where it is finite it is above
    theirs. ``tests/test_bounds.py`` checks every upper bound against every stage of brute
    force's plans (runtime overhead, optimizer state, tight memory)."""
    cluster, names, timing = space.cluster, space.names, space.timing
    out = []
    for members in classes:
        t = timing.device(names[members[0]])
        if t.source != 0 or space.bounds[members[0]] != t.divisor or space.n < 2:
            out.append([math.inf, math.inf])
            continue
        bw = min(cluster.bandwidth_bytes_s(names[a], names[e]) for e in members
                 for a in range(space.n) if a != e)
        lat = max(cluster.latency_s(names[a], names[e]) for e in members
                  for a in range(space.n) if a != e)
        out.append([min(micro_batch, space.n - 1) * lat, micro_batch / bw])
    return out


def _fits(space: ClassSpace, classes: list[list[int]], sums: LayerSums,
          memory: tuple[float, int], shares: np.ndarray) -> Any:
    """``check(first, lasts)``: per group (rows of ``shares``: the most samples a member of
    each class takes) and last layer, True where every member's share fits its device
    for layers ``first..last`` with any in-flight count, by ``solver.evaluate``'s memory
    model over-counted: the weights and optimizer state, the buffers, a gradient of the
    stage's size besides ``.grad`` (the transient is at most that), and per sample the
    activations of ``M`` micro-batches with ``2 M`` wire buffers at the input cut and ``M
    + 1`` at the output (``wire_counts`` with ``F <= M``), plus the workspace fraction and
    a byte of rounding. Where it fits, Algorithm 1 keeps the free split (``split_stage``)
    ([Note: rigid groups])."""
    factor, m = memory
    usable = np.asarray([min(space.cluster.usable_bytes(space.names[d]) for d in members)
                         for members in classes], dtype=np.float64)
    params = np.asarray(sums.param_bytes, dtype=np.float64)
    buffers = np.asarray(sums.buffer_bytes, dtype=np.float64)
    acts = np.asarray(sums.activation_bytes, dtype=np.float64)
    edges = np.asarray(sums.boundary_bytes, dtype=np.float64) if sums.boundary_bytes else None
    absent = (shares <= 0)[:, :, None]

    def check(first: int, lasts: np.ndarray) -> np.ndarray:
        p = params[lasts + 1] - params[first]
        fixed = p * (3.0 + factor) + (buffers[lasts + 1] - buffers[first]) + 1.0
        per = (acts[lasts + 1] - acts[first]) * m
        if edges is not None:
            per = per + 2 * m * edges[first] + (m + 1) * edges[lasts + 1]
        need = (fixed[None, None] + shares[:, :, None] * per[None, None]
                * (1.0 + WORKSPACE_FRACTION) + 1.0) * _ABOVE               # (G, K, ends)
        ok: np.ndarray = np.all(absent | (need <= usable[None, :, None]), axis=1)
        return ok

    return check


def _same_memory(space: ClassSpace, members: list[int]) -> bool:
    """True when every device of the class has the same usable memory (its groups of one
    class are rigid: [Note: rigid groups])."""
    usable = {space.cluster.usable_bytes(space.names[d]) for d in members}
    return len(usable) == 1


def _profile_of(senders: list[int], link_bw: list[list[float]],
                link_lat: list[list[float]]) -> tuple[float, ...]:
    """What a group holding devices of the classes ``senders`` offers a receiver of each
    class: the fastest link (bytes/s; 0: none) and the smallest latency (inf: none)."""
    n_classes = len(link_bw)
    return (tuple(max((link_bw[k][j] for j in senders), default=0.0) for k in range(n_classes))
            + tuple(min((link_lat[k][j] for j in senders), default=math.inf)
                    for k in range(n_classes)))


def _sender_profiles(link_bw: list[list[float]],
                     link_lat: list[list[float]]) -> list[tuple[float, ...]]:
    """The distinct ``_profile_of`` of every non-empty set of classes."""
    n_classes = len(link_bw)
    found: list[tuple[float, ...]] = []
    for pattern in range(1, 1 << n_classes):
        key = _profile_of([j for j in range(n_classes) if pattern >> j & 1], link_bw, link_lat)
        if key not in found:
            found.append(key)
    return found


def _profile_terms(take: tuple[int, ...], per_class: list[tuple[Any, ...]],
                   profiles: list[tuple[float, ...]], link_bw: list[list[float]],
                   link_lat: list[list[float]], micro_batch: int,
                   ratios: dict[tuple[float, ...], float],
                   ins: Sequence[Sequence[float]] | None = None) -> list[float]:
    """Constants of the group ``take`` for ``_counted`` ([Note: counted pools]): per sender
    profile the smallest latency and the smallest ``max_e b_e / bw_e`` over integer shares
    of a transfer into the group (inf where no member can receive), then its own profile
    as a sender in a form where smaller is better (minus each bandwidth, each latency).
    ``ratios`` caches ``_min_max_ratio`` by its rates; ``ins``: per class, upper bounds of
    the links into the group's members from outside it (default: the class's fastest)."""
    n_classes = len(take)
    present = [k for k, t in enumerate(take) if t]
    member_ins = ins if ins is not None else [per_class[k][1][:take[k]]
                                              for k in range(n_classes)]
    lats, gammas = [], []
    for profile in profiles:
        bw_in, lat_in = profile[:n_classes], profile[n_classes:]
        lat = min(lat_in[k] for k in present)
        rates = [min(bw, bw_in[k]) for k in present for bw in member_ins[k]]
        if min(rates) <= 0.0 or math.isinf(lat):
            lats.append(math.inf)
            gammas.append(math.inf)
            continue
        key = tuple(rates)
        if key not in ratios:
            found = _min_max_ratio(micro_batch, rates)
            ratios[key] = math.inf if found is None else found
        lats.append(lat)
        gammas.append(ratios[key])
    # the links this group offers the next stage, best when smallest (for _undominated)
    own = _profile_of(present, link_bw, link_lat)
    return lats + gammas + [-v for v in own[:n_classes]] + list(own[n_classes:])


def _pair_links(space: ClassSpace, classes: list[list[int]],
                partners: _Partners | None = None) -> dict[
        tuple[int, ...], list[tuple[float, float, tuple[tuple[float, ...], ...], int]]]:
    """Per count vector of two devices of ``classes``, the variants of [Note: pairs of
    devices]: ``(link bandwidth, link latency, per class the links into its members from
    outside the pair, fastest first, members over a partner's link)``, one per distinct
    value over the pairs of devices of those counts. ``partners`` (``_partners``): a
    member whose partner is outside the pair receives over the partner's link (counted)
    or over the fastest of the rest ([Note: partner links]).

    [Note: pairs of devices]
    A group's members receive their shares from the stage before, a group disjoint from
    theirs, so a link between two members is no link into the group: on a fleet whose
    fast links are wired pairs, a pair that takes a stage together all-reduces over its
    fast link and receives over slow ones, and a pair that receives over two fast links
    all-reduces over a slow one. The bounds of a group of many devices take the fastest
    link into each member and the best link between members of its classes (or the best
    triangle's) apart, which gives a two-device group both; a group of two devices is
    instead taken per pair of devices ``{a, b}``: the all-reduce over the link ``a-b``
    (the faster way and the smaller latency: at most ``allreduce_time``'s numbers), each
    member's share over its fastest link from a device other than the two (inf where
    there is none: no stage can come before a group of the whole cluster). The DP takes
    the smallest over the variants of a count vector, so every stage on any pair has
    bounds at least one variant's. (Groups of three or more already all-reduce over the
    best triangle's slowest link, which on such fleets is a slow one.)"""
    links = _links(space)
    key = (tuple(tuple(c) for c in classes), None if partners is None else (
        tuple(partners[0]), tuple(partners[1]), partners[2]))
    found = links.pairs.get(key)
    if found is not None:
        return found
    cls = {d: k for k, members in enumerate(classes) for d in members}
    devices = sorted(cls)
    n_classes = len(classes)
    # per device, the devices by their link into it, fastest first (ties by index): the
    # fastest from outside a pair is the first of these not in it
    ranked = {d: [e for e in np.argsort(-links.bw[:, d], kind="stable").tolist()
                  if e != d and e in cls] for d in devices}

    def best_in(d: int, other: int) -> float:
        for e in ranked[d]:
            if e != other:
                return float(links.bw[e, d])
        return math.inf

    out: dict[tuple[int, ...],
              list[tuple[float, float, tuple[tuple[float, ...], ...], int]]] = {}
    for x, a in enumerate(devices):
        for b in devices[x + 1:]:
            link = float(links.sym_bw[a, b])
            lat = float(links.sym_lat[a, b])
            # per member: (class, [(link in from outside the pair, over its partner)])
            options: list[tuple[int, list[tuple[float, int]]]] = []
            for d in (a, b):
                best = best_in(d, b if d == a else a)
                mate = None if partners is None else partners[0][d]
                if mate is None or mate in (a, b) or partners is None:
                    options.append((cls[d], [(best, 0)]))
                else:
                    options.append((cls[d], [(best, 1), (partners[1][d], 0)]))
            for (rate_a, f_a), (rate_b, f_b) in itertools.product(options[0][1],
                                                                 options[1][1]):
                per: list[list[float]] = [[] for _ in range(n_classes)]
                per[options[0][0]].append(rate_a)
                per[options[1][0]].append(rate_b)
                take = tuple(len(p) for p in per)
                value = (link, lat, tuple(tuple(sorted(p, reverse=True)) for p in per),
                         f_a + f_b)
                known = out.setdefault(take, [])
                if value not in known:
                    known.append(value)
    links.pairs[key] = out
    return out


_Partners = tuple[list[int | None], list[float], int]
"""``_partners``' value: per device its partner (None: none), its fastest link in from
any device but its partner, and the most members over partners' links in a plan."""

FAST_GROUP_MAX = 16
"""The priced class bound counts the members over partners' links in groups of at most
this many devices ([Note: partner links]); larger groups take them for free (fewer
groups)."""

FAST_PRICE = 1.0
"""The price of a member over a partner's link in ``_relaxed``, in units of the fastest
class's device price ([Note: partner links])."""


def _partners(space: SearchSpace) -> _Partners | None:
    """[Note: partner links]: per device its *partner*, the one device whose link into it
    is faster than every other device's (None where two or more tie, or alone), its
    fastest link in from any other device, and ``K``, the most devices of a plan that
    receive from their partners; None where no two devices are each other's partners
    (then ``K`` is the number of devices with a partner, no limit).

    [Note: partner links]
    Where a device ``e`` has a partner ``p``, a message into ``e`` from any other device
    goes over a link no faster than ``e``'s second-fastest; so ``e`` receives a share over
    its fastest link only where ``p`` is in the stage right before ``e``'s. Two devices
    that are each other's partners (a wired pair on a fleet) cannot both do that: each
    would be in the stage before the other. So a plan has at most ``K`` = (devices with a
    partner) - (such mutual pairs) members that receive over a partner's link. The priced
    class bound (``_relaxed``) counts them: a group's variant with ``f`` of them takes the
    ``f`` fastest links in of its classes' members and the fastest second links for the
    others (every group with ``f`` such members receives no faster: the links of each
    kind are at most those, member for member), and pays ``f`` times a Lagrange price
    (``FAST_PRICE`` times the device price, its factor walked after the device prices in
    each bucket) against ``K`` of them, as for the devices of each class: every value is
    still a lower bound. To keep the groups few, ``f`` runs over ``0`` and ``[g, 2g - 1]``
    for ``g = 1, 2, 4, ...``, each range one variant of cost ``g`` at the links of its
    largest ``f`` (no slower than any ``f`` in it, as long as a partner's link is faster
    than the second link it replaces; beyond that more only slow the group down, and the
    last variant covers them), and groups of more than ``FAST_GROUP_MAX`` devices take
    every member's fastest link for free (a relaxation of the count: they pay nothing,
    and the others pay for at most ``K``). Groups of two devices take it per pair of
    devices ([Note: pairs of devices]). Without the count, a fleet's coarse classes let
    every member of a wired pair receive at the pair's speed, in every stage at once
    (ResNet-50 on the 32-device fleet of ``tools/time_planner.py``, micro-batch 8: 1.30 s
    without, 1.66 s with it, against 2.92 s where no member may use a partner's link).
    Counted pools see the classes of the stage before instead and do not use it."""
    n = space.n
    if n < 3:
        return None
    bw = _links(space).bw
    mate: list[int | None] = []
    second: list[float] = []
    for e in range(n):
        links = sorted(((float(bw[d, e]), d) for d in range(n) if d != e), reverse=True)
        if links[0][0] > links[1][0]:
            mate.append(links[0][1])
            second.append(links[1][0])
        else:
            mate.append(None)
            second.append(links[0][0])
    mutual = 0
    for e, p in enumerate(mate):
        if p is not None and mate[p] == e:
            mutual += 1
    mutual //= 2
    if not mutual:
        return None
    return mate, second, sum(1 for m in mate if m is not None) - mutual


def _undominated(counts: np.ndarray, consts: np.ndarray,
                 can_dominate: np.ndarray | None = None) -> np.ndarray:
    """Indices of the groups that no other group dominates: one with no more devices of
    any class and no larger constant (``1 / u_max``, ``beta``, ``gamma``, the all-reduce
    terms, the step) has stage bounds ``x``, ``max(E_f, E_b)`` and ``T_a`` no larger on
    every layer range (each is a sum of non-negative layer terms times the constants) and
    costs no more at any prices >= 0, so ``_relaxed`` never needs the dominated one (of
    equal groups, the first is kept)."""
    both = np.concatenate([counts, consts], axis=1)
    keep = []
    for g in range(len(both)):
        below = np.all(both <= both[g], axis=1)
        if can_dominate is not None:
            below &= can_dominate
        below[g] = False
        # an equal group dominates only when it comes first
        equal = below & np.all(both == both[g], axis=1)
        below &= ~equal | (np.arange(len(both)) < g)
        if not below.any():
            keep.append(g)
    return np.asarray(keep, dtype=np.intp)


def bound_classes(space: ClassSpace) -> list[list[int]] | None:
    """The classes ``class_bound`` counts devices in: the space's classes of interchangeable
    devices where they have at most ``CLASS_VECTORS_MAX`` count vectors that merge into at
    most ``CLASS_GROUPS_MAX`` groups (``_bucket``), else the coarser classes of devices
    with the same compute (bound speed, time source and divisor), whose links
    ``_class_tables`` bounds by the best of their members' (a relaxation); None where
    those have more than ``CLASS_VECTORS_MAX`` count vectors (``class_bound`` gives up)."""
    def buckets(count: int) -> int:
        return _bucket(count) + 1

    if (math.prod(c + 1 for c in space.counts) <= CLASS_VECTORS_MAX
            and math.prod(buckets(c) for c in space.counts) <= CLASS_GROUPS_MAX):
        return [list(members) for members in space.classes]
    coarse = _coarse_classes(space)
    if math.prod(len(c) + 1 for c in coarse) > CLASS_VECTORS_MAX:
        return None
    return coarse


def counts_pools(space: ClassSpace) -> bool:
    """True when ``class_bound`` counts the devices of each class exactly on this space
    ([Note: counted pools]): its classes have at most ``CLASS_POOLS_MAX`` count vectors."""
    classes = bound_classes(space)
    return classes is not None and math.prod(len(c) + 1 for c in classes) <= CLASS_POOLS_MAX


def _coarse_classes(space: ClassSpace) -> list[list[int]]:
    """Devices of the space with the same compute (bound speed, time source, divisor)."""
    timing, names = space.timing, space.names
    coarse: dict[tuple[float, int, float], list[int]] = {}
    for d in range(space.n):
        t = timing.device(names[d])
        coarse.setdefault((space.bounds[d], t.source, t.divisor), []).append(d)
    return list(coarse.values())


def _triangle_links(space: SearchSpace) -> tuple[float, float]:
    """``(bandwidth, latency)``: an upper bound on the slowest link's bandwidth and a lower
    bound on the largest latency inside any group of three or more devices (the best of
    every triangle of devices, either way along each link; (inf, 0) with fewer than
    three devices)."""
    n = space.n
    if n < 3:
        return math.inf, 0.0
    links = _links(space)
    bw, lat = links.sym_bw, links.sym_lat
    best_bw, best_lat = -math.inf, math.inf
    for a in range(n):
        # triangles (a, b, c): the slowest of the three links, the largest latency
        tri = np.minimum(np.minimum(bw[a][:, None], bw[a][None, :]), bw)
        best_bw = max(best_bw, float(tri.max()))
        tri = np.maximum(np.maximum(lat[a][:, None], lat[a][None, :]), lat)
        best_lat = min(best_lat, float(tri.min()))
    return best_bw, best_lat


def _relaxed(tables: _ClassTables, m: int, low: float, top: float, limit: float,
             prices: np.ndarray, rho: float = 0.0, deadline: float | None = None,
             fast_price: float = 0.0) -> float:
    """``L``: the smallest value of bound (A) of [Note: the class bound] over relaxed plans
    whose stages all have ``x <= top``, whose dominant stage has ``X > low`` and whose
    stages up to the dominant one keep ``M X_d + T_a < limit``, with devices priced at
    ``prices`` per class instead of limited to the cluster's counts; ``_Late`` once the
    ``time.perf_counter()`` deadline has passed."""
    return float(_relaxed_many(tables, m, low, top, limit, np.asarray(prices)[None], rho,
                               deadline, np.array([fast_price]))[0])


def _relaxed_many(tables: _ClassTables, m: int, low: float, top: float, limit: float,
                  prices: np.ndarray, rho: float = 0.0, deadline: float | None = None,
                  fast_prices: np.ndarray | None = None,
                  counted: tuple[int, ...] = ()) -> np.ndarray:
    """``_relaxed`` at ``K`` prices at once (``prices``: K x classes; ``fast_prices``: K, or
    None for 0): the ``K`` values, each the same as ``_relaxed``'s up to rounding; the
    classes ``counted`` counted exactly instead of priced (their prices are ignored).

    [Note: counted classes]
    The prices leave a duality gap that no price closes. On ResNet-50 x 32 Jetsons
    (micro-batch 8, ``X_d`` in (0.07261, 0.07328] s, target 0.8225 s) the best prices give
    0.8088 s: the relaxed plans use more Nanos than the cluster has, or fewer NX and TX2.
    Counting a class's devices exactly, an axis of ``n_k + 1`` values per class in every
    table (the devices of that class the suffix uses; a stage that takes ``v`` of them
    reads the suffix at ``u - v``), rules out what the prices only penalise. At the same
    prices it is never below them: a plan within the counts pays at most ``lambda (n -
    used) >= 0`` less. Measured in that bucket: the Nanos counted 0.8104 s, the TX2s
    0.8159 s, both 0.8213 s (0.5 s a pass against 0.02 s), all three 0.8301 s (2.9 s a
    pass in single precision, ``_COUNTED_DTYPE``; 1584 states), the gap closed. The stages
    right after the dominant one are gated at ``_AFTER_LEVELS`` positions where classes
    are counted, not ``_PRICED_AFTER_LEVELS`` (12 levels: the same 0.8301 s in 8.2 s; 3
    levels: 0.8182 s; 2: 0.8155 s). A surrogate count (the devices of all classes as one
    number, 33 states) gave only 0.8144 s. ``class_bound``
    counts the slowest classes within ``CLASS_COUNTED_STATES`` (``counted_classes``) in a
    bucket that sets the bound again after its polish, at the polished prices, and
    ``solver.anytime._class_bounds`` asks for that only in a second bisection, after the
    priced one has ended, since each counted pass costs seconds.

    [Note: prices per class]
    Every price vector ``lambda >= 0`` gives a bound ``L(lambda) - lambda . n``, and that
    dual is concave in ``lambda``. Until the nineteenth session ``class_bound`` walked one
    ray, prices proportional to the classes' bound speeds; on ResNet-50 x 32 Jetsons the
    best prices of the bucket that set the bound lay 0.77 to 1.4 times off that ray,
    class by class. A bucket of ``X_d`` that sets the bound once it is split no more is
    now "polished" (``class_bound(polish=True)``, within as many DP passes again as its
    ``max_evals``): from its best price on the ray, every class's price is moved up, down
    or kept by a factor, every combination at once (``3^C - 1`` moves up to
    ``_PATTERN_CLASSES`` classes, else each class by itself), moving to the best while the
    bound rises and shrinking the factor from 2 to 1.02 where none does. The dual is not
    smooth: where moving one class's price at a time stopped on ResNet-50 x 32 Jetsons
    (micro-batch 8, 0.7971 s), the relaxed plan used one NX and one TX2 fewer than the
    cluster has and every Nano, so both of their prices had to fall at once, which no
    move of one class finds (every combination: 0.8097 s, and 0.8099 s from six random
    starts, so about the most any prices give there). One pass costs much less than its ``K``
    prices one by one: the DP's numpy calls are small and their overhead dominates (32
    Jetsons: 22 ms for one price, 56 ms for 6, 169 ms for 26). The walk compares the dual
    itself, not the bucket's bound clipped at ``M low``: below that clip the walk had no
    slope to follow. Measured: ResNet-50 x 32 Jetsons in 30 s, a gap of 3.8 % against
    5.7 %; x 64 in 30 s, 14.1 % against 17.4 % (docs/planner-history.md)."""
    inf = math.inf
    n_k = len(prices)
    count = len(tables.firsts)
    a_max = m                                   # a = 0 .. M - 1 stages after the dominant
    # [Note: counted classes]: one axis of the count vectors of the counted classes the
    # suffix uses, in order of their bound speed ([Note: states by speed]; none counted:
    # one state); `states.kinds` puts a stage's suffix that uses `u` where the stage with
    # `v` of them before it makes `u + v`
    states = _CountStates(tables, counted, top)
    n_states = states.size
    # the same, with the first stages after the dominant one at positions j = 1 .. J:
    # round >= T^{d+j} >= sum_{i<d} E_f^i + M X_d - sum_{i=d}^{d+j-1} E_b^i + T_a^{d+j}
    # >= (M - j (1 - rho)) X_d + T_a^{d+j} (E_b <= (1 - rho) X <= (1 - rho) X_d, rho the
    # hiding ratio), so the stage at position j keeps that with `low` for X_d below
    # `limit`; `placed[:, j - 1]`: tails whose first stage is at position j
    gates, levels = _gates(m, rho, low, _PRICED_AFTER_LEVELS if not counted
                           else _AFTER_LEVELS)
    late, late_ta = _late_gate(m, rho, low)
    # (per price, row, state and a; the last table, `placed[:, levels]`, is `after`:
    # suffixes after the dominant stage at any position)
    # (single precision where classes are counted: their tables are large; allowed for in
    # the value below)
    dtype = _COUNTED_DTYPE if counted else np.float64
    placed = np.full((n_k, levels + 1, count + 1, n_states, a_max), inf, dtype)
    placed[:, :, count, 0, 0] = 0.0             # (state 0: no device used)
    after = placed[:, levels]
    # per row whether the tails of the dominant stage (the first level's; `after` where
    # there are none) hold a suffix
    tails = placed[:, 0]
    held = np.zeros(count + 1, dtype=bool)
    held[count] = True
    gate_arr = np.asarray(gates)
    rest_gate = _rest_gate(m, int(tables.totals.sum()), rho, low, top)
    with_d = np.full((n_k, count + 1, n_states), inf, dtype)  # suffixes with the dominant stage
    if counted:
        prices = prices.copy()
        prices[:, list(counted)] = 0.0          # (counted: no price)
    cost = tables.counts @ prices.T                                           # (G, K)
    if tables.fast is not None and fast_prices is not None:
        # [Note: partner links]: each member over a partner's link costs fast_price
        cost = cost + tables.fast[:, None] * fast_prices[None]
    usage = tables.counts[:, list(counted)].astype(int)     # (G, counted classes)
    points = list(range(a_max)) if a_max <= _CHORD_POINTS else sorted(
        {round(k * (a_max - 1) / (_CHORD_POINTS - 1)) for k in range(_CHORD_POINTS)})
    chords = np.zeros((a_max, len(points)))
    for a in range(a_max):
        k = max(j for j, p in enumerate(points) if p <= a)
        if points[k] == a:
            chords[a, k] = 1.0
        else:
            w = (a - points[k]) / (points[k + 1] - points[k])
            chords[a, k], chords[a, k + 1] = 1.0 - w, w
    m_low = m * low
    # what the prices pay back (they cancel in the value; the floors allow for them)
    paid = prices @ tables.totals
    if tables.fast is not None and fast_prices is not None:
        paid = paid + fast_prices * tables.fast_total
    floors = _Floors(tables, n_k, levels, count, m, low, limit, paid, bool(counted))
    for i in range(count - 1, -1, -1):
        if deadline is not None and not i % 8 and time.perf_counter() > deadline:
            raise _Late
        x, big, t_a, nxt, shortest = tables.rows[i]
        # x grows with the end for every group: only the first `k` ends can have x <= top
        k = int(np.searchsorted(shortest, top, side="right"))
        if not k:
            continue
        keep = x[:, 0] <= top                  # groups with some end of x <= top
        # X's upper bound: a stage whose X is at most `low` is not the dominant one
        up = tables.uppers[i] if tables.uppers else np.full_like(x, inf)
        if not keep.all():
            x, big, t_a, cost_i = x[keep, :k], big[keep, :k], t_a[keep, :k], cost[keep]
            up, used_i = up[keep, :k], usage[keep]
        else:
            x, big, t_a, cost_i, up = x[:, :k], big[:, :k], t_a[:, :k], cost, up[:, :k]
            used_i = usage
        nxt = nxt[:k]
        kinds = states.kinds(used_i, i)
        if not kinds:
            continue
        first = tables.firsts[i] == 0
        cost_k = cost_i.T[:, :, None]                                         # (K, G, 1)
        # x where it is at most `top`, else inf (inf stays inf in the sums below)
        capped = np.where(x <= top, x, inf)
        priced = capped + cost_k                                              # (K, G, ends)
        # a stage after the dominant one, at any position: (L) of _late_gate
        later = np.where(late + t_a * late_ta < limit, priced, inf)
        # a stage after the dominant one, at a position j <= n - 1 past the first
        # `levels`: round >= T^{d+j} >= (M - j (1 - rho)) X_d + T_a (_rest_gate)
        # (the floors hold per end: they are taken after the smallest over each kind)
        batch = _Batch(kinds, len(x), n_states)
        best = np.full((n_k, n_states, a_max), inf, dtype)
        on = floors.after(batch.per_kind(np.where(rest_gate + t_a < limit, later, inf), 1),
                          i, nxt)                                          # (K, kinds, ends)
        for pairs, ends in batch.reads(batch.reach(on, 0)):
            found = (batch.at(on, 1, pairs, ends, dtype)[..., None]
                     + _gather(after, (nxt[ends],), batch.source(pairs))).min(axis=1)
            batch.min_into(best, 1, pairs, found)                             # (K, pairs, a)
        _shift_min(after[:, i], best)
        # the stages at positions j = 1 .. levels, all at once: position j reads the
        # tails at position j + 1 (the last: any position)
        js = np.nonzero(gate_arr + t_a.min() < limit)[0]
        if len(js):
            here = batch.per_kind(np.where(
                (gate_arr[js][:, None, None] + t_a[None] < limit)[None], later[:, None],
                inf), 2)                                               # (K, J, kinds, ends)
            # (the floors hold per end: the smallest over a kind's groups passes them where
            # any of them does, so they are taken after it, on fewer values)
            here = floors.levels(here, i, js + 1, nxt)
            found_j = np.full((n_k, len(js), n_states, a_max), inf, dtype)
            for pairs, ends in batch.reads(batch.reach(here, (0, 1))):
                # (one gather: the rows `nxt` of the levels `js + 1` only)
                found = (batch.at(here, 2, pairs, ends, dtype)[..., None]
                         + _gather(placed, ((js + 1)[:, None], nxt[ends][None, :]),
                                   batch.source(pairs))).min(axis=2)
                batch.min_into(found_j, 2, pairs, found)                   # (K, J, pairs, a)
            mins = placed[:, js, i]
            _shift_min(mins, found_j)
            placed[:, js, i] = mins
        held[i] = bool(np.isfinite(tails[:, i]).any())
        # the dominant stage, with a stages after it
        x_d = np.maximum(capped, low)
        if held[nxt].any():
            # min over the groups of C - a h is concave in a: above its chords between
            # the points `points` (all of them for a few a)
            hide = np.maximum(x, low) - np.maximum(big, low / 2)
            total = m * x_d + t_a
            base = np.where((total < limit) & (up > low),
                            (total if first else m * x_d) + cost_k, inf)     # (K, G, ends)
            at = np.stack([batch.per_kind(base if p == 0 else base - p * hide, 1)
                           for p in points])                          # (P, K, kinds, ends)
            finite = np.isfinite(at[0])
            if finite.any():
                some = slice(None) if batch.whole \
                    else np.nonzero(finite.any(axis=(0, 1)))[0]      # (the ends any reach)
                c_d = np.einsum("ap,pkje->kjea", chords,
                                np.where(finite, at, 0.0)[..., some])
                c_d[~finite[..., some]] = inf                         # (K, kinds, ends, A)
                for pairs, ends in batch.reads(
                        None if batch.whole else floors.dominant(c_d, i, nxt[some])):
                    found = (batch.at(c_d, 1, pairs, ends, dtype)
                             + _gather(tails, (nxt[some][ends],), batch.source(pairs))
                             ).min(axis=1).min(axis=-1)     # (the outer axis first: quicker)
                    batch.min_into(with_d[:, i], 1, pairs, found)              # (K, pairs)
        # a stage s before the dominant one: round >= T^s >= M X_d + X_s + T_a^s
        if m_low + t_a.min() < limit:
            on = floors.before(batch.per_kind(np.where(
                m_low + capped + t_a < limit, priced + t_a if first else priced, inf), 1),
                i, nxt)                                                # (K, kinds, ends)
            for pairs, ends in batch.reads(batch.reach(on, 0)):
                found = (batch.at(on, 1, pairs, ends, dtype)
                         + _gather(with_d, (nxt[ends],), batch.source(pairs))).min(axis=1)
                batch.min_into(with_d[:, i], 1, pairs, found)                  # (K, pairs)
        floors.keep(i, after, placed, with_d, levels)
    # the prices cancel: allow for the rounding of the large terms
    found_all = with_d[:, 0].reshape(n_k, -1).min(axis=1).astype(np.float64)
    # where classes are counted the tables are single precision: a value sums one term per
    # stage (at most one stage per device), all >= 0, each term and each sum rounded by at
    # most 2^-24 of the sum (eps / 2)
    rounding = ((2 * int(tables.totals.sum()) + 4) * float(np.finfo(dtype).eps) / 2
                if dtype != np.float64 else 1e-10)
    with np.errstate(invalid="ignore"):
        out = found_all - paid - rounding * (np.abs(found_all) + np.abs(paid))
    # no relaxed plan: none in the bucket
    return np.where(np.isinf(found_all), found_all, out)


def counted_classes(space: ClassSpace) -> tuple[int, ...]:
    """The classes of ``bound_classes`` whose devices the priced ``class_bound`` counts in a
    bucket that sets the bound after its polish ([Note: counted classes]): the slowest
    first, as many as keep ``prod (n_k + 1)`` within ``CLASS_COUNTED_STATES``; none where
    the pools are counted already (``counts_pools``) or the bound gives up."""
    classes = bound_classes(space)
    if classes is None or counts_pools(space):
        return ()
    out: list[int] = []
    states = 1
    for c in sorted(range(len(classes)), key=lambda c: (space.bounds[classes[c][0]], c)):
        states *= len(classes[c]) + 1
        if states > CLASS_COUNTED_STATES:
            break
        out.append(c)
    return tuple(sorted(out))


_Kind = tuple[Any, Any, Any]
"""``(members, into, src)`` of ``_CountStates.kinds``."""


class _CountStates:
    """The states of ``_relaxed_many``'s tables where classes are counted: the count vectors
    of the counted classes, in order of their bound speed ([Note: states by speed]); one
    state where none is.

    [Note: states by speed]
    A suffix of the relaxed DP from a row that uses the count vector ``u`` of the counted
    classes is one of a real plan only where the layers before the row fit on the devices
    left: each stage of a bucket has ``x <= top`` and ``x U >= work`` (``U``: its group's
    bound speed; ``_ClassTables.work``), so the head's work is at most ``top`` times the
    bound speed of every device but those of ``u`` (the priced classes all left), and the
    suffix's work at most ``top`` times that of ``u`` and of every priced device. Relaxed
    plans that break either are left out: every real plan is still among the rest, so
    the value is still a bound (the prices still give ``L - lambda . n`` over a set that
    holds every plan). In order of ``u``'s bound speed, the states a row keeps are one
    range, and a stage that takes ``v`` reads ``u - v`` (in the same order, shifted by
    ``v``'s speed). Where every class is counted the value is the same (the counts at the
    first row rule those plans out already) and only the work is less: on ResNet-50 x 32
    Jetsons (micro-batch 8) a row keeps 16-46 % of the 1584 states in the bucket that sets
    the bound, and a counted pass takes 1.6-1.8 s instead of 3.0 s (2.3-2.5 s instead of
    3.2 s in the next bucket). Where some are priced it can be higher."""

    def __init__(self, tables: _ClassTables, counted: tuple[int, ...], top: float) -> None:
        self.counted = counted
        self.size = 1
        self.low: np.ndarray | None = None
        self.high: np.ndarray | None = None
        self._at: dict[int, tuple[np.ndarray, list[float], np.ndarray]] = {}
        if not counted:
            return
        on = list(counted)
        self.dims = tuple(int(tables.totals[c]) + 1 for c in counted)
        vecs = np.asarray(np.unravel_index(np.arange(math.prod(self.dims)), self.dims)).T
        speed = vecs @ tables.speeds[on]
        order = np.argsort(speed, kind="stable")    # (the zero vector first)
        self.vecs, self.speed, self.size = vecs[order], speed[order], len(order)
        self.position = np.empty(len(order), dtype=np.intp)
        self.position[order] = np.arange(len(order))
        if tables.work is not None and top > 0.0:
            total = float(tables.totals @ tables.speeds)
            others = total - float(tables.totals[on] @ tables.speeds[on])
            head, tail = tables.work
            reach = top * _ABOVE
            # (and the float error of the states' speeds, summed in another order)
            self.low = tail * _TAIL_SLACK / reach - others - total * 1e-9
            self.high = total - head * _TAIL_SLACK / reach + total * 1e-9

    def kinds(self, used: np.ndarray, row: int) -> list[_Kind]:
        """The groups of ``row`` by the devices of the counted classes each takes (``used``:
        groups x counted classes), each with the states where a stage of it puts a suffix
        (``into``) and those the suffix after it comes from (``src``: ``u - used``): index
        arrays, within the states the row keeps; one kind of every group and state
        (slices) where no class is counted."""
        if not self.counted:
            return [(slice(None), slice(None), slice(None))]
        # (the count vectors as one number each: np.unique over rows is slow)
        codes, first, inverse = np.unique(np.ravel_multi_index(tuple(used.T), self.dims),
                                          return_index=True, return_inverse=True)
        members = np.split(np.argsort(inverse, kind="stable"),
                           np.cumsum(np.bincount(inverse))[:-1])
        bounded = self.low is not None and self.high is not None
        low = float(self.low[row]) if self.low is not None else 0.0
        high = float(self.high[row]) if self.high is not None else 0.0
        out: list[_Kind] = []
        for j, code in enumerate(codes.tolist()):
            at = self._at.get(code)
            if at is None:
                kind = used[first[j]]
                fits = np.nonzero((self.vecs >= kind).all(axis=1))[0]
                src = self.position[np.ravel_multi_index(tuple((self.vecs[fits] - kind).T),
                                                         self.dims)]
                at = self._at[code] = (fits, self.speed[fits].tolist(), src)
            into, speed, src = at
            if bounded:
                a, b = bisect.bisect_left(speed, low), bisect.bisect_right(speed, high)
                into, src = into[a:b], src[a:b]
            if len(into):
                out.append((members[j], into, src))
        return out


class _Floors:
    """Per row the smallest value of each table of ``_relaxed_many`` (after the dominant
    stage at any position, at each level, and holding it), where classes are counted and
    ``_ClassTables.work`` is known: a stage whose value, the smallest suffix after it and
    the least the stages before its row add already reach the limit (and the prices the
    value pays back) is left out ([Note: floors of the counted tables]). Elsewhere
    every step keeps every stage.

    [Note: floors of the counted tables]
    Every value of the tables only grows as stages are put before it: each stage adds at
    least its ``x`` and its price (>= 0), the dominant one at least ``x_d + (M - 1) low /
    2`` (as in ``_counted_run``), and the stages before a row at least the head's work over
    the cluster's bound speed. A relaxed plan at or above ``limit + lambda . n`` has a
    value of at least ``limit``, and the bound is at most the limit, so leaving out the
    stages that lead only to such plans does not change it."""

    def __init__(self, tables: _ClassTables, n_k: int, levels: int, count: int, m: int,
                 low: float, limit: float, paid: np.ndarray, on: bool) -> None:
        self.on = on and tables.work is not None and math.isfinite(limit)
        if not self.on or tables.work is None:
            return
        # (single precision tables: their rounding, with room)
        self.limit = ((limit + paid) * (1.0 + 1e-5))[:, None]                  # (K, 1)
        self.head, self.dom_low = _prefix_lows(tables, tables.work[0], m, low)
        inf = math.inf
        self.fl_after = np.full((n_k, count + 1), inf)
        self.fl_after[:, count] = 0.0
        self.fl_levels = np.full((n_k, levels + 1, count + 1), inf)
        self.fl_levels[:, :, count] = 0.0
        self.fl_d = np.full((n_k, count + 1), inf)

    def after(self, values: np.ndarray, i: int, nxt: np.ndarray) -> np.ndarray:
        """``values`` (K x groups or kinds x ends) of stages after the dominant one at any
        position, those that cannot lead below the limit at inf."""
        if not self.on:
            return values
        room = self.limit - self.head[i] - self.dom_low - self.fl_after[:, nxt]  # (K, ends)
        return np.where(values < room[:, None, :], values, math.inf)

    def levels(self, values: np.ndarray, i: int, reads: np.ndarray,
               nxt: np.ndarray) -> np.ndarray:
        """The same for ``values`` (K x J x groups or kinds x ends) of stages at the levels
        whose tails are at the levels ``reads``."""
        if not self.on:
            return values
        fl = self.fl_levels[:, reads[:, None], nxt[None, :]]                    # (K, J, ends)
        room = self.limit[:, :, None] - self.head[i] - self.dom_low - fl
        return np.where(values < room[:, :, None, :], values, math.inf)

    def dominant(self, c_d: np.ndarray, i: int, nxt: np.ndarray) -> np.ndarray:
        """Per kind and end whether the dominant stages of ``c_d`` (K x kinds x ends x a,
        inf where none; ``nxt``: the ends' next rows) can lead below the limit."""
        least = c_d.min(axis=3)                                               # (K, kinds, ends)
        if not self.on:
            return np.isfinite(least).any(axis=0)
        room = self.limit - self.head[i] - self.fl_levels[:, 0, nxt]             # (K, ends)
        return (least < room[:, None, :]).any(axis=0)

    def before(self, values: np.ndarray, i: int, nxt: np.ndarray) -> np.ndarray:
        """``values`` (K x groups or kinds x ends) of stages before the dominant one, those
        that cannot lead below the limit at inf."""
        if not self.on:
            return values
        room = self.limit - self.head[i] - self.fl_d[:, nxt]                    # (K, ends)
        return np.where(values < room[:, None, :], values, math.inf)

    def keep(self, i: int, after: np.ndarray, placed: np.ndarray, with_d: np.ndarray,
             levels: int) -> None:
        """Row ``i``'s floors, once its tables are done."""
        if not self.on:
            return
        n_k = after.shape[0]
        self.fl_after[:, i] = after[:, i].reshape(n_k, -1).min(axis=1)
        self.fl_levels[:, :levels, i] = placed[:, :levels, i].reshape(n_k, levels, -1).min(
            axis=2)
        self.fl_levels[:, levels, i] = self.fl_after[:, i]
        self.fl_d[:, i] = with_d[:, i].reshape(n_k, -1).min(axis=1)


def _prefix_lows(tables: _ClassTables, head: np.ndarray, m: int,
                 low: float) -> tuple[np.ndarray, float]:
    """What the stages before each row add to a relaxed plan's value at least (``head``:
    the work before each row, over the cluster's bound speed), and what the dominant stage
    adds beyond its ``x`` (``(M - 1) low / 2``), both a little less for the float error
    ([Note: floors of the counted tables])."""
    return (head / float(tables.totals @ tables.speeds) * _TAIL_SLACK,
            (m - 1) * low / 2 * _TAIL_SLACK)


def _gather(table: np.ndarray, index: tuple[np.ndarray, ...], src: Any) -> np.ndarray:
    """``table`` (prices, then the axes ``index`` reads, then the states) at ``index`` and
    the states ``src`` (``_Batch.source``): prices x the broadcast ``index`` x states x
    the axes after them."""
    if isinstance(src, slice):
        at: tuple[Any, ...] = (slice(None), *index, src)
        return table[at]
    # (one flat index over the axes read and the states: np.take is the quickest gather)
    ndim = max(np.ndim(i) for i in index)
    flat = src.reshape((1,) * ndim + (-1,))
    step = table.shape[len(index) + 1]
    for axis in range(len(index) - 1, -1, -1):
        flat = flat + np.expand_dims(index[axis], -1) * step
        step *= table.shape[axis + 1]
    merged = table.reshape(table.shape[0], -1, *table.shape[len(index) + 2:])
    return np.take(merged, flat, axis=1)


class _Batch:
    """One row's kinds (``_CountStates.kinds``) as flat arrays, so that each step of
    ``_relaxed_many`` is a few numpy calls for all of them.

    [Note: kinds at once]
    Until the twenty-fourth session each step looped over the kinds (48 on average in a
    row of ResNet-50 x 32 Jetsons with two classes counted), some ten numpy calls each, and
    those calls' overhead was most of a counted pass. Now the groups are sorted by kind
    (``per_kind``: the smallest over each kind's groups, one ``reduceat``), the kinds'
    states are one list of pairs (kind, state: ``into`` where a stage puts a suffix,
    ``src`` where that suffix comes from), and a step takes together the kinds that reach
    the same ends (``reads``: 4 sets of ends on average there), each set one block of ends
    x pairs whose smallest over the ends is one ``min`` over its outer axis, as in the
    loop; ``min_into`` then lowers the table's states to those values in one
    ``np.minimum.at`` (pairs of different kinds may put a suffix into the same state).
    Reading every pair at the union of the ends (or a ragged list of reads with
    ``reduceat``) was measured slower than the loop: 2.5-3.3 times the reads, and a
    ``reduceat`` over a middle axis is slow. The sums and minima are those of the loop,
    so the tables are the same bit for bit. Measured on the calls of one
    ``class_bound(count=True)`` at 0.823 s (micro-batch 8), old and new in one process:
    the three counted passes 4.05 s -> 1.95 s, the 40 priced ones 2.53 s -> 2.56 s (one
    kind: ``whole``, read as the loop read it)."""

    def __init__(self, kinds: list[_Kind], groups: int, states: int) -> None:
        # (prices only: one kind of every group and state, read as the loop read it)
        self.whole = len(kinds) == 1 and all(isinstance(k, slice) for k in kinds[0])
        if self.whole:
            return
        # (a slice reads every group or state)
        every_group, every_state = np.arange(groups), np.arange(states)
        members = [every_group[m] for m, _, _ in kinds]
        self.order = np.concatenate(members)
        self.first = _starts(np.array([len(m) for m in members]))
        into = [every_state[i] for _, i, _ in kinds]
        self.kind = np.repeat(np.arange(len(kinds)), [len(i) for i in into])  # per pair
        self.into = np.concatenate(into)
        self.src = np.concatenate([every_state[r] for _, _, r in kinds])

    def per_kind(self, values: np.ndarray, axis: int) -> np.ndarray:
        """The smallest of ``values`` over each kind's groups (``axis``)."""
        if self.whole:
            return values.min(axis=axis, keepdims=True)
        return np.minimum.reduceat(np.take(values, self.order, axis=axis), self.first,
                                   axis=axis)

    def reach(self, values: np.ndarray, axes: int | tuple[int, ...]) -> np.ndarray | None:
        """Per kind and end whether any of ``values`` (kinds x ends after ``axes``) is
        finite (None where ``whole``: ``reads`` reads every end)."""
        return None if self.whole else np.isfinite(values).any(axis=axes)

    def reads(self, ends: np.ndarray | None) -> list[tuple[Any, Any]]:
        """Per set of ends that some kinds reach (``ends``: kinds x ends, bool): the pairs
        of those kinds and the ends; where ``whole``, every end (a slice), as the loop read
        them."""
        if self.whole or ends is None:
            return [(slice(None), slice(None))]
        # (each kind's ends as bytes: np.unique over rows of bools is slow)
        packed = np.ascontiguousarray(np.packbits(ends, axis=1))
        _, first, inverse = np.unique(packed.view(np.dtype((np.void, packed.shape[1]))),
                                      return_index=True, return_inverse=True)
        of_pair = inverse.reshape(-1)[self.kind]
        return [(np.nonzero(of_pair == g)[0], np.nonzero(ends[k])[0])
                for g, k in enumerate(first) if ends[k].any()]

    def source(self, pairs: Any) -> Any:
        """The states the suffixes after ``pairs`` come from (every state, a slice, where
        ``whole``)."""
        return slice(None) if self.whole else self.src[pairs]

    def at(self, values: np.ndarray, axis: int, pairs: Any, ends: Any,
           dtype: Any) -> np.ndarray:
        """``values`` (its kinds at ``axis``, its ends right after) of ``pairs``' kinds at
        ``ends``, as ``dtype``: those two axes become ends x pairs."""
        if self.whole:
            return np.swapaxes(values, axis, axis + 1).astype(dtype)  # (one kind: pairs of 1)
        # (the few values converted first, then one flat np.take: quicker than indexing)
        shape = values.shape
        merged = values.astype(dtype).reshape(shape[:axis] + (-1,) + shape[axis + 2:])
        return np.take(merged, self.kind[pairs][None, :] * shape[axis + 1] + ends[:, None],
                       axis=axis)

    def min_into(self, table: np.ndarray, axis: int, pairs: Any, values: np.ndarray) -> None:
        """``table``'s states (``axis``) lowered, in place, to ``values`` (``axis``: per
        pair of ``pairs``) where those are smaller."""
        if self.whole:
            np.minimum(table, values, out=table)
            return
        into = self.into[pairs]
        if table.flags.c_contiguous:
            # (one flat index: the quickest np.minimum.at)
            shape = table.shape
            flat = np.arange(math.prod(shape[:axis])).reshape(shape[:axis] + (1,) * (
                len(shape) - axis)) * math.prod(shape[axis:])
            flat = flat + (into * math.prod(shape[axis + 1:])).reshape(
                (-1,) + (1,) * (len(shape) - axis - 1))
            if axis + 1 < len(shape):
                flat = flat + np.arange(math.prod(shape[axis + 1:])).reshape(shape[axis + 1:])
            np.minimum.at(table.reshape(-1), flat.reshape(-1),
                          np.ascontiguousarray(values).reshape(-1))
        else:
            np.minimum.at(table, (slice(None),) * axis + (into,), values)


def _starts(sizes: np.ndarray) -> np.ndarray:
    """Where each of runs of ``sizes`` starts, laid end to end."""
    out = np.zeros(len(sizes), dtype=np.intp)
    np.cumsum(sizes[:-1], out=out[1:])
    return out


def _price_moves(classes: int) -> np.ndarray:
    """The exponents of the polishing moves of ``class_bound``'s prices ([Note: prices per
    class]): every vector of -1, 0 and 1 but zero for at most ``_PATTERN_CLASSES``
    classes, else each class up and down by itself; none for one class (its ray is
    walked already)."""
    if classes <= 1:
        return np.zeros((0, classes))
    if classes <= _PATTERN_CLASSES:
        grid = np.array(list(itertools.product((-1.0, 0.0, 1.0), repeat=classes)))
        return grid[np.any(grid != 0.0, axis=1)]
    eye = np.eye(classes)
    return np.concatenate([eye, -eye])


def _shift_min(table: np.ndarray, values: np.ndarray) -> None:
    """``table[..., min(a + 1, A - 1)] = min(that, values[..., a])`` for every ``a``, in place:
    one more stage after the dominant one (``a`` counts at most ``A - 1``)."""
    np.minimum(table[..., 1:], values[..., :-1], out=table[..., 1:])
    np.minimum(table[..., -1], values[..., -1], out=table[..., -1])


def _counted(tables: _ClassTables, pooled: _Pooled, m: int, low: float, top: float,
             limit: float, rho: float = 0.0, deadline: float | None = None) -> float:
    """``_counted_run``'s value."""
    return _counted_run(tables, pooled, m, low, top, limit, rho, deadline)[0]


_After = tuple[np.ndarray, np.ndarray]
"""``_counted_run``'s suffixes after the dominant stage: the table of those whose first
stage is right after it (rows x pools x profiles) and per row the smallest of any."""


def _counted_run(tables: _ClassTables, pooled: _Pooled, m: int, low: float, top: float,
                 limit: float, rho: float = 0.0, deadline: float | None = None,
                 after: _After | None = None, prune: bool = True) -> tuple[float, _After]:
    """``_relaxed`` with the devices counted instead of priced: the smallest value of bound
    (A) over plans of the relaxed stages (every group on count vectors of the classes, at
    most ``totals`` devices of each in all) whose stages all have ``x <= top``, whose
    dominant stage has ``X > low``, with the filters of ``_relaxed``; each transfer is
    bounded by the links from the classes of the stage before ([Note: counted pools]);
    ``_Late`` once the ``time.perf_counter()`` deadline has passed. Also returns its
    suffixes after the dominant stage, for ``after`` in a run of the same ``top`` and
    ``limit`` and a ``low`` at least as large: that run then takes them instead of
    building its own (their filters, ``low``'s gates, are weaker or the same there, so
    they hold every suffix of that run, at no more than its value or, where left out, at
    or above the limit; the value is still a lower bound, at most its own). ``prune``
    False keeps the pools and stages that cannot give a value below the limit (the same
    value: for the tests).

    [Note: counted pools]
    Where the classes have few count vectors (``CLASS_POOLS_MAX``), the DP of ``_relaxed``
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
    for plans of one device per stage. Every other rule of ``_relaxed`` holds for each
    plan, so the value is a lower bound of (A) on every plan in the bucket. A group
    dominated by another with no more devices of any class, no larger constant for any
    sender profile and an own profile no worse (no slower link, no larger latency for
    any class) is dropped as in ``_relaxed``: every value of the DP only grows with the
    stage times.
    """
    inf = math.inf
    count = len(tables.firsts)
    n_pools, n_prof = len(pooled.free_speed), pooled.gamma.shape[1]
    # a <= min(M - 1, devices after the dominant stage), per pool of those devices
    a_cap = np.minimum(m - 1, pooled.sizes).astype(np.float64)
    gates, levels = _gates(m, rho, low)
    rest_gate = _rest_gate(m, int(tables.totals.sum()), rho, low, top)
    ta_limit = limit - min(0.0, rest_gate)
    # [Note: one pass per run]: every phase keeps x <= top, T_a < limit - min(0,
    # rest_gate) and the ends of the row up to the first whose x over every group is
    # above top. The stages of every row are gathered once per table (_flat_stages, for
    # the largest top and T_a limit of class_bound's runs), the terms of each phase that
    # do not depend on the suffixes (floors and tables) once per run where they are few
    # (_TERMS_AT_ONCE, else per row for the stages it keeps), in the float operations of
    # a step per row; a row then selects its stages by masks and reads its suffixes for
    # its live pools only (a minimum over the same values: bit for bit the step per row,
    # tests/counted_reference.py)
    flat = _flat_stages(pooled, top, ta_limit, deadline)
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
    live_all = pooled.free_speed * top * _ABOVE
    used_all = pooled.speed * top * _ABOVE
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
    head_low, dominant_low = _prefix_lows(tables, pooled.head, m, low)
    cut = limit * _CUT_ABOVE if prune else inf
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
    lives = ((live_all[None] >= (pooled.head * _SLACK)[:, None])
             & (used_all[None] >= (pooled.tail * _TAIL_SLACK)[:, None]))
    live_rows, live_pools = np.nonzero(lives)
    live_at = np.searchsorted(live_rows, np.arange(count + 1)).tolist()
    # per row the smallest value of a suffix after a stage that ends before it: one after
    # the dominant stage (and the dominant stage still to come) or one holding it
    reach = np.minimum(floor + dominant_low, floor_d)
    for i in range(count - 1, -1, -1):
        if deadline is not None and time.perf_counter() > deadline:
            raise _Late
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


def _flat_stages(pooled: _Pooled, top: float, ta_limit: float,
                 deadline: float | None = None) -> _Flat:
    """``_Flat`` of the stages with ``lowest <= top`` and ``T_a < ta_limit``: a cached one
    of caps at least those (the smallest top), else a new one, kept for later runs;
    ``_Late`` once the ``time.perf_counter()`` deadline has passed."""
    caps = [key for key in pooled.flat if key[0] >= top and key[1] >= ta_limit]
    if caps:
        return pooled.flat[min(caps)]
    parts: list[list[np.ndarray]] = [[] for _ in range(9)]
    for i, (_, x0, lowest, upper, big0, t_a, nxt, shortest) in enumerate(pooled.rows):
        if deadline is not None and not i % 16 and time.perf_counter() > deadline:
            raise _Late
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
    found = _Flat(row, group, nxt_f, short_f, low_f, ta_f, up_f, x0_f, big0_f, comm, at,
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


def _gates(m: int, rho: float, low: float,
           most: int = _AFTER_LEVELS) -> tuple[list[float], int]:
    """``(gates, levels)``: for the stages at positions ``j = 1 .. levels`` after the
    dominant one, ``(M - j (1 - rho)) low``, a lower bound of ``(M - j (1 - rho)) X_d``
    while the factor is >= 0 (``levels``: the positions up to the first negative factor,
    at most ``most``; with a negative factor ``low`` is no bound, and the
    position is left to ``_rest_gate``)."""
    factors = [m - j * (1.0 - rho) for j in range(1, most + 1)]
    levels = next((j for j, f in enumerate(factors) if f < 0.0), len(factors))
    return [f * low for f in factors[:levels]], levels


def _late_gate(m: int, rho: float, low: float) -> tuple[float, float]:
    """``(g low, 1 / (2 - rho))``: every stage ``s`` after the dominant one ``d``, at any
    position, keeps ``g X_d + T_a^s / (2 - rho) <= round`` with ``X_d > low``:

        (L)  round >= g X_d + T_a^s / (2 - rho),  g = M - (1 - rho) (M + 1) / (2 (2 - rho)).

    With ``B = sum_{i=d}^{s-1} E_b^i``, ``T^s = sum_{i<d} E_f^i + M X_d - B + T_a^s`` and
    ``T^0 >= M X_d + tail - (w - 1) min(E_f^d, E_b^d)`` (the drain, ``w <= M``), where the
    tail after ``d`` holds at least ``(B - E_b^d) / (1 - rho)`` (each ``E_b <= (1 - rho)
    X``). So ``(1 - rho) T^0 + T^s >= (2 - rho) M X_d - E_b^d - (1 - rho) (M - 1) X_d / 2
    + T_a^s`` with ``E_b^d <= (1 - rho) X_d``, and ``round`` is at least both. Unlike
    ``_rest_gate`` it does not fall with the position: a deep pipeline after the dominant
    stage cannot hide an all-reduce of any size behind its ``E_b``."""
    g = m - (1.0 - rho) * (m + 1) / (2.0 * (2.0 - rho))
    return g * low, 1.0 / (2.0 - rho)


def _rest_gate(m: int, n_total: int, rho: float, low: float, top: float) -> float:
    """A lower bound of ``(M - j (1 - rho)) X_d`` for a stage at any position ``j <= n -
    1`` after the dominant one, ``X_d`` in ``(low, top]``: ``round >= T^{d+j} >= (M - j (1 -
    rho)) X_d + T_a^{d+j}`` ([Note: the class bound]); ``T_a < round`` alone does not hold
    past ``j (1 - rho) > M`` (docs/planner.md's example: ``M = 1``, ``T_a^3 = 9`` in a round
    of 8.1)."""
    c = m - (n_total - 1) * (1.0 - rho)
    return c * low if c >= 0.0 else c * top


def class_bound(space: ClassSpace, sums: LayerSums, cut_bytes: Sequence[int],
                ends: Sequence[int], micro_batch: int, num_micro: int, target: float,
                deadline: float | None = None, max_evals: int | None = None,
                rho: float = 0.0, buckets: int | None = None,
                pools: bool = True,
                cache: dict[tuple[int, bool, bool], _ClassTables | None] | None = None,
                optimizer_state_factor: float | None = None,
                partner_links: bool = True, polish: bool = True,
                count: bool = True) -> float | None:
    """A lower bound, at most ``target``, on the round time of every plan of the wide space
    (``ClassSpace``: every group in every order) with this micro-batch size on the
    candidate ends ``ends`` ([Note: the class bound]); None when the
    ``time.perf_counter()`` deadline passes before the first bucket of ``X_d`` is bounded,
    ``target`` is not finite or the cluster has more than ``CLASS_VECTORS_MAX`` count
    vectors. A deadline that passes later gives the bound of the buckets done so far,
    ``M`` times the last one's top for the rest (``round > M X_d``). ``rho``: a hiding ratio
    (``solver.summary.hiding_ratio``: ``min(E_f, E_b) >= rho X`` in every plan; 0 is
    always safe); ``max_evals``: stop splitting buckets after this many DP runs (default
    24, ``CLASS_COUNTED_EVALS`` where the pools are counted); ``buckets``: buckets of the
    first grid (fewer: a quicker, weaker first bound; default ``CLASS_BUCKETS``,
    ``CLASS_COUNTED_BUCKETS`` where the pools are counted); ``pools``: count the pools
    where they are few (``counts_pools``; False: prices, quicker and weaker); ``cache``:
    the tables of earlier calls on the same space, layers, cuts, batch and optimizer state
    factor, by micro-batch size, ``pools`` and ``partner_links`` (they do not depend on
    the target), filled as they are built; ``optimizer_state_factor``: the plans'
    (memory), where known: the priced bound then knows upper bounds of mixed groups' stage
    times too ([Note: rigid groups]); ``partner_links``: the priced bound counts the
    members over partners' links ([Note: partner links]; False: quicker, weaker tables);
    ``polish``: walk the classes' prices apart in the bucket that sets the bound once it
    is split no more ([Note: prices per class]; False: quicker, weaker); ``count``: where
    such a bucket sets the bound again after its polish, count its slowest classes
    ([Note: counted classes]; False: quicker, weaker).

    [Note: the class bound]
    Let ``d`` be the dominant stage (largest ``X``) and ``a = min(M, S - d) - 1`` (at most
    the number of stages after it). Stage 0's term of ``solver.evaluate`` is ``T_e^0 + T_a^0
    = M X_d + sum_{i<d} X_i + D + T_a^0`` with ``D >= sum_{i>d} X_i - a min(E_f^d, E_b^d)``,
    and ``M X_d - a min(E_f^d, E_b^d) = (M - a) X_d + a max(E_f^d, E_b^d)``, so

        (A)  round >= (M - a) X_d + a max(E_f^d, E_b^d) + sum_{i != d} X_i + T_a^0,

    which only grows with every stage's ``E_f`` and ``E_b``. So the per-stage lower bounds
    of [Note: the stage bound] (compute at the best integer split over bound speeds,
    transfers at the fastest links, exact ``T_a``) give a lower bound of (A). For a plan
    whose ``X_d`` lies in ``(low, top]``: every ``x_s <= top``, ``X_d > low`` (so ``X_d >=
    max(x_d, low)`` and ``max(E_f^d, E_b^d) >= low / 2``), ``round > M low``, and for
    every stage ``s <= d``, ``round >= T_e^s + T_a^s >= M X_d + T_a^s``. A DP over (first
    layer, phase: after / at or before the dominant stage, ``a``) finds the smallest (A)
    over sequences of stages on count vectors of the classes, with the device limits
    relaxed by Lagrange prices ``lambda_k >= 0`` per device of class ``k`` (the plan's
    ``sum lambda . counts <= lambda . n``): every ``L(lambda) - lambda . n`` is a lower
    bound (``_relaxed``). Over buckets ``0 = T_{-1} < T_0 < ... < T_J = target / M`` of
    ``X_d``, every plan has ``round >= min(target, max(M T_{j-1}, L_j))`` in its bucket
    (a plan below ``target`` keeps the filters), and plans with ``X_d > target / M`` have
    ``round > target``. The first stages after the dominant one, at position ``j``, also
    keep ``(M - j (1 - rho)) X_d + T_a < target`` (``round >= T^{d+j}``; each ``E_b``
    between is at most ``(1 - rho) X_d``). The bound is the smallest over the buckets.
    Memory is ignored (a relaxation); more than ``CLASS_GROUPS_MAX`` groups are merged
    per bucket of counts into a group with the smallest counts and constants of its
    members (again a relaxation). ``tests/test_bounds.py`` checks it against every plan
    of brute force.
    """
    if not math.isfinite(target) or target <= 0 or bound_classes(space) is None:
        return None
    m = num_micro
    top_all = target / m
    if partner_links and _partners(space) is None:
        partner_links = False       # (no partners: the same tables either way)
    key = (micro_batch, pools, partner_links)
    try:
        if cache is not None and key in cache:
            tables = cache[key]
        else:
            # (tables kept for other targets keep every end)
            tables = _class_tables(
                space, sums, cut_bytes, ends, micro_batch, deadline, pools,
                None if optimizer_state_factor is None
                else (optimizer_state_factor, num_micro), partner_links,
                top_all if cache is None else math.inf)
            if cache is not None:
                cache[key] = tables
        if tables is not None and tables.pooled is not None:
            # the stages of every bucket's runs, gathered once ([Note: one pass per run]):
            # every run has top <= target / M and T_a limit at most this one's
            _flat_stages(tables.pooled, top_all, target - min(
                0.0, _rest_gate(m, int(tables.totals.sum()), rho, 0.0, top_all)), deadline)
    except _Late:
        return None
    if tables is None:
        return target        # no group can take a micro-batch: no plan
    shape = tables.speeds / tables.speeds.max()
    counting = counted_classes(space) if count else ()
    afters: dict[float, tuple[float, _After]] = {}
    fast_scale = [1.0]      # the partner links' price factor of the last bucket

    def bucket(low: float, top: float, price: np.ndarray, enough: float,
               polish: bool = False, count: bool = False) -> tuple[float, np.ndarray]:
        """``(bound of the bucket, best prices)`` ([Note: prices per class]): the dual is
        concave in the prices (per class, in units of ``top``), so from ``price`` walk
        the ray of its multiples while the bound rises, then (``polish``) the classes'
        prices up, down or kept, then the price of the members over partners' links ([Note:
        partner links]; its best factor is kept in ``fast_scale`` for the next bucket);
        stop once the bound reaches ``enough``."""
        def values(ps: list[np.ndarray], q: float | None = None,
                   counted: tuple[int, ...] = ()) -> np.ndarray:
            if deadline is not None and time.perf_counter() > deadline:
                raise _Late
            evals[0] += 1
            scale = fast_scale[0] if q is None else q
            stacked = np.stack(ps)
            found = _relaxed_many(tables, m, low, top, target, stacked * top, rho, deadline,
                                  stacked.max(axis=1) * top * FAST_PRICE * scale, counted)
            # (the dual itself, not clipped at M low: the walk needs its slope there too)
            return np.where(np.isnan(found), -math.inf, found)

        if tables.pooled is not None:
            # no prices: a bucket split off the top of another reads that one's suffixes
            # after the dominant stage (same top, a lower low: see _counted_run)
            if deadline is not None and time.perf_counter() > deadline:
                raise _Late
            evals[0] += 1
            known = afters.get(top)
            found, made = _counted_run(tables, tables.pooled, m, low, top, target, rho,
                                       deadline, known[1] if known is not None
                                       and known[0] <= low else None)
            if known is None:
                afters[top] = (low, made)
            return (max(m * low, found) if not math.isnan(found) else m * low), price

        if count:
            # [Note: counted classes]: the slowest classes counted, the rest at the prices
            # polished before; first all but the slowest of them, where that proves the
            # bucket outright ([Note: counted spans])
            if len(counting) > 1:
                slowest = min(counting, key=lambda c: (tables.speeds[c], c))
                fewer = float(values([price], counted=tuple(
                    c for c in counting if c != slowest))[0])
                if fewer >= target * _REACHED:
                    return max(m * low, fewer), price
            return max(m * low, float(values([price], counted=counting)[0])), price
        best = float(values([price])[0])

        def better(trials: Iterable[np.ndarray]) -> bool:
            """Move to the best of ``trials`` (those within the prices' range) where it
            beats ``best``."""
            nonlocal best, price
            kept = [t for t in trials if _PRICE_MIN < t.max() < _PRICE_MAX]
            if not kept:
                return False
            found = values(kept)
            k = int(np.argmax(found))
            if found[k] <= best:
                return False
            best, price = float(found[k]), kept[k]
            return True

        # the ray: a window of multiples around the best price so far, while it rises
        if best < enough:
            ladder = [_PRICE_STEP ** k for k in (-2, -1, -0.5, 0.5, 1, 2)]
            while better(price * f for f in ladder) and best < enough:
                pass
        # the classes' prices up, down or kept, every combination at once (each class by
        # itself where the classes are many), by factors that shrink
        step = _CLASS_PRICE_STEP
        moves = _price_moves(len(price)) if polish else np.zeros((0, len(price)))
        rounds = 0
        while len(moves) and best < enough and step > _CLASS_PRICE_FINEST and (
                not counting or rounds < _POLISH_BEFORE_COUNT):
            rounds += 1
            if not better(price * step ** moves):
                step = math.sqrt(step)
        if tables.fast is not None and best < enough:
            scale = fast_scale[0]
            for factor in (_PRICE_STEP, 1.0 / _PRICE_STEP):
                moved = False
                while best < enough and _PRICE_MIN < scale < _PRICE_MAX:
                    trial = float(values([price], scale * factor)[0])
                    if trial <= best:
                        break
                    best, scale, moved = trial, scale * factor, True
                if moved:
                    break
            fast_scale[0] = scale
        return max(m * low, best), price

    # buckets (low, top, bound, price) of X_d covering (0, target / M]: a coarse grid,
    # then the bucket that sets the bound is split while that raises it
    counted = tables.pooled is not None
    if buckets is None:
        buckets = CLASS_COUNTED_BUCKETS if counted else CLASS_BUCKETS
    if max_evals is None:
        max_evals = CLASS_COUNTED_EVALS if counted else 24
    ratio = _COUNTED_BUCKET_RATIO if counted else _BUCKET_RATIO
    tops = [top_all * ratio ** k for k in range(max(1, buckets))][::-1]
    done: list[tuple[float, float, float, np.ndarray]] = []
    evals = [0]
    price = _PRICE_START * shape
    worst = target
    try:
        for low, top in zip([0.0, *tops[:-1]], tops, strict=True):
            if m * low >= target:
                done.append((low, top, target, price))
                continue
            found, price = bucket(low, top, price, worst)
            worst = min(worst, found)
            done.append((low, top, found, price))
        polished: set[tuple[float, float]] = set()
        counts: set[tuple[float, float]] = set()
        while True:
            j = min(range(len(done)), key=lambda k: done[k][2])
            low, top, found, price = done[j]
            if found >= target * _REACHED:
                break
            enough = min(b[2] for k, b in enumerate(done) if k != j) if len(done) > 1 \
                else target
            if low >= top * _FINEST or top < top_all * _FINEST_LOW \
                    or evals[0] >= max_evals:
                # split no more: the prices per class of the bucket that sets the bound,
                # once per bucket, within as many runs again; where it sets the bound
                # again, its slowest classes counted ([Note: counted classes])
                if counted or not polish or evals[0] >= 2 * max_evals:
                    break
                if (low, top) not in polished:
                    polished.add((low, top))
                    value, p = bucket(low, top, price, enough, polish=True)
                elif counting and (low, top) not in counts:
                    counts.add((low, top))
                    # with its neighbours ([Note: counted spans]); the bucket alone where
                    # that falls short
                    first, last = _count_span([(d[0], d[1], d[2]) for d in done], j,
                                              target)
                    value, p = bucket(done[first][0], done[last][1], price, enough,
                                      count=True)
                    if value >= target * _REACHED or first == last:
                        done[first:last + 1] = [(d[0], d[1], max(d[2], value), d[3])
                                                for d in done[first:last + 1]]
                        continue
                    value, p = bucket(low, top, price, enough, count=True)
                else:
                    break
                done[j] = (low, top, max(value, found), p)
                continue
            mid = math.sqrt(low * top) if low > 0.0 else top / 2
            # the bucket's bound holds in each half too
            halves = []
            for a, b in ((low, mid), (mid, top)):
                value, p = bucket(a, b, price, enough)
                halves.append((a, b, max(value, found), p))
            done[j:j + 1] = halves
    except _Late:
        if not done:
            return None
        if len(done) < len(tops):
            # the buckets not reached hold plans with X_d above the last one's top
            done.append((done[-1][1], top_all, m * done[-1][1], price))
    return max(0.0, min(min(b[2] for b in done), target) * _SLACK)


def _count_span(done: Sequence[tuple[float, float, float]], j: int,
                target: float) -> tuple[int, int]:
    """The first and last of the adjacent buckets ``(low, top, bound)`` of ``done`` that
    ``class_bound`` counts at once with bucket ``j`` ([Note: counted spans]): of the spans
    within ``_COUNT_SPAN``, the one with the most buckets below ``target``, the narrowest
    of those.

    [Note: counted spans]
    A counted pass ([Note: counted classes]) costs seconds, and the buckets around the one
    that sets the bound are often below the target too, each to be polished or counted in
    turn. One counted pass over a few of them at once (``X_d`` in the first one's ``low``
    to the last one's ``top``) bounds every plan of each, a little more weakly than over
    each alone. On ResNet-50 x 32 Jetsons (micro-batch 8, target 0.8226 s) the bucket
    (0.07284, 0.07351] s counted alone gives 0.8301 s, and with its neighbours up to
    0.07692 s 0.8282 s in about the same time: the polish of (0.07418, 0.07692] (1.4 s)
    is not needed. Up to 0.08271 s it gives only 0.7809 s, so the span is kept within
    ``_COUNT_SPAN``, and where it falls short the bucket is counted alone."""
    best = (j, j)
    below = [b[2] < target * _REACHED for b in done]
    score = (int(below[j]), 0.0)
    for a in range(j + 1):
        for b in range(j, len(done)):
            low, top = done[a][0], done[b][1]
            if low <= 0.0 or top > low * _COUNT_SPAN:
                break
            found = (sum(below[a:b + 1]), low / top)
            if found > score:
                best, score = (a, b), found
    return best


class _Late(Exception):
    """The deadline of ``class_bound`` passed."""
