"""The class bound: a proven lower bound of the round over every order, as counts of each class."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Sequence

import numpy as np

from solver.class_tables import ClassTables, Late, bound_classes, build_class_tables
from solver.counted_pools import After, counted_run, flat_stages
from solver.link_floors import SLACK
from solver.partners import FAST_PRICE, find_partners
from solver.relaxation import counted_classes, relaxed_many, rest_gate_at
from solver.space import ClassSpace
from solver.timing import LayerSums

__all__ = ["CLASS_BUCKETS", "CLASS_COUNTED_BUCKETS", "CLASS_COUNTED_EVALS", "class_bound"]

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

_PRICE_START = 0.1
_PRICE_MIN, _PRICE_MAX = 1e-6, 1e6
_PRICE_STEP = 4.0
"""Device prices (Lagrange multipliers) in units of (bucket top) x (bound speed /
fastest): the first tried, and the factor of the walk along their ray."""

_COUNT_SPAN = 1.06
"""A bucket of ``X_d`` whose slowest classes ``class_bound`` counts is counted together
with its neighbours within this ratio of ``top`` to ``low`` (``_count_span``)."""

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


def class_bound(space: ClassSpace, sums: LayerSums, cut_bytes: Sequence[int],
                ends: Sequence[int], micro_batch: int, num_micro: int, target: float,
                deadline: float | None = None, max_evals: int | None = None,
                rho: float = 0.0, buckets: int | None = None,
                pools: bool = True,
                cache: dict[tuple[int, bool, bool], ClassTables | None] | None = None,
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
    bound (``relaxed``). Over buckets ``0 = T_{-1} < T_0 < ... < T_J = target / M`` of
    ``X_d``, every plan has ``round >= min(target, max(M T_{j-1}, L_j))`` in its bucket
    (a plan below ``target`` keeps the filters), and plans with ``X_d > target / M`` have
    ``round > target``. The first stages after the dominant one, at position ``j``, also
    keep ``(M - j (1 - rho)) X_d + T_a < target`` (``round >= T^{d+j}``; each ``E_b``
    between is at most ``(1 - rho) X_d``). The bound is the smallest over the buckets.
    Memory is ignored (a relaxation); more than ``CLASS_GROUPS_MAX`` groups are merged
    per bucket of counts into a group with the smallest counts and constants of its
    members (again a relaxation). ``tests/test_class_bound.py`` checks it against every plan
    of brute force.
    """
    if not math.isfinite(target) or target <= 0 or bound_classes(space) is None:
        return None
    m = num_micro
    top_all = target / m
    if partner_links and find_partners(space) is None:
        partner_links = False       # (no partners: the same tables either way)
    key = (micro_batch, pools, partner_links)
    try:
        if cache is not None and key in cache:
            tables = cache[key]
        else:
            # (tables kept for other targets keep every end)
            tables = build_class_tables(
                space, sums, cut_bytes, ends, micro_batch, deadline, pools,
                None if optimizer_state_factor is None
                else (optimizer_state_factor, num_micro), partner_links,
                top_all if cache is None else math.inf)
            if cache is not None:
                cache[key] = tables
        if tables is not None and tables.pooled is not None:
            # the stages of every bucket's runs, gathered once ([Note: one pass per run]):
            # every run has top <= target / M and T_a limit at most this one's
            flat_stages(tables.pooled, top_all, target - min(
                0.0, rest_gate_at(m, int(tables.totals.sum()), rho, 0.0, top_all)), deadline)
    except Late:
        return None
    if tables is None:
        return target        # no group can take a micro-batch: no plan
    shape = tables.speeds / tables.speeds.max()
    counting = counted_classes(space) if count else ()
    afters: dict[float, tuple[float, After]] = {}
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
                raise Late
            evals[0] += 1
            scale = fast_scale[0] if q is None else q
            stacked = np.stack(ps)
            found = relaxed_many(tables, m, low, top, target, stacked * top, rho, deadline,
                                 stacked.max(axis=1) * top * FAST_PRICE * scale, counted)
            # (the dual itself, not clipped at M low: the walk needs its slope there too)
            return np.where(np.isnan(found), -math.inf, found)

        if tables.pooled is not None:
            # no prices: a bucket split off the top of another reads that one's suffixes
            # after the dominant stage (same top, a lower low: see counted_run)
            if deadline is not None and time.perf_counter() > deadline:
                raise Late
            evals[0] += 1
            known = afters.get(top)
            found, made = counted_run(tables, tables.pooled, m, low, top, target, rho,
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
    except Late:
        if not done:
            return None
        if len(done) < len(tops):
            # the buckets not reached hold plans with X_d above the last one's top
            done.append((done[-1][1], top_all, m * done[-1][1], price))
    return max(0.0, min(min(b[2] for b in done), target) * SLACK)


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
