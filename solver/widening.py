"""Iterative widening: exact plans of sub-clusters, lifted to the cluster as an incumbent.

[Note: iterative widening]
A plan on any subset of a cluster's devices is a plan of the whole cluster (devices it
leaves out are simply unused), with the same round time: ``solver.evaluate`` reads only
the devices a plan names and the links between them, and ``Cluster.subset`` keeps both.
On a large cluster with a time limit the exact searches cannot get far (the paper's space
has ``O(n^2)`` groups per layer range, the wide space is exponential in the classes), and
on slow networks the good plans use a handful of devices anyway: a fleet of Jetsons on
100 Mbps Wi-Fi with a few wired 1000 Mbps pairs gets its best plans from a few fast
devices and the pairs, whose members share a stage or sit in neighbouring stages.

So ``widen`` plans *sub-clusters* of ``k`` devices, ``k = 4, 6, 8, 12, ...`` while its
deadline allows, each exactly with the existing machinery: the wide space where the
sub-cluster's has at most ``WIDE_EXACT_MAX`` pairs; else the paper's space (the
capability order, and the order that keeps each fast-linked unit together), then the
wide space up to ``WIDEN_WIDE_MAX`` pairs, until the deadline. Each search starts from the
best round of the sub-clusters so far as its incumbent (not the caller's: the sizes' own
rounds tell when to stop, [Note: plans that want every device]), so a larger sub-cluster
costs only what its better plans cost. The sub-clusters come from the structure the
planner already has (``sub_clusters``): *units* of devices joined by links faster than
the network (a wired pair; a device alone otherwise), ranked by their bound speed; for
each ``k`` the best units that fit (fast links kept together), and the ``k`` most
capable devices (the capability order's front), where those differ.

The result is only an incumbent: its plan is re-evaluated on the whole cluster (the round
is the whole cluster's prediction of it, ``lift``), and no bound of a sub-cluster's search
is a bound of the whole cluster (a sub-cluster's optimum is an *upper* bound there), so
nothing here enters ``plan.planner.bound``. ``solver.anytime.search`` runs it only where
it can pay ([Note: when to widen] there).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from contracts.cluster import Cluster
from contracts.plan import Plan
from contracts.table import CostTable
from solver.dp import SpaceName, asteroid_dp
from solver.evaluate import evaluate
from solver.space import DEFAULT_MAX_CUTS, sorted_devices
from solver.timing import Timing

__all__ = ["Widened", "units", "sub_clusters", "lift", "widen", "WIDEN_SIZES",
           "WIDEN_WIDE_MAX"]

log = logging.getLogger(__name__)

WIDEN_SIZES = (4, 6, 8, 12, 16, 24, 32, 48)
"""The sub-cluster sizes ``widen`` tries, smallest first (each while its deadline allows,
and only below the cluster's own size)."""

WIDEN_WIDE_MAX = 3000
"""A sub-cluster's wide space is searched (after its paper's space, until the deadline)
when it has at most this many (pool, group) pairs (``solver.anytime.wide_size``): on the
ResNet-50 fleets six devices in three wired pairs (486 pairs) take 2.2 s of CPU to finish
and find their best plan in 0.5 s; eight in four pairs (2916) find 5.79 s in 4 s."""


@dataclass(frozen=True)
class Widened:
    """What ``widen`` found: the best plan of the sub-clusters (None: none beat the
    incumbent), its round on the whole cluster (else the incumbent), the devices of the
    sub-cluster that gave it, every sub-cluster searched (in order), and where to go on
    from."""

    plan: Plan | None
    round_time_s: float
    devices: tuple[str, ...]
    searched: tuple[tuple[str, ...], ...]
    #: the best round of the sub-clusters (also where it does not beat the incumbent)
    own_s: float = math.inf
    #: the largest size whose sub-clusters were all planned (0: none)
    size: int = 0
    #: stopped by [Note: plans that want every device]
    saturated: bool = False


def units(costs: CostTable, cluster: Cluster) -> list[tuple[str, ...]]:
    """The cluster's devices in *units*: the connected parts of the graph of links faster
    than the network's default bandwidth (a wired pair; one device where it has none), each
    in the capability order, ranked by their total bound speed (then by their first
    device's capability rank)."""
    order = [d.name for d in sorted_devices(cluster, costs)]
    rank = {name: i for i, name in enumerate(order)}
    parent = {name: name for name in order}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for link in cluster.links:
        if (link.bandwidth_mbps is not None and link.bandwidth_mbps > cluster.bandwidth_mbps):
            a, b = root(link.a), root(link.b)
            if a != b:
                parent[max(a, b, key=rank.__getitem__)] = min(a, b, key=rank.__getitem__)
    parts: dict[str, list[str]] = {}
    for name in order:
        parts.setdefault(root(name), []).append(name)
    speed = Timing.of(costs, cluster).bound_speeds
    found = [tuple(part) for part in parts.values()]
    return sorted(found, key=lambda u: (-sum(speed[n] for n in u), rank[u[0]]))


def _unit_prefix(ranked: Sequence[tuple[str, ...]], k: int) -> tuple[str, ...]:
    """The best-ranked units that fit in ``k`` devices, in rank order (a unit too large
    for the room left is passed over)."""
    out: list[str] = []
    for unit in ranked:
        if len(out) + len(unit) <= k:
            out.extend(unit)
        if len(out) == k:
            break
    return tuple(out)


def sub_clusters(costs: CostTable, cluster: Cluster,
                 sizes: Sequence[int] = WIDEN_SIZES) -> list[tuple[str, ...]]:
    """The device sets ``widen`` plans, in the order it plans them: per size ``k`` of
    ``sizes`` below the cluster's size, the best units that fit (``units``: fast links
    kept together) and the ``k`` most capable devices, each once. Every set names its
    devices in the capability order."""
    order = [d.name for d in sorted_devices(cluster, costs)]
    rank = {name: i for i, name in enumerate(order)}
    ranked = units(costs, cluster)
    out: list[tuple[str, ...]] = []
    for k in sizes:
        if k >= len(order):
            break
        for chosen in (_unit_prefix(ranked, k), tuple(order[:k])):
            names = tuple(sorted(chosen, key=rank.__getitem__))
            if names and names not in out:
                out.append(names)
    return out


def _unit_order(costs: CostTable, cluster: Cluster) -> list[str]:
    """The devices with each unit's members together: the units in the capability order
    of their first member."""
    order = [d.name for d in sorted_devices(cluster, costs)]
    rank = {name: i for i, name in enumerate(order)}
    return [n for unit in sorted(units(costs, cluster), key=lambda u: rank[u[0]]) for n in unit]


def lift(plan: Plan, costs: CostTable, cluster: Cluster) -> tuple[Plan, float]:
    """A sub-cluster's plan as a plan of ``cluster`` (its hash), with its round time
    predicted on ``cluster`` by ``solver.evaluate`` (inf where it does not fit)."""
    lifted = replace(plan, cluster_hash=cluster.cluster_hash, predicted=None)
    pred = evaluate(lifted, costs, cluster)
    return lifted, (pred.round_time_s if pred.fits else math.inf)


def widen(costs: CostTable, cluster: Cluster, batch_size: int, *,
          deadline: float,
          optimizer_state_factor: float = 0.0,
          micro_batch_sizes: Sequence[int] | None = None,
          max_cuts: int | None = DEFAULT_MAX_CUTS,
          incumbent: float = math.inf,
          sizes: Sequence[int] = WIDEN_SIZES,
          after: Widened | None = None,
          on_better: Callable[[float], None] | None = None) -> Widened:
    """[Note: iterative widening]: the best plan of the sub-clusters of ``sub_clusters``
    that beats ``incumbent``, planned exactly in turn until ``deadline`` (a
    ``time.perf_counter()`` value), lifted to ``cluster``. ``after``: an earlier call's
    result on the same instance, to go on from (the sizes it finished are not planned
    again); ``on_better``: called with the round of each better plan as it is found.

    [Note: plans that want every device]
    Sizes are tried smallest first. Where the best round of a size is below the one of
    the size before times ``sqrt(k_before / k)`` (more devices pay nearly in proportion:
    ResNet-50 on Jetsons at 1000 Mbps, 2.94 s on 4 and 2.15 s on 6), the good plans use
    every device they get, so the whole cluster's own search is the better use of the time
    and the widening stops (``saturated``). On slow networks a few more devices pay little
    (the ResNet-50 fleets: 6.71 s on 4 devices, 6.00 s on 6), and the sizes go on.
    """
    cluster = cluster.for_costs(costs)
    best: Plan | None = None
    # the sub-clusters' own best, which their searches must beat, and the size it is of
    own, done = (math.inf, 0) if after is None else (after.own_s, after.size)
    best_devices: tuple[str, ...] = ()
    searched: list[tuple[str, ...]] = [] if after is None else list(after.searched)
    subs = sub_clusters(costs, cluster, sizes)
    saturated = after is not None and after.saturated
    for k in sorted({len(names) for names in subs if len(names) > done}):
        if saturated or time.perf_counter() >= deadline:
            break
        before = own
        for names in subs:
            if len(names) != k or time.perf_counter() >= deadline:
                continue
            searched.append(names)
            found = _plan_sub(costs, cluster, cluster.subset(names), batch_size,
                              optimizer_state_factor, micro_batch_sizes, max_cuts,
                              own, deadline)
            if found is not None and found[1] < own:
                best, own, best_devices = found[0], found[1], names
                log.debug("widening: %d devices: round %.6g s", len(names), own)
                if on_better is not None:
                    on_better(own)
        if time.perf_counter() >= deadline:
            break   # (a size cut short is planned again by a later call)
        # [Note: plans that want every device]
        saturated = bool(done) and own < before * math.sqrt(done / k)
        done = k
    if best is None or own >= incumbent:
        return Widened(None, incumbent, (), tuple(searched), own, done, saturated)
    return Widened(best, own, best_devices, tuple(searched), own, done, saturated)


def _plan_sub(costs: CostTable, cluster: Cluster, sub: Cluster, batch_size: int, osf: float,
              micro_batch_sizes: Sequence[int] | None, max_cuts: int | None,
              incumbent: float, deadline: float) -> tuple[Plan, float] | None:
    """The best plan of the sub-cluster ``sub`` below ``incumbent`` (lifted to ``cluster``,
    with its round there) by the deadline: the wide space alone where it has at most
    ``WIDE_EXACT_MAX`` pairs (it covers every order); else the paper's space in the
    capability order, in the order that keeps the units together where that differs,
    then the wide space where it has at most ``WIDEN_WIDE_MAX`` pairs. None where none
    is better."""
    from solver.anytime import WIDE_EXACT_MAX, wide_size  # (anytime imports this module)

    size = wide_size(costs, sub)
    runs: list[tuple[SpaceName, Sequence[str] | None]] = []
    if size > WIDE_EXACT_MAX:
        # (a small wide space covers both orders and is searched at once)
        runs.append(("order", None))
        together = _unit_order(costs, sub)
        if together != [d.name for d in sorted_devices(sub, costs)]:
            runs.append(("order", together))
    if size <= WIDEN_WIDE_MAX:
        runs.append(("classes", None))
    best: tuple[Plan, float] | None = None
    for space, order in runs:
        if time.perf_counter() >= deadline:
            break
        found = asteroid_dp(costs, sub, batch_size, optimizer_state_factor=osf,
                            micro_batch_sizes=micro_batch_sizes, max_cuts=max_cuts,
                            space=space, device_order=order, incumbent=incumbent,
                            deadline=deadline)
        if found.plan is None:
            continue
        lifted, value = lift(found.plan, costs, cluster)
        if value < incumbent:
            best, incumbent = (lifted, value), value
    return best
