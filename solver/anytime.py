"""Anytime planning: the exact search in phases, with the best plan so far and its proven gap.

[Note: anytime planning]
``search`` runs the Asteroid DP (``solver.dp``) in phases, each exact over its space and
each starting from the best round time so far (the incumbent, which only prunes):

0. the quick baselines' plans (``solver.baselines``): a safety net (a baseline plan
   outside the DP's spaces, with equal shares or another order of a group, is kept when
   it is better) and a first incumbent;
0'. with a time limit on a large cluster, iterative widening ([Note: iterative widening]
   in ``solver.widening``, [Note: when to widen] below): exact plans of sub-clusters of a
   few devices, lifted to the whole cluster, as the incumbent (never as a bound);
1. the paper's space: slices of the capability order (fast: one order);
1'. on 16-32 boards of a few types, the even groups of every order ([Note: the even
   phase] below): a quick search of plans the capability order cannot hold;
2. the baselines that run a planning search of their own (DAPPLE), on small clusters;
3. the wide space: every group in every order, as counts of interchangeable devices
   (``space="classes"``, [Note: device classes] in ``solver.space``). When it finishes
   the plan is optimal over every plan of the wide space on the candidate cuts (the
   space of ``planner="ilp-wide"``); where the wide space holds nothing better than the
   incumbent, that proves the incumbent optimal.

The wide space grows with the number of classes: a pool is a count per class, so a
cluster of ``n_k`` devices in class ``k`` has ``prod (n_k + 1)`` pools and ``prod (n_k +
1)(n_k + 2) / 2`` (pool, group) pairs (``wide_size``). Eight devices of four types have
1080 pairs; eight devices of eight different speeds 6561; sixteen Jetsons of three types
12348.

* Without a time limit (``time_limit=None``) phases 1 and 2 run to their end, so the plan
  is optimal over the paper's space, and phase 3 runs to its end when the wide space has
  at most ``WIDE_EXACT_MAX`` pairs (then the plan is optimal over every order). A larger
  wide space is not searched; the plan says so (``stopped="size limit"``) with the gap to
  the proven bound below.
  A wide space of up to ``WIDE_SHORT_MAX`` pairs is searched after all where the
  bounds leave a gap ([Note: the wide space where the bound falls short]).
* With a time limit (a wall-clock deadline) every phase runs until the deadline (less the
  class bound's share, below, on a host without a spare core), the wide one whatever its
  size; ``time_limit=inf`` searches every order to the end, however long that takes.

The result is the best plan found with a *proven* lower bound on the wide space's
optimum: per micro-batch size, the bound its finished wide search proved
(``DPResult.bounds``), or else the work bound ``M * work / (sum of bound speeds)``: some
stage has ``X`` at least the average ``work / V`` and every round is at least ``M X`` of
its dominant stage (``[Note: incumbent pruning]`` in ``solver.dp``), raised to the class
bound (``solver.class_bound``, [Note: the class bound]) where the wide search did not finish:
with a time limit and a wide space of more than ``WIDE_EXACT_MAX`` pairs the bound runs in
a process beside the search for the whole limit where the host has a spare core ([Note:
the bound beside the search] in ``solver.beside``), else the search stops
``CLASS_BOUND_LIMIT_SHARE`` of the limit before the deadline (``CLASS_BOUND_COARSE_SHARE``
where the bound counts coarser classes) and the bound runs until the
deadline (cut short there, it keeps what it proved so far); without a limit it gets up
to the search's own time, or as long as a search shorter than ``CLASS_BOUND_AFTER_S``
took, and where it counts the pools (``solver.class_tables.counts_pools``) up to
``CLASS_COUNTED_S`` after any search.
The gap ``(round - bound) / bound`` goes into ``plan.planner.bound``; the work bound
ignores communication and integer shares, so a search stopped early reports a large but
honest gap.

[Note: the order's sizes after the bound]
Without a time limit, where phase 3 does not run (more than ``WIDE_EXACT_MAX`` pairs) and
the class bound counts the pools, the counted bound proves most micro-batch sizes over
every order at the best round. Phase 1's pass over every candidate cut then runs only
for the ``ORDER_FIRST_SIZES`` sizes its coarse pass found most promising (the DP's
``full_sizes``). The counted class bound follows, for the best round, until a size falls
short of it (``PROVED``). Where every size reaches it, no other size needs the order's
pass: a size the class bound proves has no plan in any order below the best round (less
the bound's slack), so the paper's space holds none either, and ``order_optimal`` still
holds. Where a size falls short (the bound is weak there, or a better plan is at that
size), every size left out gets the order's pass with the best round as incumbent, as
before, then the class bound for the sizes it has not reached, for the (maybe new) best
round or the short size's bound if lower. The sizes done keep their bounds: a class
bound for a higher target is still a lower bound on every plan of its size, so the
reported bound is sound, though where the order's pass finds a better round it may
differ from the one of the old sequence (each size's bound for the final round) either
way. The link bound runs only for the sizes still short. Where the first sizes find no
plan, the others are searched at once.

[Note: the wide space where the bound falls short]
Without a time limit, a wide space of more than ``WIDE_EXACT_MAX`` pairs is left out
because its search can take long where the bounds prove the plan anyway (the 200-layer
MLP on eight mixed devices: 1080 pairs, 31 s of CPU for the wide search against 2 s for
the search with the counted bound). Where they do not, the best plan of one order may be
far from the optimum: on a fleet whose few fast links are wired pairs, the capability
order puts a pair's members apart, and the best plans give each pair a stage of its own
(ResNet-50 on the 8-device fleet of ``tools/time_planner.py``: 7.03 s in the capability
order, 5.92 s over every order; no bound closes that gap). So where the wide space has
at most ``WIDE_SHORT_MAX`` pairs and the bounds fall short of the best round (the
counted bound at the first size it falls short on, the wide search then replacing the
order's pass over the sizes left out; else the bounds of every size), the wide space is
searched to its end with the best round as incumbent: the plan is then optimal over
every order (``stopped=""``, gap 0), as below ``WIDE_EXACT_MAX``.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace

from contracts.arguments import is_number
from contracts.cluster import Cluster
from contracts.errors import AsteroidError, PlanError
from contracts.plan import Plan, PlannerInfo, SearchBound
from contracts.table import CostTable
from solver.beside import Beside, spare_core
from solver.bound_bisection import (
    CLASS_BOUND_BESIDE_TOL,
    PROVED,
    class_bounds,
    link_bounds,
    work_bound,
)
from solver.class_tables import bound_classes, counts_pools
from solver.diagnose import no_fit_error
from solver.dp import DPResult, asteroid_dp
from solver.evaluate import evaluate
from solver.relaxation import load_compiled
from solver.space import (
    DEFAULT_MAX_CUTS,
    ClassSpace,
    candidate_cuts,
    device_classes,
    micro_batch_choices,
)
from solver.widening import Widened, widen

__all__ = ["Progress", "SearchReport", "search", "search_or_raise",
           "check_time_limit", "wide_size", "WIDE_EXACT_MAX",
           "ALTERNATIVES_MAX"]

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
"""``(fraction done in [0, 1], what)``: called as the search advances."""

PLANNER_VERSION = "2"
"""Version of the asteroid planner's plans (2: every device order searched, proven bounds)."""

_ORDER_SHARE = 0.2
"""Share of the progress bar given to the first phase (the paper's space)."""


@dataclass(frozen=True)
class SearchReport:
    """The best plan (None: nothing fits, or nothing found before the deadline), its
    round time, what was proven (``bound``) and whether every phase ran to its end."""

    plan: Plan | None
    round_time_s: float
    bound: SearchBound | None
    phases: tuple[str, ...]
    complete: bool
    #: the plans that were the best so far and lost it, the latest first (at most
    #: ``ALTERNATIVES_MAX``): what ``solver.alternatives`` simulates
    alternatives: tuple[Plan, ...] = ()


ALTERNATIVES_MAX = 8
"""How many earlier incumbents a search keeps (``SearchReport.alternatives``)."""


WIDE_EXACT_MAX = 700
"""Without a time limit, the wide space is searched to its end when it has at most this
many (pool, group) pairs (``wide_size``); measured on the 2-core development host: eight
Jetsons of three types (600 pairs) take about 5 s of CPU."""


WIDE_SHORT_MAX = 3000
"""Without a time limit, a wide space of more than ``WIDE_EXACT_MAX`` pairs but at most
this many is searched to its end after all where the bounds do not prove the best round
([Note: the wide space where the bound falls short]); measured on the 2-core development
host: the 8-device fleets of ``tools/time_planner.py`` (1080 pairs) take 1.4 s of CPU
(BERT-small) and 16 s (ResNet-50), one with another wired pair (2916 pairs) 1.9 s and
21 s, and with 4374 pairs 3.8 s and 54 s."""


WIDE_UNLIMITED_S = 2.0
"""Without a time limit, a wide space of more than ``WIDE_SHORT_MAX`` pairs but at most
``WIDE_ANYTIME_MAX`` is searched for this many seconds (wall clock) after the paper's
space.

[Note: a glimpse of every order]
Without a limit such a wide space is not searched to its end: ResNet-50 on 16 Jetsons
(12348 pairs) takes 147 s of CPU to prove its optimum, 1.3706 s, 6.4 % below the paper's
space's 1.464 s. A few seconds of it often find most of that: the first passes over
balanced coarse cuts ([Note: coarse passes] in ``solver.dp``) see plans the capability
order cannot hold. The plan may then depend on the host's speed, but it is never worse
than the paper's space's optimum, which is searched to its end first; a wide search that
finishes in the time proves its plan optimal over every order."""

NO_FIT_WIDE_S = 10.0
"""Without a time limit, where no plan of the capability order fits and the wide space has
more than ``WIDE_SHORT_MAX`` pairs, seconds (wall clock) the search over every order gets
to find one before the planner says that none fits ([Note: no plan to prune by])."""

# [Note: no plan to prune by]
# Where no plan of the capability order fits, the wide search has no incumbent: nothing
# it builds is pruned, and its tables grow until it ends. On PAC's memory-capped phase-1
# clusters of the 32-device fleet (examples/clusters/fleet-32.yaml, GPT-small, devices
# capped below their workspace) it grew by about 30 MB/s and was killed by the kernel at
# 17 GB after 11 minutes. Without a limit it is therefore searched to its end only up to
# ``WIDE_SHORT_MAX`` pairs and for ``NO_FIT_WIDE_S`` above (a plan it finds is kept, and
# the search goes on as usual); ``search_or_raise`` then says what was searched with the
# diagnosis of ``solver.diagnose``. ``time_limit=inf`` searches every order to its end.

WIDE_ANYTIME_MAX = 100_000
"""With a time limit, the first phase (one order) gets half of it when the wide space has
at most this many pairs, and all of it above (where the wide search cannot get far)."""


def wide_size(costs: CostTable, cluster: Cluster) -> int:
    """The (pool, group) pairs of the wide space: ``prod (n_k + 1)(n_k + 2) / 2`` over the
    classes of interchangeable devices."""
    size = 1
    for members in device_classes(cluster, costs):
        n = len(members)
        size *= (n + 1) * (n + 2) // 2
    return size


WIDEN_MIN_DEVICES = 9
"""[Note: when to widen]: only clusters of at least this many devices are widened."""

WIDEN_SHARE = 0.4
"""[Note: when to widen]: the share of the search's time (up to its own deadline) that
the sub-clusters get, from the start of the search."""


WIDEN_UNLIMITED_S = 2.0
"""[Note: when to widen]: the seconds (wall clock) the sub-clusters get without a time
limit."""


EVEN_POOLS_MAX = 4000
"""[Note: the even phase]: only clusters with at most this many pools (``prod (n_k +
1)`` over the classes) get it: 16 Jetsons of three types have 252, 32 have 1584, 64
have 10648 (there a pass on 12 cuts at micro-batch 16 took 225 s of CPU without an
incumbent, 14 s with the 30-s plan's)."""

EVEN_SHARE = 0.5
"""[Note: the even phase]: its share of the search's time with a limit (0.3 until the
thirty-fifth session; see there)."""

EVEN_UNLIMITED_S = 2.0
"""[Note: the even phase]: its seconds (wall clock) without a limit."""

EVEN_FIRST_CUTS = 12
"""[Note: the even phase]: the cut candidates of its first pass (then twice as many, and
so on, for the best micro-batch size)."""


def even_phase(cluster: Cluster, size: int, pools: int) -> bool:
    """Whether a search on ``cluster`` (wide space of ``size`` pairs, ``pools`` pools)
    searches the even groups.

    [Note: the even phase]
    On a cluster of at least ``WIDEN_MIN_DEVICES`` devices whose wide space is not
    searched to its end (more than ``WIDE_EXACT_MAX`` pairs) and has at most
    ``EVEN_POOLS_MAX`` pools, the search runs the classes DP over the even groups
    (``space="even"``, [Note: even groups] in ``solver.space``) after the paper's space
    and before the wide one: with a limit for ``EVEN_SHARE`` of the search's time (taken
    from the paper's space's share), without one for ``EVEN_UNLIMITED_S``. A first pass
    takes ``EVEN_FIRST_CUTS`` balanced cut candidates and every micro-batch size, in the
    order the paper's space's passes ranked them (its coarse pass covers every size: on
    32 Jetsons the even groups' pass on 12 cuts takes 0.4 s at micro-batch 8, the best,
    and over 1 s at micro-batch 4 from a weak incumbent, 5-18 s at 32 and 64); then the
    best size again on twice as many cuts, and so on, until its time is up or the cuts
    are the search's own. Each pass is exact over its part of the space and starts from
    the best round so far, so it only ever adds a better plan, which then prunes the
    phases after it. Measured (ResNet-50, Jetsons at
    1 Gbps, 2-core host): on 32 Jetsons a 5-s limit gave 0.8851 s before (the paper's
    space's plan) and the even groups find 0.8389 s on 12 cuts at micro-batch 8 in under
    a second; on 16 Jetsons 24 cuts find 1.3694 s at micro-batch 4 in 0.4 s. Its plans
    may depend on the host's speed, as the widening's do; its bounds hold for its part
    of the space only and are not reported. Fleets whose wired pairs make many classes
    have too many pools, and keep the widening. Its share, ``EVEN_SHARE``, was 0.3 of the
    search's time until the thirty-fifth session: on 32 Jetsons in 5 s the paper's space
    then ran to 3.5 s, past its last better plan (0.8851 s at 2.5 s), and the even
    groups found 0.8389 s at 4.1 s, 0.9 s before the limit. With half (the paper's space
    until 2.5 s) they find it at 3.1 s and, on 24 cuts, 0.8382 s just before the limit
    (1.78 % against 1.87 %, 3 of 3 runs each, alternating); in 30 s 0.8310 s, the best
    plan known (0.78 % against 1.61 %), in 20 s 0.8378 s (0.8382 s before); 16 Jetsons
    in 5 s the same plan, at 2.2 s instead of 2.7 s (``tools/time_planner.py --once``,
    03:05-03:17 UTC)."""
    return (len(cluster.devices) >= WIDEN_MIN_DEVICES and size > WIDE_EXACT_MAX
            and pools <= EVEN_POOLS_MAX)


def _even_search(costs: CostTable, cluster: Cluster, batch_size: int, ranking: Sequence[int],
                 incumbent: float, until: float,
                 optimizer_state_factor: float, max_cuts: int | None,
                 progress: Callable[[int, int, str, float], None] | None = None
                 ) -> tuple[Plan | None, float]:
    """[Note: the even phase]: the best plan of its passes below ``incumbent`` before
    ``until`` (None: none) and its round time (else ``incumbent``)."""
    best: Plan | None = None
    most = len(candidate_cuts(costs, max_cuts))
    cuts = min(EVEN_FIRST_CUTS, most)
    sizes = list(ranking)
    while time.perf_counter() < until:
        for mb in sizes:
            if time.perf_counter() >= until:
                break
            found = asteroid_dp(costs, cluster, batch_size,
                                optimizer_state_factor=optimizer_state_factor,
                                micro_batch_sizes=[mb], max_cuts=cuts, space="even",
                                incumbent=incumbent, deadline=until, progress=progress)
            if found.plan is not None and found.round_time_s < incumbent:
                best, incumbent = found.plan, found.round_time_s
        if cuts >= most:
            break
        cuts = min(2 * cuts, most)
        sizes = [best.micro_batch_size] if best is not None else sizes[:1]
    return best, incumbent


def widens(cluster: Cluster, size: int) -> bool:
    """Whether a search on ``cluster`` (wide space of ``size`` pairs) plans sub-clusters
    first.

    [Note: when to widen]
    Iterative widening ([Note: iterative widening] in ``solver.widening``) runs only on
    clusters of at least ``WIDEN_MIN_DEVICES`` devices whose wide space has more than
    ``WIDE_EXACT_MAX`` pairs, first: with a time limit for ``WIDEN_SHARE`` of the
    search's time, without one for ``WIDEN_UNLIMITED_S``. There the exact searches do not
    finish in seconds and stop with whatever their first passes found (a 32- or 64-device
    fleet got a worse plan in 5 s than the 8-device fleet's exact one), while a
    sub-cluster of a few devices is searched exactly in a fraction of a second and seeds
    them. On smaller clusters the phases themselves finish (or nearly), so the time is
    better spent there (the plans on small instances, e.g. the 200-layer MLP on eight
    devices, are unchanged and cost no more).

    Without a limit the paper's space is searched to its end, but the wide space is not
    (``stopped="size limit"``), and on a fleet the paper's space's optimum is far from
    the sub-clusters' plans: before the seventeenth session ``afx.plan`` without a limit
    returned worse plans than with ``time_limit=5`` (BERT-small on the 16- and 32-device
    fleets: 5.573 s and 5.427 s, after 2.5 s and 37 s of CPU, against 4.137 s and 3.519
    s). So the sub-clusters get a few seconds there too. The plan may then depend on the
    host's speed, but it is never worse than the paper's space's optimum, which is still
    searched to its end.

    With a limit, where the order's search then finishes before its deadline and the
    wide space has more than ``WIDE_ANYTIME_MAX`` pairs (the wide search cannot get far:
    a fleet's root pool alone has millions of groups), the widening goes on with the
    sizes it had no time for, until the search's deadline, and the wide search gets what
    is left."""
    return len(cluster.devices) >= WIDEN_MIN_DEVICES and size > WIDE_EXACT_MAX


def check_time_limit(time_limit: float | None, what: str = "time limit",
                     fix: str = "leave it out for an exact search") -> None:
    """``PlanError`` unless ``time_limit`` is None or a number of seconds > 0 (``inf``:
    search every order to the end); ``what`` and ``fix`` name it in the message."""
    if time_limit is None:
        return
    ok = (is_number(time_limit)
          and not math.isnan(time_limit) and time_limit > 0)
    if not ok:
        raise PlanError(f"{what} must be a number of seconds > 0, got {time_limit!r}; {fix}")


SAFETY_NET_MAX_DEVICES = 6
"""Baselines that run a planning DP of their own (DAPPLE: the Asteroid DP on the
homogeneous view of the cluster) join the safety net only up to this many devices (the
sizes of the paper's settings, docs/benchmarks.md): on eight devices DAPPLE takes longer
than the Asteroid search itself (2 s against 1 s on the 200-layer MLP of issue 14), on
32 devices DAPPLE's own search takes minutes (170 s of CPU on a 32-device fleet), longer
than the search it backs up."""

_PLANNING_BASELINES = frozenset({"dapple"})


def _baseline_plans(costs: CostTable, cluster: Cluster, batch_size: int, osf: float,
                    micro_batch_sizes: Sequence[int] | None, deadline: float | None,
                    planning: bool) -> list[tuple[str, Plan, float]]:
    """The baselines' plans that fit, with their round times, as far as the deadline
    allows: the quick ones, or (``planning``) those that run a planning search of their
    own (only up to ``SAFETY_NET_MAX_DEVICES``)."""
    try:
        from solver.baselines import BASELINES
    except Exception as exc:  # a broken or missing module must not break planning
        log.warning("baseline planners unavailable: %s", exc)
        return []
    out = []
    for name, fn in BASELINES.items():
        if deadline is not None and time.perf_counter() > deadline:
            break
        if (name in _PLANNING_BASELINES) != planning or (
                planning and len(cluster.devices) > SAFETY_NET_MAX_DEVICES):
            continue
        try:
            seed = fn(costs, cluster, batch_size, optimizer_state_factor=osf)
            pred = evaluate(seed, costs, cluster)
        except AsteroidError as exc:
            log.debug("baseline %s gives no plan: %s", name, exc)
            continue
        if pred.fits and (micro_batch_sizes is None
                          or seed.micro_batch_size in micro_batch_sizes):
            out.append((name, seed, pred.round_time_s))
    return out


CLASS_BOUND_SHARE = 2.0
"""Without a time limit, where the wide search was not run to its end, the class bound
(``solver.class_bound.class_bound``) runs for up to this share of the search's own time, or
for as long as the search itself up to ``CLASS_BOUND_AFTER_S``, whichever is longer; its
bisection usually ends first. A quarter until the nineteenth session; with the prices per
class of that session (``solver.relaxation``), measured alternating with the commit before:
ResNet-50 x 32 Jetsons 5.9 % in 24.3 s of CPU before, now 3.85 % in 25.4 s (16 Jetsons:
5.0 % in 11.3 s, now 2.5 % in 13.6 s). Twice the search's time since the twentieth, for
the second bisection of [Note: counted classes] (``solver.relaxation``), alternating with
the commit before: 32 Jetsons 3.85 % in 25.7 s -> 1.89 % in 49.6 s, 16 Jetsons 2.49 % in
13.5 s -> 1.63 % in 19.8 s; 64 Jetsons 10.7 % -> 8.2-8.7 % in 231-237 s, its bisections
ending long before the share."""

CLASS_BOUND_LIMIT_SHARE = 0.5
"""With a time limit, where the wide space is larger than ``WIDE_EXACT_MAX`` pairs (the
search is unlikely to finish) and the class bound counts the space's own classes of
interchangeable devices (``solver.class_tables.bound_classes``), the search stops at this share
of the limit before the deadline and the class bound gets the rest (and whatever the
search left unused). A search that finishes proves its plan optimal and skips the bound.
0.3 until the nineteenth session: on ResNet-50 x 16 and x 32 Jetsons in 5 s the plans
were found in the first half all the same (1.3694 s, 0.8389 s), and the bound's gap fell
from 24 % to 11 % and from 33 % to 14 %; 0.6 lost the 30-s plan on 64 Jetsons (0.6193 s
-> 0.6584 s)."""

CLASS_BOUND_COARSE_SHARE = 0.3
"""``CLASS_BOUND_LIMIT_SHARE`` where the bound counts coarser classes (fleets with wired
pairs): there it is far below the plans (190-300 %), and the search needs the time more
(with 0.5, BERT-small on the 16-device fleet in 5 s: 4.137 s -> 4.176 s; ResNet-50 on the
64-device fleet in 30 s: 4.457 s -> 4.496 s)."""


def bound_share(space: ClassSpace) -> float | None:
    """The share of a time limit the class bound gets where the search is unlikely to
    finish: ``CLASS_BOUND_LIMIT_SHARE`` where it counts the space's own classes,
    ``CLASS_BOUND_COARSE_SHARE`` where it counts coarser ones; None where it gives up
    (``solver.class_tables.bound_classes``)."""
    classes = bound_classes(space)
    if classes is None:
        return None
    own = classes == [list(members) for members in space.classes]
    return CLASS_BOUND_LIMIT_SHARE if own else CLASS_BOUND_COARSE_SHARE


CLASS_BOUND_AFTER_S = 5.0
"""``CLASS_BOUND_SHARE``: a search shorter than this gives the class bound its own time.
A quarter of a quick search proved little: ResNet-50 on 16 Jetsons, 2.6 s of search and
no bound (gap 75 %); with 2.7 s more the bound proves a gap of 12 % (optimum: 6.4 %)."""

CLASS_COUNTED_S = 20.0
"""Without a time limit, where the class bound counts the devices of each class exactly
(``solver.class_tables.counts_pools``, [Note: counted pools]), it runs after any search, for
up to the larger of this many seconds and ``CLASS_BOUND_SHARE`` of the search: there it
is strong enough to prove the plan optimal over every order (the 200-layer MLP of issue
14 on eight mixed devices)."""

BESIDE_POLL_S = 0.002
"""Seconds between two reads of the incumbent by the bound's process while the search has
no plan yet ([Note: the bound's process from the start]).

[Note: the bound's process from the start]
The process beside the search used to start with the first plan, which the bound needs as
its target, and then loaded the compiled passes (numba's import and the passes' load,
0.5-0.7 s) and computed the link bounds before its first class bound. It now starts with
the search: it loads the passes where they are built (``solver.relaxation.load_compiled``)
and computes the link bounds while the search finds its first plan, reading the
incumbent every ``BESIDE_POLL_S`` until there is one. On ResNet-50 x 32 Jetsons in 5 s
the counted bisection starts at 2.1 s instead of 2.4-2.7 s, and 0.8245 s (1.75 %) is
proven in 4 of 6 runs instead of 3 of 6 (1.87 % in the others; ``tools/time_planner.py
--once jetsons 32 --time-limit 5``, thirty-third session). The bisection's path depends
on the incumbent it starts from: on 16 Jetsons in 5 s it now ends at 1.3505 s instead of
1.3525 s (1.40 % instead of 1.25 %, three runs each, alternating); 64 Jetsons in 30 s
(8.25 %), 32 in 10 s (1.66 %) and the 16- and 32-device fleets in 5 s are the same."""


ORDER_FIRST_SIZES = 2
"""Without a time limit, where the wide space is too large to search and the class bound
counts its pools (``counts_pools``), the order's pass over every candidate cut runs first
for this many micro-batch sizes only (the most promising of its coarse pass), and for
the others only where the class bound does not prove the best round ([Note: the order's
sizes after the bound]). The DP's passes that refine the incumbent on more cuts do not run
there (``full_sizes``): they prune little of the pass over every cut."""


def _order_rest(costs: CostTable, cluster: Cluster, batch_size: int, osf: float,
                max_cuts: int | None, order: DPResult, incumbent: float,
                sizes: Sequence[int] | None = None) -> DPResult:
    """The order's search over ``sizes`` (default: those ``order`` skipped) with
    ``incumbent``, as one result with ``order``: complete and no size skipped. A size the
    class bound proved needs no search: its plans cannot beat the best round."""
    sizes = list(order.skipped if sizes is None else sizes)
    if not sizes:
        return replace(order, complete=True, skipped=())
    more = asteroid_dp(costs, cluster, batch_size, optimizer_state_factor=osf,
                       micro_batch_sizes=sizes, max_cuts=max_cuts, incumbent=incumbent)
    better = more.plan is not None and more.round_time_s < order.round_time_s
    return DPResult(plan=more.plan if better else order.plan,
                    round_time_s=min(order.round_time_s, more.round_time_s),
                    search_time_s=order.search_time_s + more.search_time_s,
                    cells=order.cells + more.cells,
                    max_front=max(order.max_front, more.max_front),
                    candidate_cuts=order.candidate_cuts, complete=more.complete,
                    bounds={**order.bounds, **more.bounds})


def search(costs: CostTable, cluster: Cluster, batch_size: int, *,
           optimizer_state_factor: float = 0.0,
           micro_batch_sizes: Sequence[int] | None = None,
           max_cuts: int | None = DEFAULT_MAX_CUTS,
           time_limit: float | None = None,
           baselines: bool = True,
           progress: Progress | None = None) -> SearchReport:
    """Plan in the phases of [Note: anytime planning] and say what was proven.

    Args:
        costs, cluster, batch_size: the problem.
        optimizer_state_factor: optimizer state in units of the weights.
        micro_batch_sizes: micro-batch sizes to try (default: every divisor of the batch).
        max_cuts: candidate cut positions (``solver.space.candidate_cuts``).
        time_limit: wall-clock seconds (> 0; ``inf``: every phase to its end); None:
            phases 1 and 2 to their end, phase 3 too where the wide space is small.
        baselines: keep a baseline's plan when it beats the DP's (the safety net).
        progress: called with the fraction done and a short description.

    Returns:
        The report; ``plan`` is None only when nothing fits (or the deadline passed before
        any plan was found).

    Raises:
        PlanError: a time limit that is not a number > 0, or bad micro-batch sizes.
    """
    with _no_collection(), ExitStack() as stack:
        return _search(costs, cluster, batch_size, optimizer_state_factor,
                       micro_batch_sizes, max_cuts, time_limit, baselines, progress, stack)


@contextmanager
def _no_collection() -> Iterator[None]:
    """The cyclic garbage collector paused while the search runs, where it was on.

    [Note: no collection during the search]
    The searches allocate hundreds of thousands of small tuples (summaries, stages, cache
    keys) that live until the search ends, so the collector ran some 200 times during a
    plan (issue 14's MLP x 8: 0.04-0.06 s of 1.1 s of CPU) without freeing anything: what
    the search holds stays alive until it returns (and a collection after it finds no
    cycles there). Paused, it collects whatever the search left once it is on again, as
    it would have anyway; nothing the search computes depends on it."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _search(costs: CostTable, cluster: Cluster, batch_size: int, optimizer_state_factor: float,
            micro_batch_sizes: Sequence[int] | None, max_cuts: int | None,
            time_limit: float | None, baselines: bool,
            progress: Progress | None, stack: ExitStack) -> SearchReport:
    """``search`` with the collector as it is (``stack`` ends the bound beside it)."""
    check_time_limit(time_limit)
    cluster = cluster.for_costs(costs)
    started = time.perf_counter()
    deadline = (None if time_limit is None or math.isinf(time_limit)
                else started + time_limit)
    size = wide_size(costs, cluster)
    wide_ok = time_limit is not None or size <= WIDE_EXACT_MAX
    # with a limit, the search's own deadline leaves the class bound its share, or the
    # bound runs beside the search for the whole limit ([Note: the bound beside the
    # search] in solver.beside)
    search_end = deadline
    alone_end = deadline        # (the search's end where the bound runs after it)
    beside_ok = False
    if deadline is not None and size > WIDE_EXACT_MAX:
        share = bound_share(ClassSpace(costs, cluster))
        if share is not None:
            alone_end = started + (1.0 - share) * (deadline - started)
            beside_ok = spare_core()
            search_end = deadline if beside_ok else alone_end
    mbs = micro_batch_choices(batch_size, micro_batch_sizes)
    best: Plan | None = None
    best_value = math.inf
    phases: list[str] = []
    beside: Beside | None = None

    def bound_beside(incumbent: Callable[[], float],
                     publish: Callable[[float], None]) -> dict[int, float]:
        """Per size the larger of the link and class bounds, until the deadline (in the
        process beside the search; the parent computes neither); the bound over the
        sizes so far is ``publish``-ed as it rises (for the progress bar)."""
        until = math.inf if deadline is None else deadline      # (never None here)
        # [Note: the bound's process from the start]: the compiled passes and the link
        # bounds while the search finds its first plan, the class bound's first target
        load_compiled()
        links = link_bounds(costs, cluster, batch_size, mbs, max_cuts, until)
        while not math.isfinite(incumbent()):
            if time.perf_counter() >= until:
                return links
            time.sleep(BESIDE_POLL_S)
        found = class_bounds(costs, cluster, batch_size, mbs, max_cuts, incumbent(), {},
                              until, start=links,
                              optimizer_state_factor=optimizer_state_factor,
                              incumbent=incumbent, on_bound=publish,
                              tolerance=CLASS_BOUND_BESIDE_TOL)
        return {mb: max(links.get(mb, 0.0), found.get(mb, 0.0))
                for mb in links.keys() | found.keys()}

    def offer(value: float) -> None:
        """A plan of round ``value`` found inside a phase: the bound beside's target."""
        if beside is not None:
            beside.offer(value)

    def report(share: float, offset: float, what: str) -> Callable[[int, int, str, float], None]:
        def step(done: int, total: int, where: str, found: float) -> None:
            # the running search's best, not only what earlier phases left
            offer(found)
            if progress is not None:
                value = min(best_value, found)
                progress(offset + share * done / max(total, 1),
                         f"{what}, {where}, best {value:.4g} s{proven_gap(value)}")
        return step

    def proven_gap(value: float) -> str:
        """What the bound beside the search has proven so far, for the bar ('' if
        nothing yet)."""
        bound = beside.published if beside is not None else math.nan
        if not (bound > 0.0 and math.isfinite(value)):
            return ""
        return f", gap <= {100.0 * max(0.0, value - bound) / bound:.3g} %"

    seeded = ""
    earlier: list[Plan] = []     # the incumbents replaced, oldest first

    def promote(plan: Plan, value: float, name: str) -> None:
        nonlocal best, best_value, seeded
        if best is not None:
            earlier.append(best)
        best, best_value, seeded = plan, value, name
        if beside is not None:
            offer(value)

    def take(result: DPResult) -> None:
        if result.plan is not None and result.round_time_s < best_value:
            promote(result.plan, result.round_time_s, "")

    def safety_net(planning: bool) -> None:
        if not baselines:
            return
        for name, seed, value in _baseline_plans(costs, cluster, batch_size,
                                                 optimizer_state_factor, micro_batch_sizes,
                                                 search_end, planning):
            if value < best_value:
                promote(seed, value, name)

    if beside_ok:
        # [Note: the bound's process from the start]
        try:
            beside = Beside(bound_beside, math.inf)
        except OSError as exc:      # (no process: the bound after the search)
            log.warning("cannot run the class bound beside the search: %s", exc)
            search_end = alone_end
        else:
            stack.callback(beside.close)
    # 0: the quick baselines: a safety net, and an incumbent that prunes from the start
    safety_net(planning=False)
    # 0': [Note: when to widen]: exact plans of sub-clusters as the incumbent
    widened: Widened | None = None

    def widening(until: float) -> None:
        nonlocal widened
        widened = widen(costs, cluster, batch_size, deadline=until,
                        optimizer_state_factor=optimizer_state_factor,
                        micro_batch_sizes=micro_batch_sizes, max_cuts=max_cuts,
                        incumbent=best_value, after=widened, on_better=offer)
        if widened.plan is not None and widened.round_time_s < best_value:
            promote(widened.plan, widened.round_time_s, "")
        if "widening" not in phases:
            phases.append("widening")

    if widens(cluster, size):
        widening(started + (WIDEN_UNLIMITED_S if search_end is None
                            else WIDEN_SHARE * (search_end - started)))
    # 1: the paper's space (slices of the capability order); with a limit, half of what is
    # left unless the wide space is too large to search in any case
    first_deadline = search_end
    even = even_phase(cluster, size, math.prod(len(c) + 1 for c in device_classes(cluster, costs)))
    even_s = (EVEN_UNLIMITED_S if search_end is None
              else EVEN_SHARE * max(0.0, search_end - started)) if even else 0.0
    if search_end is not None and even:
        first_deadline = search_end - even_s      # (the even phase's share, kept)
    if search_end is not None and size <= WIDE_ANYTIME_MAX:
        begun = started if widened is None else time.perf_counter()
        first_deadline = begun + max(0.0, search_end - begun - even_s) / 2
    # without a limit, where the counted class bound will prove the sizes over every
    # order, only the most promising sizes get the order's pass over every cut first
    # ([Note: the order's sizes after the bound])
    counted = counts_pools(ClassSpace(costs, cluster))
    later = time_limit is None and not wide_ok and counted
    order = asteroid_dp(costs, cluster, batch_size, optimizer_state_factor=optimizer_state_factor,
                        micro_batch_sizes=micro_batch_sizes, max_cuts=max_cuts,
                        incumbent=best_value, deadline=first_deadline,
                        progress=report(_ORDER_SHARE, 0.0, "one order"),
                        full_sizes=ORDER_FIRST_SIZES if later else None)
    take(order)
    if order.skipped and best is None:
        # nothing found yet: the sizes left out now, as without the bound
        order = _order_rest(costs, cluster, batch_size, optimizer_state_factor, max_cuts,
                            order, best_value)
        take(order)
    phases.append("order")
    if even:
        # 1': [Note: the even phase]: the even groups of every order, the sizes the order's
        # passes found best first
        even_until = time.perf_counter() + even_s
        if search_end is not None:      # (never past the search's end)
            even_until = min(even_until, max(search_end, time.perf_counter()))
        found, value = _even_search(costs, cluster, batch_size, order.ranking or mbs,
                                    best_value, even_until,
                                    optimizer_state_factor, max_cuts,
                                    report(0.0, _ORDER_SHARE, "even groups"))
        if found is not None and value < best_value:
            promote(found, value, "")
        phases.append("even")
    if (widened is not None and search_end is not None and order.complete
            and size > WIDE_ANYTIME_MAX):
        # [Note: when to widen]: the order's search finished early, the wide one cannot
        # get far: the time left goes to the sizes the widening had no time for
        widening(search_end)
    # 2: the baselines that plan with a search of their own
    safety_net(planning=True)
    if baselines:
        phases.append("baselines")
    # 3: the wide space
    def search_wide(until: float | None) -> DPResult:
        """The wide space from the best round so far, until ``until`` (None: its end)."""
        found = asteroid_dp(costs, cluster, batch_size,
                            optimizer_state_factor=optimizer_state_factor,
                            micro_batch_sizes=micro_batch_sizes, max_cuts=max_cuts,
                            space="classes", incumbent=best_value, deadline=until,
                            progress=report(1.0 - _ORDER_SHARE, _ORDER_SHARE, "every order"))
        take(found)
        phases.append("classes")
        return found

    wide: DPResult | None = None
    wide_ok = wide_ok or best is None   # a plan may fit only in another order
    if wide_ok and (search_end is None or time.perf_counter() < search_end
                    or (best is None and deadline is not None
                        and time.perf_counter() < deadline)):
        until = search_end if best is not None else deadline
        if best is None and time_limit is None and size > WIDE_SHORT_MAX:
            until = time.perf_counter() + NO_FIT_WIDE_S     # [Note: no plan to prune by]
        wide = search_wide(until)
    elif time_limit is None and not later and WIDE_SHORT_MAX < size <= WIDE_ANYTIME_MAX:
        # [Note: a glimpse of every order]: without a limit, a middling wide space for a
        # few seconds (its plans only; it is not searched to its end)
        wide = search_wide(time.perf_counter() + WIDE_UNLIMITED_S)
    complete = wide is not None and wide.complete
    if best is None:
        if progress is not None:
            progress(1.0, f"done, best {best_value:.4g} s")
        return SearchReport(None, math.inf, None, tuple(phases), complete)
    # [Note: the wide space where the bound falls short]: without a limit, a wide space
    # up to WIDE_SHORT_MAX pairs is searched to its end where the bounds leave a gap
    fallback = time_limit is None and not wide_ok and size <= WIDE_SHORT_MAX

    # what is proven about the wide space: per micro-batch size its finished search's
    # bound, else the larger of the work bound and the class bound
    proven = dict(wide.bounds) if wide is not None else {}
    searched = time.perf_counter() - started
    # the link bound ([Note: the link bound] in solver.link_bound; milliseconds to a few
    # tenths of a second per size) first, within the deadline, then the class bound
    # (without a limit, where the counted bound runs, only for the sizes it falls short on)
    # (where the bounds ran beside the search, its process computed the link bounds too)
    links: dict[int, float] = {}
    if not complete and not later and beside is None:
        links = link_bounds(costs, cluster, batch_size, [mb for mb in mbs if mb not in proven],
                            max_cuts, deadline)
    if beside is not None and not complete and deadline is not None:
        # what the bounds beside the search proved by the deadline: per size the larger
        ok, found = beside.result(deadline)
        if ok:
            for mb, value in found.items():
                proven[mb] = max(value, proven.get(mb, 0.0))
        elif beside.published > 0.0 and math.isfinite(beside.published):
            # (late or failed: what it published is the smallest bound over the sizes
            # so far, a bound of every size)
            log.warning("the class bound beside the search did not finish (%s): its bound "
                        "so far, %.4g s, stands", found, beside.published)
            for mb in mbs:
                proven[mb] = max(beside.published, proven.get(mb, 0.0))
        else:
            log.warning("the class bound beside the search proved nothing: %s", found)
    elif not complete and not later:
        until = (deadline if deadline is not None
                 else time.perf_counter() + max(CLASS_BOUND_SHARE * searched,
                                                min(searched, CLASS_BOUND_AFTER_S),
                                                CLASS_COUNTED_S if counted else 0.0))
        proven.update(class_bounds(costs, cluster, batch_size, mbs, max_cuts, best_value,
                                    proven, until, start=links,
                                    optimizer_state_factor=optimizer_state_factor))
    if later and not complete:
        # [Note: the order's sizes after the bound]: the counted bound until a size falls
        # short; then the order's pass for every size it left out, and the bound for the
        # sizes it has not reached yet
        target = best_value
        until = time.perf_counter() + max(CLASS_BOUND_SHARE * searched, CLASS_COUNTED_S)
        first = class_bounds(costs, cluster, batch_size, mbs, max_cuts, target, proven,
                              until, stop_short=True, split=True)
        proven.update(first)
        if fallback and any(proven.get(mb, 0.0) < target * PROVED for mb in mbs):
            # the wide search covers every order and size: no order's pass or bound needed
            wide = search_wide(None)
            complete = wide.complete
            proven.update(wide.bounds)
        elif any(proven.get(mb, 0.0) < target * PROVED for mb in mbs):
            order = _order_rest(costs, cluster, batch_size, optimizer_state_factor, max_cuts,
                                order, best_value)
            take(order)
            # a class bound for a higher target is still a bound: the sizes done keep theirs
            proven.update(class_bounds(costs, cluster, batch_size, mbs, max_cuts,
                                        best_value, dict(proven), until, split=True))
        else:
            order = replace(order, complete=True, skipped=())
        short = [mb for mb in mbs if proven.get(mb, 0.0) < best_value * PROVED]
        if not complete:
            links = link_bounds(costs, cluster, batch_size, short, max_cuts, deadline)
    for mb, value in links.items():
        proven[mb] = max(value, proven.get(mb, work_bound(costs, cluster, batch_size, mb)))
    bound = min(min(proven.get(mb, work_bound(costs, cluster, batch_size, mb)), best_value)
                for mb in mbs)
    if fallback and not complete and bound < best_value * PROVED:
        # (the priced bounds: the wide search after them)
        wide = search_wide(None)
        complete = wide.complete
    gap = 0.0 if complete else max(0.0, (best_value - bound) / bound)
    if progress is not None:
        progress(1.0, f"done, best {best_value:.4g} s, "
                      + ("optimal" if gap == 0.0 else f"gap <= {100.0 * gap:.3g} %"))
    cuts = len(candidate_cuts(costs, max_cuts))
    stopped = "" if complete else "time limit" if time_limit is not None else "size limit"
    info = SearchBound(space="classes", bound_s=bound, gap=gap,
                       cuts=cuts, layers=costs.num_layers, stopped=stopped,
                       order_optimal=order.complete or complete)
    check = {"seeded_from": seeded} if seeded else {}
    plan = replace(best, planner=PlannerInfo("asteroid", PLANNER_VERSION,
                                             time.perf_counter() - started, check, info))
    return SearchReport(plan, best_value, info, tuple(phases), complete,
                        tuple(reversed(earlier[-ALTERNATIVES_MAX:])))


def search_or_raise(costs: CostTable, cluster: Cluster, batch_size: int, *,
                    optimizer_state_factor: float = 0.0,
                    micro_batch_sizes: Sequence[int] | None = None,
                    max_cuts: int | None = DEFAULT_MAX_CUTS,
                    time_limit: float | None = None,
                    progress: Progress | None = None) -> SearchReport:
    """``search``'s report where it has a plan, or the ``PlanError`` of why there is none."""
    report = search(costs, cluster, batch_size, optimizer_state_factor=optimizer_state_factor,
                    micro_batch_sizes=micro_batch_sizes, max_cuts=max_cuts,
                    time_limit=time_limit, progress=progress)
    if report.plan is not None:
        return report
    if not report.complete and time_limit is not None:
        raise PlanError(f"no plan found within the time limit of {time_limit:g} s (the "
                        f"search had not finished); raise the time limit or leave it out")
    error = no_fit_error(costs, cluster, batch_size, optimizer_state_factor, "asteroid")
    if not report.complete:     # [Note: no plan to prune by]
        raise PlanError(f"{error} (no plan of the capability order fits, and none was found "
                        f"in {NO_FIT_WIDE_S:g} s of the search over every device order, "
                        f"{wide_size(costs, cluster)} (pool, group) pairs, which did not "
                        f"finish; --time-limit S searches every order for S seconds, inf "
                        f"to its end)") from None
    raise error
