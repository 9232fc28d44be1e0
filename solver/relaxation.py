"""The class bound's relaxed DP: the smallest round of any plan, with devices priced or counted."""

from __future__ import annotations

import bisect
import functools
import logging
import math
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from solver.class_tables import ClassTables, Late, bound_classes, counts_pools
from solver.link_floors import ABOVE, TAIL_SLACK
from solver.space import ClassSpace

log = logging.getLogger(__name__)

__all__ = ["CLASS_COUNTED_STATES", "relaxed", "relaxed_many", "counted_classes", "prefix_lows",
           "compiled_rows", "give_up_compiled", "gate_levels", "rest_gate_at"]

_AFTER_LEVELS = 4
"""Stages right after the dominant one whose all-reduce ``relaxed`` checks."""

_PRICED_AFTER_LEVELS = 12
"""The same for ``relaxed`` (each level costs it little: one table of suffixes by ``a``);
a deep pipeline after the dominant stage otherwise hides all-reduces behind
``rest_gate_at``, which is no bound past ``j (1 - rho) > M``."""

COMPILED = True
"""Run ``relaxed_many``'s passes compiled ([Note: the compiled priced pass] and [Note: the
compiled counted pass] in ``solver.relaxation_compiled``; False: this module's numpy code,
the reference of the tests, and what runs once a compiled pass has failed in a
process)."""

_CHORD_POINTS = 3
"""``a`` values at which ``relaxed`` takes the dominant stage's minimum exactly."""

CLASS_COUNTED_STATES = 2000
"""The polish of ``class_bound``'s priced bound counts the devices of its slowest classes
exactly where that takes at most this many states (``prod (n_k + 1)`` over them): [Note:
counted classes]."""

_COUNTED_DTYPE: type[np.floating[Any]] = np.float32
"""The tables of ``relaxed_many`` where classes are counted ([Note: counted classes]):
single precision, 1.7 times quicker than double on ResNet-50 x 32 Jetsons with all
three classes counted (2.9 s a pass against 5.0 s); its rounding is taken off the value."""


def relaxed(tables: ClassTables, m: int, low: float, top: float, limit: float,
            prices: np.ndarray, rho: float = 0.0, deadline: float | None = None,
            fast_price: float = 0.0) -> float:
    """``L``: the smallest value of bound (A) of [Note: the class bound] over relaxed plans
    whose stages all have ``x <= top``, whose dominant stage has ``X > low`` and whose
    stages up to the dominant one keep ``M X_d + T_a < limit``, with devices priced at
    ``prices`` per class instead of limited to the cluster's counts; ``Late`` once the
    ``time.perf_counter()`` deadline has passed."""
    return float(relaxed_many(tables, m, low, top, limit, np.asarray(prices)[None], rho,
                              deadline, np.array([fast_price]))[0])


def relaxed_many(tables: ClassTables, m: int, low: float, top: float, limit: float,
                 prices: np.ndarray, rho: float = 0.0, deadline: float | None = None,
                 fast_prices: np.ndarray | None = None,
                 counted: tuple[int, ...] = ()) -> np.ndarray:
    """``relaxed`` at ``K`` prices at once (``prices``: K x classes; ``fast_prices``: K, or
    None for 0): the ``K`` values, each the same as ``relaxed``'s up to rounding; the
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
    ``solver.bound_bisection.class_bounds`` asks for that only in a second bisection, after the
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
    # the same, with the first stages after the dominant one at positions j = 1 .. J:
    # round >= T^{d+j} >= sum_{i<d} E_f^i + M X_d - sum_{i=d}^{d+j-1} E_b^i + T_a^{d+j}
    # >= (M - j (1 - rho)) X_d + T_a^{d+j} (E_b <= (1 - rho) X <= (1 - rho) X_d, rho the
    # hiding ratio), so the stage at position j keeps that with `low` for X_d below
    # `limit`; `placed[:, j - 1]`: tails whose first stage is at position j
    gates, levels = gate_levels(m, rho, low, _PRICED_AFTER_LEVELS if not counted
                                else _AFTER_LEVELS)
    late, late_ta = _late_gate(m, rho, low)
    rest_gate = rest_gate_at(m, int(tables.totals.sum()), rho, low, top)
    # (single precision where classes are counted: their tables are large; allowed for in
    # the value below)
    dtype = _COUNTED_DTYPE if counted else np.float64
    if counted:
        prices = prices.copy()
        prices[:, list(counted)] = 0.0          # (counted: no price)
    cost = tables.counts @ prices.T                                           # (G, K)
    if tables.fast is not None and fast_prices is not None:
        # [Note: partner links]: each member over a partner's link costs fast_price
        cost = cost + tables.fast[:, None] * fast_prices[None]
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
    # what the prices pay back (they cancel in the value; the floors allow for them)
    paid = prices @ tables.totals
    if tables.fast is not None and fast_prices is not None:
        paid = paid + fast_prices * tables.fast_total
    # [Note: counted classes]: one axis of the count vectors of the counted classes the
    # suffix uses, in order of their bound speed ([Note: states by speed]; none counted:
    # one state); `states.kinds` puts a stage's suffix that uses `u` where the stage with
    # `v` of them before it makes `u + v`
    states = _CountStates(tables, counted, top)
    floors = _Floors(tables, n_k, levels, count, m, low, limit, paid, bool(counted))
    compiled = _compiled_passes() if COMPILED else None
    if compiled is not None and (deadline is None or _built(compiled, bool(counted))):
        # [Note: the compiled priced pass], [Note: the compiled counted pass]: the same DP,
        # compiled ([Note: building the compiled passes]: not inside a deadline)
        if deadline is not None and time.perf_counter() > deadline:
            raise Late
        args = (tables, m, low, top, limit, cost, gates, late, late_ta, rest_gate, points,
                chords)
        try:
            found = (compiled.counted_pass(*args, states.flat(tables), floors.flat(count),
                                           deadline)
                     if counted else compiled.priced_pass(*args, deadline))
        except Late:
            raise
        except Exception as exc:    # (a numba that cannot build it: numpy from now on)
            give_up_compiled(exc)
        else:
            return _paid_back(found, paid, dtype, tables)
    n_states = states.size
    # (per price, row, state and a; the last table, `placed[:, levels]`, is `after`:
    # suffixes after the dominant stage at any position)
    placed = np.full((n_k, levels + 1, count + 1, n_states, a_max), inf, dtype)
    placed[:, :, count, 0, 0] = 0.0             # (state 0: no device used)
    after = placed[:, levels]
    # per row whether the tails of the dominant stage (the first level's; `after` where
    # there are none) hold a suffix
    tails = placed[:, 0]
    held = np.zeros(count + 1, dtype=bool)
    held[count] = True
    gate_arr = np.asarray(gates)
    with_d = np.full((n_k, count + 1, n_states), inf, dtype)  # suffixes with the dominant stage
    usage = tables.counts[:, list(counted)].astype(int)     # (G, counted classes)
    m_low = m * low
    for i in range(count - 1, -1, -1):
        if deadline is not None and not i % 8 and time.perf_counter() > deadline:
            raise Late
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
        # `levels`: round >= T^{d+j} >= (M - j (1 - rho)) X_d + T_a (rest_gate)
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
    return _paid_back(with_d[:, 0].reshape(n_k, -1).min(axis=1).astype(np.float64), paid,
                      dtype, tables)


def give_up_compiled(exc: Exception) -> None:
    """A compiled pass (or ``build_class_tables``'s compiled rows) failed (``exc``): this
    process's passes run in numpy from now on (``COMPILED`` off), the same values more
    slowly; said once."""
    global COMPILED
    COMPILED = False
    log.warning("the class bound's compiled pass failed (%s): its passes run in numpy "
                "from now on, 3-6 times slower", exc)


@functools.cache
def _compiled_passes() -> ModuleType | None:
    """``solver.relaxation_compiled`` (its ``priced_pass``, ``counted_pass`` and
    ``built``), or None (once warned) where numba cannot be imported: this module's numpy
    pass then, the same values more slowly."""
    try:
        import solver.relaxation_compiled as compiled
    except ImportError as exc:
        log.warning("the class bound's compiled pass is not available (%s): its passes run "
                    "in numpy, 3-6 times slower; `pip install numba` to fix", exc)
        return None
    return compiled


def load_compiled() -> None:
    """The compiled passes loaded into this process now, where they are built (numba's
    import and the passes' load: 0.5-0.7 s; [Note: the bound's process from the start] in
    ``solver.anytime``); nothing where they are not built, are off, or fail to load (their
    first call then says why, as before)."""
    compiled = _compiled_passes() if COMPILED else None
    if compiled is None or not (compiled.built(False) and compiled.built(True)):
        return
    try:
        compiled.build()        # (built: this loads them)
    except Exception as exc:    # noqa: BLE001 - the passes' first call deals with it
        log.info("the class bound's compiled passes did not load ahead: %s", exc)


def compiled_rows(deadline: float | None) -> Callable[..., np.ndarray] | None:
    """``solver.relaxation_compiled.fill_row`` where the priced pass may run compiled (on,
    importable, and built or no deadline: [Note: building the compiled passes]), for
    ``build_class_tables``'s priced rows; None: its numpy rows, the same floats."""
    compiled = _compiled_passes() if COMPILED else None
    if compiled is None or not (deadline is None or _built(compiled, False)):
        return None
    fill: Callable[..., np.ndarray] = compiled.fill_row
    return fill


_UNBUILT_SAID: list[bool] = []
"""Whether this process has said that a pass is not built yet (once)."""


def _built(compiled: ModuleType, counted: bool) -> bool:
    """Whether ``compiled``'s priced or counted pass is built ([Note: building the compiled
    passes]); where not, said once: this call runs in numpy."""
    if compiled.built(counted):
        return True
    if not _UNBUILT_SAID:
        _UNBUILT_SAID.append(True)
        log.info("the class bound's compiled passes are not built yet: within a time limit "
                 "they run in numpy (3-6 times slower); `python -m solver.relaxation_compiled`"
                 " builds them once per install (about 10 s)")
    return False


def _paid_back(found_all: np.ndarray, paid: np.ndarray, dtype: Any,
               tables: ClassTables) -> np.ndarray:
    """``relaxed_many``'s values from the smallest relaxed plans per price (``found_all``):
    the prices paid back, less the rounding; inf where no relaxed plan is in the bucket."""
    # the prices cancel: allow for the rounding of the large terms; where classes are
    # counted the tables are single precision: a value sums one term per stage (at most
    # one stage per device), all >= 0, each term and each sum rounded by at most 2^-24 of
    # the sum (eps / 2)
    rounding = ((2 * int(tables.totals.sum()) + 4) * float(np.finfo(dtype).eps) / 2
                if dtype != np.float64 else 1e-10)
    with np.errstate(invalid="ignore"):
        out = found_all - paid - rounding * (np.abs(found_all) + np.abs(paid))
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
    """The states of ``relaxed_many``'s tables where classes are counted: the count vectors
    of the counted classes, in order of their bound speed ([Note: states by speed]); one
    state where none is.

    [Note: states by speed]
    A suffix of the relaxed DP from a row that uses the count vector ``u`` of the counted
    classes is one of a real plan only where the layers before the row fit on the devices
    left: each stage of a bucket has ``x <= top`` and ``x U >= work`` (``U``: its group's
    bound speed; ``ClassTables.work``), so the head's work is at most ``top`` times the
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

    def __init__(self, tables: ClassTables, counted: tuple[int, ...], top: float) -> None:
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
            reach = top * ABOVE
            # (and the float error of the states' speeds, summed in another order)
            self.low = tail * TAIL_SLACK / reach - others - total * 1e-9
            self.high = total - head * TAIL_SLACK / reach + total * 1e-9

    def flat(self, tables: ClassTables) -> tuple[np.ndarray, ...]:
        """The states as ``solver.relaxation_compiled.counted_pass`` reads them: per group
        its kind (the devices of the counted classes it takes); per kind the states it fits
        in (``_fit``), laid end to end (where each kind's start, then the states a stage
        puts its suffix in and those the suffix comes from: a stage that skips the states
        its kind does not fit costs a quarter of a counted pass); the states' bound speeds
        (non-decreasing) and per row the range of speeds it keeps (``kinds``' ``low`` and
        ``high``; unbounded where those are not known). The kinds are cached in
        ``tables.compiled`` per set of counted classes."""
        key = f"kinds{self.counted}"
        held = tables.compiled.get(key)
        if held is None:
            used = tables.counts[:, list(self.counted)].astype(int)
            codes, kind_of = np.unique(np.ravel_multi_index(tuple(used.T), self.dims),
                                       return_inverse=True)
            fitted = [self._fit(np.asarray(np.unravel_index(code, self.dims)))
                      for code in codes.tolist()]
            kind_at = np.zeros(len(codes) + 1, dtype=np.int64)
            np.cumsum([len(fits) for fits, _ in fitted], out=kind_at[1:])
            held = tables.compiled[key] = (
                kind_of.reshape(-1).astype(np.int64), kind_at,
                np.concatenate([fits for fits, _ in fitted]).astype(np.int64),
                np.concatenate([src for _, src in fitted]).astype(np.int64))
        rows = len(tables.rows)
        low = self.low[:rows] if self.low is not None else np.full(rows, -math.inf)
        high = self.high[:rows] if self.high is not None else np.full(rows, math.inf)
        return (*held, np.ascontiguousarray(self.speed, dtype=np.float64),
                np.ascontiguousarray(low, dtype=np.float64),
                np.ascontiguousarray(high, dtype=np.float64))

    def _fit(self, kind: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The states a stage taking the count vector ``kind`` fits in (``u >= kind``, in
        order) and, for each, the state the suffix after it comes from (``u - kind``)."""
        fits = np.nonzero((self.vecs >= kind).all(axis=1))[0]
        return fits, self.position[np.ravel_multi_index(tuple((self.vecs[fits] - kind).T),
                                                        self.dims)]

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
                fits, src = self._fit(used[first[j]])
                at = self._at[code] = (fits, self.speed[fits].tolist(), src)
            into, speed, src = at
            if bounded:
                a, b = bisect.bisect_left(speed, low), bisect.bisect_right(speed, high)
                into, src = into[a:b], src[a:b]
            if len(into):
                out.append((members[j], into, src))
        return out


class _Floors:
    """Per row the smallest value of each table of ``relaxed_many`` (after the dominant
    stage at any position, at each level, and holding it), where classes are counted and
    ``ClassTables.work`` is known: a stage whose value, the smallest suffix after it and
    the least the stages before its row add already reach the limit (and the prices the
    value pays back) is left out ([Note: floors of the counted tables]). Elsewhere
    every step keeps every stage.

    [Note: floors of the counted tables]
    Every value of the tables only grows as stages are put before it: each stage adds at
    least its ``x`` and its price (>= 0), the dominant one at least ``x_d + (M - 1) low /
    2`` (as in ``counted_run``), and the stages before a row at least the head's work over
    the cluster's bound speed. A relaxed plan at or above ``limit + lambda . n`` has a
    value of at least ``limit``, and the bound is at most the limit, so leaving out the
    stages that lead only to such plans does not change it."""

    def __init__(self, tables: ClassTables, n_k: int, levels: int, count: int, m: int,
                 low: float, limit: float, paid: np.ndarray, on: bool) -> None:
        self.on = on and tables.work is not None and math.isfinite(limit)
        if not self.on or tables.work is None:
            return
        # (single precision tables: their rounding, with room)
        self.limit = ((limit + paid) * (1.0 + 1e-5))[:, None]                  # (K, 1)
        self.head, self.dom_low = prefix_lows(tables, tables.work[0], m, low)
        inf = math.inf
        self.fl_after = np.full((n_k, count + 1), inf)
        self.fl_after[:, count] = 0.0
        self.fl_levels = np.full((n_k, levels + 1, count + 1), inf)
        self.fl_levels[:, :, count] = 0.0
        self.fl_d = np.full((n_k, count + 1), inf)

    def flat(self, rows: int) -> tuple[bool, np.ndarray, np.ndarray, float]:
        """Whether the floors are on, the limit per price, what the stages before each row
        add at least and what the dominant stage adds beyond its ``x``, as
        ``solver.relaxation_compiled.counted_pass`` reads them."""
        if not self.on:
            return False, np.zeros(1), np.zeros(rows), 0.0
        return (True, np.ascontiguousarray(self.limit[:, 0], dtype=np.float64),
                np.ascontiguousarray(self.head[:rows], dtype=np.float64), float(self.dom_low))

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


def prefix_lows(tables: ClassTables, head: np.ndarray, m: int,
                low: float) -> tuple[np.ndarray, float]:
    """What the stages before each row add to a relaxed plan's value at least (``head``:
    the work before each row, over the cluster's bound speed), and what the dominant stage
    adds beyond its ``x`` (``(M - 1) low / 2``), both a little less for the float error
    ([Note: floors of the counted tables])."""
    return (head / float(tables.totals @ tables.speeds) * TAIL_SLACK,
            (m - 1) * low / 2 * TAIL_SLACK)


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
    ``relaxed_many`` is a few numpy calls for all of them.

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


def _shift_min(table: np.ndarray, values: np.ndarray) -> None:
    """``table[..., min(a + 1, A - 1)] = min(that, values[..., a])`` for every ``a``, in place:
    one more stage after the dominant one (``a`` counts at most ``A - 1``)."""
    np.minimum(table[..., 1:], values[..., :-1], out=table[..., 1:])
    np.minimum(table[..., -1], values[..., -1], out=table[..., -1])


def gate_levels(m: int, rho: float, low: float,
                most: int = _AFTER_LEVELS) -> tuple[list[float], int]:
    """``(gates, levels)``: for the stages at positions ``j = 1 .. levels`` after the
    dominant one, ``(M - j (1 - rho)) low``, a lower bound of ``(M - j (1 - rho)) X_d``
    while the factor is >= 0 (``levels``: the positions up to the first negative factor,
    at most ``most``; with a negative factor ``low`` is no bound, and the
    position is left to ``rest_gate_at``)."""
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
    ``rest_gate_at`` it does not fall with the position: a deep pipeline after the dominant
    stage cannot hide an all-reduce of any size behind its ``E_b``."""
    g = m - (1.0 - rho) * (m + 1) / (2.0 * (2.0 - rho))
    return g * low, 1.0 / (2.0 - rho)


def rest_gate_at(m: int, n_total: int, rho: float, low: float, top: float) -> float:
    """A lower bound of ``(M - j (1 - rho)) X_d`` for a stage at any position ``j <= n -
    1`` after the dominant one, ``X_d`` in ``(low, top]``: ``round >= T^{d+j} >= (M - j (1 -
    rho)) X_d + T_a^{d+j}`` ([Note: the class bound]); ``T_a < round`` alone does not hold
    past ``j (1 - rho) > M`` (docs/planner.md's example: ``M = 1``, ``T_a^3 = 9`` in a round
    of 8.1)."""
    c = m - (n_total - 1) * (1.0 - rho)
    return c * low if c >= 0.0 else c * top
