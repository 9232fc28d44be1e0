"""The proven bound beside the search: the class bound per size, bisected; the link bound."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from contracts.cluster import Cluster
from contracts.table import CostTable
from solver.beside import Beside, spare_core
from solver.class_bound import class_bound
from solver.class_tables import counts_pools
from solver.evaluate import LayerSums
from solver.link_bound import link_bound
from solver.link_bound import structure as link_structure
from solver.relaxation import counted_classes
from solver.space import ClassSpace, candidate_cuts
from solver.summary import hiding_ratio
from solver.timing import Timing

__all__ = ["work_bound", "class_bounds", "counted_step", "link_bounds", "PROVED"]

log = logging.getLogger(__name__)


def work_bound(costs: CostTable, cluster: Cluster, batch_size: int, micro_batch: int) -> float:
    """``M * work_i / V``: a lower bound on the round time of every plan with this
    micro-batch size (``work_i``: every layer's forward and backward for one micro-batch,
    intercepts included; ``V``: the sum of the bound speeds, solver.timing)."""
    sums = LayerSums.of(costs)
    work = ((sums.fwd_slope[-1] + sums.bwd_slope[-1]) * micro_batch
            + sums.fwd_intercept[-1] + sums.bwd_intercept[-1])
    speed = sum(Timing.of(costs, cluster).bound_speeds.values())
    return (batch_size // micro_batch) * work / speed

CLASS_FIRST_RISE = 1.5
"""The first round of [Note: one target for every size] asks at most this times the
smallest bound so far where that is the work bounds' ([Note: the first target])."""

CLASS_FIRST_RISE_LINKS = 2.0
"""The same where the smallest bound so far is a link bound (slow networks).

[Note: the first target]
The first round asks every size for the midpoint between the smallest bound so far and
the best round, at most a multiple of that bound. With the bound beside the search the
best round is the search's first plan, far above the optimum (ResNet-50 x 32 Jetsons:
the first round asked 0.8508 s, midway to 1.276 s, below twice the work bound 0.4254 s),
and a class bound asked for far more than it can prove proves less (micro-batch 8:
0.4352 s), so the second round only reached 0.643 s, which the first could have proven.
Where the smallest bound is a work bound, the first round now asks at most 1.5 times it
(on ResNet-50 x 32 Jetsons the link bounds are above the work bounds of micro-batches 1 to
4 only, not of the weakest sizes); where it is a link bound (slow networks: every size's
on the 32-device fleets) the factor stays 2. Measured with ``tools/time_planner.py
--once``, the commit before and this one alternating (21:31-21:36 UTC), ResNet-50 on
Jetsons in 5 s: 32 12.3 % -> 5.3 % (5.3 % in two earlier runs with the factor patched,
against 29.9-30.5 %), 16 8.1 % -> 4.1 % (4.3 % twice), 20 12.0 % -> 9.1 %, 24 14.8 % ->
11.6 %, 28 11.6 % -> 7.5 %; 32 in 30 s 1.7 % both, 64 in 30 s 8.7 % -> 8.5 %. The fleets
in 5 s: ResNet-50 of 32 and BERT-small of 16 and 32 the same; ResNet-50 of 16, whose
smallest bounds are work bounds, 253 % -> 278 % (371 % in the bench table's run; its
class bound proves twice the work bound in the first round there). 1.3 was worse than
1.5 on 20-32 Jetsons (15-19 %), and a factor of 1.5 everywhere was worse on the fleets
(ResNet-50 of 32 215 % -> 307 %, BERT-small of 32 229 % -> 335 %)."""

CLASS_FIRST_BUCKETS = 6
"""The priced class bound's first grid of ``X_d`` buckets in the first round of
[Note: one target for every size] (later rounds: ``solver.class_bound.CLASS_BUCKETS``): its
target, halfway up from the work and link bounds, is usually proven in every bucket at
once, and fewer buckets cost fewer DP runs (ResNet-50 x 32 Jetsons, micro-batches 8 to
64 at 0.636 s: 1.17 s of CPU against 1.49 s with 10)."""

CLASS_BOUND_BISECT_TOL = 0.01
"""The class bounds' targets are bisected until the smallest bound is within this share
of the lowest target it did not reach."""

CLASS_BOUND_BESIDE_TOL = 0.001
"""The same, for the last bisection (counted, or priced where no class is counted) of the
bound beside the search, which has its own core until the deadline.

[Note: bisecting on beside the search]
A bisection that ends within 1 % leaves the process beside the search idle until the
deadline: on ResNet-50 x 32 Jetsons in 10, 20 and 30 s it ended after 7.6-8.5 s of CPU
at 0.8215 s (gap 2.03 %, 2.03 %, 1.99 %), the counted trials of 0.8302 s and 0.8259 s
having fallen short, where micro-batch 8 proves 0.8240 s (asked directly: not 0.8260 s).
There the last bisection goes on to this share."""

CLASS_BOUND_FLOOR_NEAR = 0.02
"""[Note: one target for every size]: a size that falls short of a target by less than this
share of it sets the next target to what it proved, if that is above the midpoint."""

CLASS_COUNTED_STEP = 0.02
"""The counted bisection ([Note: one target for every size]) asks at most this share above
the smallest bound so far, where the priced one fell short of a target after its first
round.

[Note: counted steps]
Counting the classes raises the priced bound by a few per cent at most (ResNet-50 x 32
Jetsons, micro-batch 8: 0.8071 s priced, 0.8226 s counted, 1.9 %; x 64: 0.5342 s with two
classes counted, 0.5370 s with all three, in the bucket that sets the bound), and a counted
call that falls short costs seconds. The midpoint towards a best round that the search has
not improved yet asked for far more: on 32 Jetsons in 30 s, where the search found its
plan (0.8378 s) after 29 s, the counted bisection began at 0.8461 s, midway to 0.8851 s,
and spent 6.4 s proving 0.8055 s. Where the priced bisection fell short of a target, each
counted trial is now at most this share above the smallest bound so far (twenty-sixth
session; before, above the lowest target the priced one fell short of, which with the
counted bisection starting at the first near shortfall ([Note: counting from the floor])
asked 0.8352 s where 0.8236 s was provable). Where it never fell short after its first
round (whose quicker tables prove less: 64 Jetsons, micro-batch 32 fell short of 0.4298 s
at 0.4291 s there, and the counted bisection started at once, far below what the prices
prove), the midpoints stay: steps of 2 % from there took 12 rounds of every size to reach
0.5442 s in 30 s, where the midpoints proved 0.5487 s in their first round.

After a counted trial that every size proves, each step is ``CLASS_COUNTED_STEP_AFTER``.
A second step of 2 % lies 4 % above where the prices fell short, more than counting has
been seen to add, and a counted call that falls short there costs the most (32 Jetsons in
10 s: after 0.8215 s, 2 % above the priced 0.8054 s, the trial of 0.8379 s fell short
after 2.6 s of CPU, then 0.8297 s after 1.7 s, and the limit ended the bisection at
0.8215 s, where micro-batch 8 proves 0.8245 s but not 0.8250 s). The thirty-second
session halved the step after each such trial, down to a quarter of it: 1 % next, whose
trial (0.8297 s) fell short in 0.8-1.0 s of CPU, then 0.8256 s in as long, so the 5-s
limit ended at 0.8215 s (2.13 %). A quarter at once asks 0.8256 s, then 0.8235 s and
0.8246 s: measured with ``tools/time_planner.py --once jetsons 32`` (thirty-third
session, load 1.1-1.3), 5 s 2.13 % -> 1.75 % in 4 of 4 runs (bound 0.8245 s), 10 s 1.66
%, 30 s 1.61 %; 64 Jetsons in 30 s 8.25 % and 16 in 5 s 1.25 %, whose priced bisections
never fall short after their first round, the same.

Since the thirty-fourth session the first step after a proven counted trial is an eighth
(0.25 %) and each next one after a proof twice the last, up to ``CLASS_COUNTED_STEP`` (a
search from below that grows its steps: a trial that falls short costs 1.5-2 times one
that is proven, 0.7-0.85 s against 0.45-0.5 s of CPU for micro-batch 8 there, so the
bisection comes at the ceiling from below in small steps first). On 32 Jetsons in 5 s
the quarter asked 0.8256 s after 0.8215 s, fell short and left 0.8235 s to the last 0.5
s, which the limit cut in 3 of 7 runs (2.13 %); now it asks 0.8235 s, proven at 3.0-3.5
s, then 0.8276 s and 0.8256 s: 1.87 % in 7 of 7 runs (0.8235 s), alternating with the
quarter in one script (load 1.0-1.6); in 10 and 30 s the same 0.8245 s either way; 16
Jetsons in 5 s (1.40 %) and 64 in 30 s (8.25 %) unchanged."""

CLASS_COUNTED_STEP_AFTER = CLASS_COUNTED_STEP / 8.0
"""The first counted trial after one that every size proved asks at most this share above
the smallest bound so far, each next one after a proof twice the last step ([Note: counted
steps]): counting adds a few per cent at most over the prices, most of it in the first
step."""


def counted_step(proofs: int) -> float:
    """The most a counted trial asks above the smallest bound so far after ``proofs``
    counted trials that every size proved ([Note: counted steps]): ``CLASS_COUNTED_STEP``
    before the first, then ``CLASS_COUNTED_STEP_AFTER``, twice the last after each further
    one, up to ``CLASS_COUNTED_STEP``."""
    if proofs == 0:
        return CLASS_COUNTED_STEP
    return min(CLASS_COUNTED_STEP_AFTER * 2.0 ** (proofs - 1), CLASS_COUNTED_STEP)


PROVED = 1.0 - 1e-6
"""A class bound at least this share of its target proves the target."""

_TIE = 1.0 + 1e-6
"""Bounds of two sizes within this ratio are the same for the order of the bisection."""


def class_bounds(costs: CostTable, cluster: Cluster, batch_size: int, mbs: Sequence[int],
                  max_cuts: int | None, target: float, proven: dict[int, float],
                  deadline: float, stop_short: bool = False,
                  start: dict[int, float] | None = None,
                  optimizer_state_factor: float | None = None,
                  incumbent: Callable[[], float] | None = None,
                  on_bound: Callable[[float], None] | None = None,
                  split: bool = False,
                  tolerance: float = CLASS_BOUND_BISECT_TOL) -> dict[int, float]:
    """Per micro-batch size without a bound in ``proven``, until the deadline: the larger
    of the work bound and ``class_bound`` (at most ``target``). Only the smallest bound
    over the sizes is reported, so no size is asked for more than the smallest so far.
    Where the pools can be counted (``counts_pools``), each size gets the counted bound
    ([Note: counted pools]) in order of its work bound, for the best round or the
    smallest bound so far where a size fell short of it (the counted bound reaches its
    target where it proves anything: on issue 14's MLP each size in 0.1-0.5 s of CPU). A
    size whose work bound already reaches ``target`` gets no class bound. ``stop_short``:
    stop after the first counted size that falls short of its target; ``start``: other
    bounds per size (the link bound), where the priced bisection starts;
    ``optimizer_state_factor``: the plans' (the priced bound's memory check of mixed
    groups, [Note: rigid groups] in ``solver.class_tables``; None: rigid groups only);
    ``incumbent``: the best round of a search that runs beside ([Note: the bound beside
    the search] in ``solver.beside``), read before each size or round: no size is asked
    for more than it; ``on_bound``: called with the smallest bound over the sizes (of
    the work, ``start`` and class bounds) each time it rises; ``split``: where the pools
    are counted and the host has a spare core, every other size in a forked process
    ([Note: the counted sizes on two cores]); ``tolerance``: where the last bisection of
    the priced bound ends (``CLASS_BOUND_BESIDE_TOL`` beside the search: [Note: bisecting
    on beside the search]).

    [Note: the counted sizes on two cores]
    Without a time limit the counted bound's sizes are independent calls for one target
    (the best round), and on a 2-core host the second core was idle while they ran: on
    the 200-layer MLP x 8 mixed devices 0.70 s of CPU (micro-batch 64 0.09 s, 32 0.09 s,
    16 0.26 s, 8 0.22 s, 4 0.04 s) after 0.42 s of search. With ``split`` (the no-limit
    path of [Note: the order's sizes after the bound]) the sizes, in order of their work
    bound, go in turn to this process and to one forked beside it (``solver.beside``),
    each asking its own in order and lowering its own target where a size falls short.
    With ``stop_short`` a side that falls short stops the other: this process ends the
    child at once (its sizes are left to the caller, as one after the other leaves the
    sizes after a short one), and the child's shortfall stops this process before its
    next size. Every value is a bound of its size, so the merged result is sound; where
    every size reaches the target it is the same as one after the other. A child that
    fails or is late costs nothing but time: its sizes are asked here after all. Measured
    (``tools/time_planner.py --once``): the MLP x 8 1.13-1.23 s -> 0.80-0.83 s wall; the
    8-device ResNet-50 fleet, whose sizes fall short (its wide search then runs), took
    16.9 s against 15.3 s until the sides stopped each other (the parent waited for the
    child's sizes).

    [Note: one target for every size]
    Elsewhere (the priced bound) one target is bisected for all sizes at once, between
    the smallest bound over the sizes so far (first: of the work and link bounds) and the
    lowest target a size fell short of (first: the best round). The first round asks
    every size, weakest first, for the midpoint or twice the smallest bound if lower (on
    fleets the link bound already proves more than that for most sizes, which are then
    skipped); each later one asks the sizes, weakest first, for the next midpoint and
    stops at the first that falls short. The first round builds the quicker tables
    without partner links ([Note: partner links] in ``solver.partners``: on fleets whose
    fast links are wired pairs the groups are several times more), so that every size
    gets a bound within a short limit; the later ones count them. ``class_bound`` filters more
    with a lower target (``M X_d + T_a < target``, buckets up to ``target / M``), so it
    proves a target below the best round more often, and more cheaply, than it proves a
    bound that high when asked for the best round itself: on ResNet-50 x 32 Jetsons,
    micro-batch 8, asked for 0.8746 s it proves 0.6795 s in 0.75 s of CPU, asked for 0.73
    s it proves 0.73 s in 0.5 s. Every value is a bound of its size whatever the target,
    so each size keeps the largest it got. Where no size falls short, the best round
    itself is asked once at the end (within ``CLASS_BOUND_BISECT_TOL``). A size that falls
    short by less than ``CLASS_BOUND_FLOOR_NEAR`` sets the next target to what it proved,
    where that is above the midpoint: it holds for that size already, and the others
    are often stronger (ResNet-50 x 32 Jetsons: micro-batch 8 fell short of 0.8120 s at
    0.8071 s; the next target, 0.7991 s, is where the bound stopped before, and 0.8071 s
    holds for every size). Where it falls short by more, the next size usually does too,
    and each try that falls short costs seconds (64 Jetsons: a target of 0.5508 s after
    0.5687 s cost 4.6 s and proved nothing more). Once this bisection ends short of the
    best round, a second one runs from where it ended up to the best round, with
    ``class_bound(count=True)``: a bucket that still sets a size's bound after its polish
    gets its slowest classes counted ([Note: counted classes] in ``solver.relaxation``; seconds
    a pass, so only once the cheap rounds are done). Where a size falls short of a priced
    target by less than ``CLASS_BOUND_FLOOR_NEAR``, the counted bisection starts at once,
    from what it proved ([Note: counting from the floor]).

    [Note: counting from the floor]
    A size that falls short of a priced target by less than ``CLASS_BOUND_FLOOR_NEAR`` has
    met the prices' duality gap there: on ResNet-50 x 32 Jetsons, micro-batch 8 fell
    short of 0.8188 s at 0.8074 s, then proved 0.8078 s in 2.1 s and fell short of 0.8133
    s at 0.8088 s in 2.4 s more before the priced bisection ended within its tolerance
    (14.5 s into a 20-s limit), and the counted one then asked 0.8295 s, more than the
    rest of the limit could prove. Now the counted bisection starts at the first such
    shortfall, from what that size proved, each trial at most ``CLASS_COUNTED_STEP``
    above the smallest bound so far ([Note: counted steps]), and it asks the size that
    fell short last after the others (they prove the trial in a fraction of a second each,
    so a deadline in the middle of its counted call, seconds long, still leaves every other
    size at the trial; asked first, the others stayed at the last priced round's bound).
    With ``class_bound``'s polish capped where it counts next ([Note: the polish before
    counting] in ``solver.class_bound``), measured with ``tools/time_planner.py --once``
    (02:57-02:59 UTC, load 1.5-1.9, against the same rows at the start of the session):
    32 Jetsons in 20 s 3.77 % -> 1.72 %, in 30 s 2.34 % -> 1.72 %, in 10 s and 5 s the
    same (3.81 %, 5.3 %); 64 Jetsons in 30 s 8.52 % (8.51 %); 16 Jetsons in 5 s 4.09 %
    (the same)."""
    if not math.isfinite(target):
        return {}
    space = ClassSpace(costs, cluster)
    sums = LayerSums.of(costs)
    ends = candidate_cuts(costs, max_cuts)
    rho = hiding_ratio(costs, cluster)
    out: dict[int, float] = {}
    work = {mb: work_bound(costs, cluster, batch_size, mb) for mb in mbs if mb not in proven}
    cap = min(target, min(proven.values(), default=math.inf))
    counted = counts_pools(space)
    for mb, low in work.items():
        if low >= target:       # the work bound proves the target: nothing to add
            out[mb] = low
    shown = 0.0

    def show(have: Mapping[int, float]) -> None:
        """``on_bound`` with the smallest bound over the sizes, where it rose."""
        nonlocal shown
        if on_bound is None:
            return
        now = min([*proven.values(), *(max(work[mb], (start or {}).get(mb, 0.0),
                                           out.get(mb, 0.0), have.get(mb, 0.0))
                                       for mb in work)], default=math.inf)
        if math.isfinite(now) and now > shown:
            shown = now
            on_bound(now)

    show({})
    if counted:
        # the counted bound, every size in order of its work bound, for the best round or
        # the smallest bound so far where a size fell short of it (only the smallest is
        # reported)
        def counted_sizes(sizes: Sequence[int], cap: float, found_out: dict[int, float],
                          shows: bool = True, stop: Callable[[], bool] = lambda: False,
                          fell: Callable[[float], None] = lambda _: None
                          ) -> dict[int, float]:
            for mb in sizes:
                if time.perf_counter() > deadline or stop():
                    break
                if incumbent is not None:
                    cap = min(cap, incumbent())
                found = class_bound(space, sums, costs.cut_bytes, ends, mb, batch_size // mb,
                                    cap, deadline, rho=rho)
                if found is None:
                    break
                found_out[mb] = max(found, work[mb])
                if shows:       # (not in the process beside: the progress is this one's)
                    show({})
                if found_out[mb] < cap * PROVED:     # fell short (else the target holds)
                    cap = found_out[mb]
                    if stop_short:
                        fell(cap)
                        break
            return found_out

        todo = [mb for mb in sorted(work, key=work.__getitem__) if mb not in out]
        if not (split and len(todo) > 1 and spare_core()):
            return counted_sizes(todo, cap, out)
        # [Note: the counted sizes on two cores]
        theirs = todo[1::2]
        # (stop_short: a side that falls short stops the other: the child publishes its
        # shortfall, read here before each size; this process ends the child)
        child = Beside(lambda _incumbent, publish: counted_sizes(
            theirs, cap, {}, False, fell=publish), cap)
        fell_here: list[float] = []
        try:
            counted_sizes(todo[::2], cap, out,
                          stop=lambda: stop_short and not math.isnan(child.published),
                          fell=fell_here.append)
            if fell_here:
                # (this side fell short: as one after the other, no more sizes; the
                # child's are left to the caller)
                return out
            ok, found = child.result(deadline)
        finally:
            child.close()
        if ok:
            out.update(found)
        else:
            log.warning("the counted class bound beside this process failed (%s): its "
                        "sizes are bounded here", found)
            counted_sizes([mb for mb in theirs if mb not in out], cap, out)
        return out
    # priced: one target for every size at once, bisected between the smallest bound so
    # far and the lowest target a size fell short of ([Note: one target for every size])
    have = {mb: max(work[mb], (start or {}).get(mb, 0.0)) for mb in work if mb not in out}
    # [Note: the first target]: a smaller first step above the work bounds than above
    # the link bounds
    weakest_at = min(have, key=have.__getitem__, default=None)
    rise = CLASS_FIRST_RISE if weakest_at is None or have[weakest_at] <= work[weakest_at] \
        else CLASS_FIRST_RISE_LINKS
    high, short, rounds = cap, False, 0
    floor = 0.0     # what the size that fell short last proved: the next target, if higher
    cache: dict[tuple[int, bool, bool], Any] = {}    # the tables of each size, built once
    counting = False    # [Note: counted classes]: the second bisection, with them counted
    countable = bool(counted_classes(space))
    priced_fell = False     # whether the priced bisection fell short after its first round
    proofs = 0          # the counted trials every size proved ([Note: counted steps])
    weakest = 0         # the size that fell short last
    while have and time.perf_counter() < deadline:
        if incumbent is not None and incumbent() < cap:
            cap = incumbent()
            high = min(high, cap)
        low = min(have.values())
        # (the last bisection to `tolerance`, the priced one before counting to 1 %)
        tol = tolerance if counting or not countable else CLASS_BOUND_BISECT_TOL
        ended = low >= high * PROVED or (short and high <= low * (1.0 + tol))
        # [Note: counting from the floor]: a size fell short by less than
        # CLASS_BOUND_FLOOR_NEAR (`floor` is what it proved): the counted bisection starts
        # from there
        near = not counting and short and floor > 0.0
        if ended or (near and countable and floor < cap * PROVED):
            if counting or not countable or low >= cap * PROVED:
                break
            # the priced bisection has ended: again from there up to the best round, the
            # slowest classes counted where the prices fall short
            counting, high, short = True, cap, False
            low, floor = max(low, floor), 0.0
        # the target itself, once, where no size fell short and the rest is within the
        # tolerance: the class bound may prove the best round outright
        trial = high if not short and high <= low * (1.0 + tol) \
            else max((low + high) / 2, floor) if rounds else min((low + high) / 2, rise * low)
        if counting and priced_fell:    # [Note: counted steps]
            trial = min(trial, low * (1.0 + counted_step(proofs)))
        floor = 0.0
        first_round, fell = not rounds, False
        rounds += 1
        # (weakest first; among those at the smallest bound, the size that fell short last
        # first, or last where classes are counted: [Note: counting from the floor])
        for mb in sorted(have, key=lambda mb: (have[mb] if have[mb] > low * _TIE else low,
                                               (mb == weakest) if counting
                                               else (mb != weakest))):
            if have[mb] >= trial * PROVED:
                continue
            value = class_bound(space, sums, costs.cut_bytes, ends, mb, batch_size // mb,
                                trial, deadline, rho=rho, pools=False, cache=cache,
                                buckets=CLASS_FIRST_BUCKETS if first_round else None,
                                max_evals=CLASS_FIRST_BUCKETS if first_round else None,
                                optimizer_state_factor=optimizer_state_factor,
                                partner_links=not first_round, polish=not first_round,
                                count=counting)
            if value is None:
                return {**out, **have}
            have[mb] = max(have[mb], value)
            show(have)
            if value < trial * PROVED:     # fell short: a lower target next
                high, short, fell, weakest = trial, True, True, mb
                if not counting and not first_round:    # (not its quicker tables)
                    priced_fell = True
                floor = have[mb] if have[mb] >= trial * (1.0 - CLASS_BOUND_FLOOR_NEAR) \
                    else 0.0    # (below the trial: sizes that reached it are not asked)
                if not first_round:     # (the first round asks every size)
                    break
        if not fell and trial >= high:  # the best round itself is proven
            break
        if counting and not fell:
            proofs += 1
    out.update(have)
    return out


def link_bounds(costs: CostTable, cluster: Cluster, batch_size: int, mbs: Sequence[int],
                max_cuts: int | None, deadline: float | None = None) -> dict[int, float]:
    """``solver.link_bound.link_bound`` per micro-batch size, as many as the
    ``time.perf_counter()`` deadline allows: a lower bound on every plan of the wide space
    on the candidate cuts."""
    out: dict[int, float] = {}
    if not mbs:
        return out
    cluster = cluster.for_costs(costs)
    space = ClassSpace(costs, cluster)
    sums = LayerSums.of(costs)
    ends = candidate_cuts(costs, max_cuts)
    raw = link_structure(space)
    for mb in mbs:
        if deadline is not None and time.perf_counter() > deadline:
            break
        out[mb] = link_bound(space, sums, costs.cut_bytes, ends, mb, batch_size // mb, raw)
    return out
