"""The planners' search spaces: device order and classes, micro-batch sizes, cuts, groups.

[Note: device classes]
Two devices are *interchangeable* when swapping them changes no number of the model:
same type, memory, capability speed, bound speed and time source (``solver.timing``),
and the same bandwidth and latency to every third device. Swapping ``a`` and ``b``
then maps every plan to a plan of equal round time and memory, and the relation is an
equivalence: if ``a ~ b`` and ``b ~ c``, the link ``a-b`` equals ``a-c`` (``a ~ b`` seen
from ``c``) and ``b-c`` (``b ~ c`` seen from ``a``), so all links inside a class are
equal and every permutation of a class is a symmetry of the cluster. A plan is then
determined, up to symmetry, by *how many* devices of each class every stage takes. On a
fleet of a few board types on one network that is a handful of classes; a fast wired
pair is a class of two (its members see the rest the same way); a device with a link of
its own is a class of one.

[Note: the capability order]
Devices are sorted by capability speed (descending), then memory (descending), then
class (classes of equal speed and memory in the order of their first name), then name.
A class is therefore a contiguous run of this order, and a group of devices is always
listed in this order (its shares follow Algorithm 1 in that order, and samples are
assigned in that order). ``planner="ilp-wide"`` and brute force list groups the same way.

[Note: group spaces]
A search space tells the DP which device groups a stage may take. Both spaces describe
what is still free for the stages after a point (a *pool*) and, for a pool, the groups it
offers and the pool that each leaves:

* ``SliceSpace`` (the paper's space, ``asteroid_dp``'s default): devices in one order
  (the capability order unless given); stages take consecutive slices from the front, so
  a pool is "devices ``i..n-1``" and its groups are the slices ``i..j-1``.
* ``ClassSpace`` (the wide space): a pool is a count per class; a group is any nonzero
  count vector within it (at most ``limit`` devices: every device gets a sample). Up to
  the symmetry of [Note: device classes], every plan whose stages take disjoint groups,
  each listed in capability order, is in this space, so the DP over it finds what
  ``planner="ilp-wide"`` finds. A group's members are the first devices of each class
  (``representatives``), the stage after it takes the next ones (``transfer_names``),
  and ``assign`` names the devices of a whole plan, first stage first.
* ``EvenSpace`` (a part of the wide space, [Note: even groups]): the count vectors whose
  size divides the micro-batch, with at most one device outside the group's largest
  class. A quick search for plans the capability order cannot hold; what it proves
  holds for it alone, not for the wide space.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from contracts.cluster import Cluster, Device
from contracts.errors import PlanError
from contracts.plan import MAX_BATCH_SIZE
from contracts.table import CostTable
from solver.evaluate import Pieces, resharding_pieces
from solver.timing import Timing

__all__ = [
    "DEFAULT_MAX_CUTS",
    "sorted_devices",
    "device_classes",
    "micro_batch_choices",
    "MAX_BATCH_SIZE",
    "check_batch_size",
    "divisors",
    "candidate_cuts",
    "balanced_cuts",
    "GroupInfo",
    "SearchSpace",
    "SliceSpace",
    "ClassSpace",
    "GroupsTimeout",
]

DEFAULT_MAX_CUTS = 96

_DEADLINE_EVERY = (1 << 14) - 1
"""``ClassSpace.groups`` checks its deadline once per this many count vectors (plus one)."""


class GroupsTimeout(Exception):
    """Raised by ``SearchSpace.groups`` when its deadline passes while it lists groups."""


def _until(items: Iterator[tuple[int, ...]], deadline: float) -> Iterator[tuple[int, ...]]:
    """``items``, with ``GroupsTimeout`` once the deadline has passed (checked every
    ``_DEADLINE_EVERY + 1`` items)."""
    for n, item in enumerate(items):
        if not n & _DEADLINE_EVERY and time.perf_counter() > deadline:
            raise GroupsTimeout
        yield item


def _class_keys(cluster: Cluster, timing: Timing, devices: Sequence[Device]) -> list[int]:
    """Class index per device of ``devices`` ([Note: device classes]), numbered in order of
    first appearance."""
    names = [d.name for d in devices]
    own = []
    for d in devices:
        t = timing.device(d.name)
        own.append((d.type, cluster.usable_bytes(d.name), t.speed, t.bound_speed, t.source,
                    t.divisor))
    n = len(devices)

    def link(a: str, b: str) -> tuple[float, float]:
        return cluster.bandwidth_mbps_between(a, b), cluster.latency_s(a, b)

    rows = [[link(a, b) if a != b else None for b in names] for a in names]
    label = [-1] * n
    count = 0
    for a in range(n):
        if label[a] >= 0:
            continue
        label[a] = count
        for b in range(a + 1, n):
            if label[b] >= 0 or own[b] != own[a]:
                continue
            if all(rows[a][c] == rows[b][c] for c in range(n) if c not in (a, b)):
                label[b] = count
        count += 1
    return label


def sorted_devices(cluster: Cluster, costs: CostTable | float) -> list[Device]:
    """Devices in the capability order of [Note: the capability order].

    ``costs`` is the cost table (capability speeds of ``solver.timing.Timing``: a device
    with a column has its whole-model ratio) or a host's FLOP/s (the declared speeds).
    """
    if isinstance(costs, CostTable):
        timing = Timing.of(costs, cluster)
        speeds = timing.speeds
    else:
        speeds = cluster.speeds(costs)
        timing = None
    usable = {d.name: cluster.usable_bytes(d.name) for d in cluster.devices}
    by_name = sorted(cluster.devices, key=lambda d: (-speeds[d.name], -usable[d.name], d.name))
    if timing is None or len(by_name) < 2:
        return by_name
    label = _class_keys(cluster, timing, by_name)
    rank = {d.name: label[k] for k, d in enumerate(by_name)}
    return sorted(by_name, key=lambda d: (-speeds[d.name], -usable[d.name], rank[d.name],
                                          d.name))


def device_classes(cluster: Cluster, costs: CostTable) -> list[list[str]]:
    """The classes of interchangeable devices ([Note: device classes]), each a list of
    names; classes and members in the capability order."""
    devices = sorted_devices(cluster, costs)
    label = _class_keys(cluster, Timing.of(costs, cluster), devices)
    classes: dict[int, list[str]] = {}
    for d, k in zip(devices, label, strict=True):
        classes.setdefault(k, []).append(d.name)
    return list(classes.values())


def divisors(n: int) -> list[int]:
    """The divisors of ``n >= 1``, ascending (by pairs up to the square root: a batch of
    10**9 is as quick as one of 64)."""
    small = [b for b in range(1, math.isqrt(n) + 1) if n % b == 0]
    return sorted({*small, *(n // b for b in small)})


def check_batch_size(batch_size: int, option: str = "batch_size") -> None:
    """``PlanError`` for a batch size above ``MAX_BATCH_SIZE``."""
    if batch_size > MAX_BATCH_SIZE:
        raise PlanError(f"{option} {batch_size} is above {MAX_BATCH_SIZE}, the largest the "
                        f"planners take (Algorithm 1 splits a micro-batch sample by sample, "
                        f"so planning time grows with the batch); plan a smaller batch and "
                        f"accumulate gradients over several")


def micro_batch_choices(batch_size: int, micro_batch_sizes: Sequence[int] | None) -> list[int]:
    """The micro-batch sizes to try: divisors of the batch size (or the given ones)."""
    if batch_size < 1:
        raise PlanError(f"batch_size must be >= 1, got {batch_size}")
    check_batch_size(batch_size)
    if micro_batch_sizes is None:
        return divisors(batch_size)
    bad = [b for b in micro_batch_sizes if b < 1 or batch_size % b]
    if bad:
        raise PlanError(f"micro-batch sizes {bad} do not divide the batch size {batch_size}; "
                        f"use divisors of {batch_size}")
    return sorted(set(micro_batch_sizes))


def candidate_cuts(costs: CostTable, max_cuts: int | None) -> list[int]:
    """Layer indices ``c`` after which a stage may end (``c`` in ``0..L-2``), sorted.

    [Note: candidate cuts]
    Exactness costs time roughly quadratic in the number of cut positions. With more than
    ``max_cuts`` layer boundaries, cuts are restricted to ``max_cuts`` candidates: the
    boundaries that split the model's total compute evenly, each moved to the boundary
    with the fewest cut bytes within half a step. The planners are exact over the
    candidate cuts; ``max_cuts=None`` uses every boundary.
    """
    n = costs.num_layers
    if max_cuts is None or n - 1 <= max_cuts:
        return list(range(n - 1))
    return balanced_cuts(costs, list(range(n - 1)), max_cuts)


def balanced_cuts(costs: CostTable, allowed: Sequence[int], count: int) -> list[int]:
    """At most ``count`` of the cut positions ``allowed`` (sorted), chosen as
    ``candidate_cuts`` chooses among every boundary: the ones nearest to splitting the
    model's compute into ``count + 1`` equal parts, each moved to the allowed boundary
    with the fewest cut bytes within half a step. The DP's coarse passes take their cuts
    this way from the candidate cuts ([Note: coarse passes] in ``solver.dp``)."""
    if len(allowed) <= count:
        return list(allowed)
    work = [lc.fwd.at(1) + lc.bwd.at(1) for lc in costs.layers]
    total = sum(work) or 1.0
    prefix = [0.0]
    for w in work:
        prefix.append(prefix[-1] + w)
    chosen: set[int] = set()
    step = total / (count + 1)
    # every target's distances at once, in the float operations of a loop over the
    # boundaries (abs(prefix[c + 1] - target)); the first of equal ones wins, as in min()
    targets = np.arange(1, count + 1, dtype=np.float64) * step
    at = np.asarray(allowed, dtype=np.int64)
    distance = np.abs(np.asarray(prefix[1:])[at][None, :] - targets[:, None])
    inside = distance <= step / 2
    cut_bytes = costs.cut_bytes
    for k in range(count):
        # allowed boundary i (after layer allowed[i]) where its prefix is nearest the target
        window = np.flatnonzero(inside[k]).tolist() or [int(np.argmin(distance[k]))]
        row = distance[k]
        chosen.add(allowed[min(window, key=lambda i: (cut_bytes[allowed[i]], float(row[i])))])
    return sorted(chosen)


@dataclass(frozen=True)
class GroupInfo:
    """What the DP needs of one device group: its members (indices into the space's
    device order, in that order) and the numbers every stage on it shares."""

    members: tuple[int, ...]
    names: tuple[str, ...]
    speeds: tuple[float, ...]      # capability speeds (Algorithm 1)
    caps: tuple[int, ...]          # memory bytes
    bound_speed: float             # sum of the bound speeds
    min_bw: float                  # slowest link inside (bytes/s; 0.0 for one device)
    max_lat: float                 # largest latency inside (seconds)
    update_pairs: tuple[tuple[float, float, float], ...]   # Timing.update_pairs
    sources: tuple[int, ...]       # time sources used, sorted

    @property
    def size(self) -> int:
        return len(self.members)


class SearchSpace:
    """The groups a stage may take, by pool ([Note: group spaces]). Subclasses fill the
    device tables and implement the pool methods; pools and groups are small integers."""

    names: list[str]
    speeds: list[float]
    caps: list[int]
    bounds: list[float]
    srcs: list[int]
    divs: list[float]
    root: int
    exhaustive_order: bool = False
    """True when the space holds every order of the devices (the wide space)."""

    def __init__(self, costs: CostTable, cluster: Cluster, devices: Sequence[Device]) -> None:
        self.cluster = cluster
        self.timing = timing = Timing.of(costs, cluster)
        self.devices = list(devices)
        self.names = [d.name for d in devices]
        self.n = len(devices)
        per = [timing.device(name) for name in self.names]
        self.speeds = [t.speed for t in per]
        self.caps = [cluster.usable_bytes(d.name) for d in devices]
        self.bounds = [t.bound_speed for t in per]
        self.srcs = [t.source for t in per]
        self.divs = [t.divisor for t in per]
        self.groups_info: list[GroupInfo] = []
        self._group_ids: dict[Any, int] = {}
        # groups whose stages cost the same (same speeds, memory, time sources and links
        # inside, member by member) share a kind: the DP builds their stages once
        self.group_kind: list[int] = []
        self.kind_group: list[int] = []
        self._kinds: dict[Any, int] = {}

    # -- pools ----------------------------------------------------------------------------
    # per pool id: its devices, the sum of their bound speeds, and the sum of the bound
    # speeds of the devices outside it (those the stages before it may have used)
    pool_sizes: list[int]
    pool_speeds: list[float]
    outside_speeds: list[float]

    def pool_size(self, pool: int) -> int:
        return self.pool_sizes[pool]

    def pool_speed(self, pool: int) -> float:
        """Sum of the bound speeds of the pool's devices."""
        return self.pool_speeds[pool]

    def prefix_speed(self, pool: int) -> float:
        """Sum of the bound speeds of the devices outside the pool (those the stages
        before it may have used)."""
        return self.outside_speeds[pool]

    def best_speed(self, pool: int, limit: int) -> float:
        """The largest bound speed of a group of at most ``limit`` devices of the pool."""
        raise NotImplementedError

    def pool_sources(self, pool: int, limit: int) -> list[int]:
        """The time sources of the groups of at most ``limit`` devices of the pool."""
        raise NotImplementedError

    def groups(self, pool: int, limit: int,
               deadline: float | None = None) -> list[tuple[int, int]]:
        """``(group, pool left)`` for every group of at most ``limit`` devices of the pool,
        in a fixed order. ``deadline`` (a ``time.perf_counter()`` value): raise
        ``GroupsTimeout`` where listing them is still under way then."""
        raise NotImplementedError

    def rest_speed(self, gid: int, left: int) -> float:
        """An upper bound on the bound speed of the devices a stage on ``gid`` leaves to the
        stages after it when it leaves ``left``; the DP builds stages once per value."""
        return self.pool_speeds[left]

    # -- groups -----------------------------------------------------------------------------
    def group(self, gid: int) -> GroupInfo:
        return self.groups_info[gid]

    def pieces(self, prev: int, prev_shares: tuple[int, ...], cur: int,
               shares: tuple[int, ...]) -> Pieces:
        """The messages of the cut between two adjacent stages' groups (disjoint, as in a
        plan): ``pieces_time`` of them is ``transfer_time``, in its float operations."""
        senders, receivers = self.groups_info[prev].names, self.groups_info[cur].names
        cluster = self.cluster

        def link(i: int, j: int) -> tuple[float, float] | None:
            a, b = senders[i], receivers[j]
            return None if a == b else (cluster.latency_s(a, b), cluster.bandwidth_bytes_s(a, b))

        return resharding_pieces(prev_shares, shares, link)

    def signature(self, gid: int, shares: tuple[int, ...]) -> Any:
        """What decides how a stage on ``gid`` with ``shares`` sends its cut to any next
        group: equal signatures give equal re-sharding times (here: the group itself)."""
        return (gid, shares)

    def assign(self, gids: Sequence[int]) -> list[tuple[str, ...]]:
        """The device names of a plan's groups, first stage first."""
        return [self.groups_info[g].names for g in gids]

    def _intern(self, key: Any, members: Sequence[int]) -> int:
        found = self._group_ids.get(key)
        if found is not None:
            return found
        gid = self._group_ids[key] = len(self.groups_info)
        info = self._info(members)
        self.groups_info.append(info)
        value = (tuple((self.speeds[d], self.caps[d], self.bounds[d], self.srcs[d], self.divs[d])
                       for d in members), info.min_bw, info.max_lat, info.update_pairs)
        kind = self._kinds.get(value)
        if kind is None:
            kind = self._kinds[value] = len(self.kind_group)
            self.kind_group.append(gid)
        self.group_kind.append(kind)
        return gid

    def _info(self, members: Sequence[int]) -> GroupInfo:
        names = tuple(self.names[d] for d in members)
        low, high = math.inf, 0.0
        for x, a in enumerate(names):   # the same numbers as allreduce_time
            for b in names[x + 1:]:
                low = min(low, self.cluster.bandwidth_bytes_s(a, b))
                high = max(high, self.cluster.latency_s(a, b))
        return GroupInfo(
            members=tuple(members), names=names,
            speeds=tuple(self.speeds[d] for d in members),
            caps=tuple(self.caps[d] for d in members),
            bound_speed=sum(self.bounds[d] for d in members),
            min_bw=0.0 if len(names) < 2 else low, max_lat=high,
            update_pairs=tuple(self.timing.update_pairs(names)),
            sources=tuple(sorted({self.srcs[d] for d in members})))


class SliceSpace(SearchSpace):
    """Consecutive slices of one device order ([Note: group spaces]); pool ``i`` is
    devices ``i..n-1``."""

    def __init__(self, costs: CostTable, cluster: Cluster, devices: Sequence[Device]) -> None:
        super().__init__(costs, cluster, devices)
        n = self.n
        self.root = 0
        self._total = [[sum(self.bounds[a:b]) for b in range(n + 1)] for a in range(n + 1)]
        self._srcs = [[sorted(set(self.srcs[a:b])) for b in range(n + 1)] for a in range(n)]
        # slowest link and largest latency of every slice, as allreduce_time computes them
        self._min_bw = [[0.0] * (n + 1) for _ in range(n)]
        self._max_lat = [[0.0] * (n + 1) for _ in range(n)]
        for a in range(n):
            low, high = math.inf, 0.0
            for b in range(a + 1, n):
                for c in range(a, b):
                    low = min(low, cluster.bandwidth_bytes_s(self.names[c], self.names[b]))
                    high = max(high, cluster.latency_s(self.names[c], self.names[b]))
                self._min_bw[a][b + 1] = low
                self._max_lat[a][b + 1] = high
        self._groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self.pool_sizes = [n - i for i in range(n + 1)]
        self.pool_speeds = [self._total[i][n] for i in range(n + 1)]
        self.outside_speeds = [self._total[0][i] for i in range(n + 1)]

    def best_speed(self, pool: int, limit: int) -> float:
        return self._total[pool][min(self.n, pool + limit)]

    def pool_sources(self, pool: int, limit: int) -> list[int]:
        return self._srcs[pool][min(self.n, pool + limit)]

    def groups(self, pool: int, limit: int,
               deadline: float | None = None) -> list[tuple[int, int]]:
        key = (pool, limit)
        found = self._groups.get(key)
        if found is None:
            found = self._groups[key] = [
                (self._intern((pool, j), range(pool, j)), j)
                for j in range(pool + 1, min(self.n, pool + limit) + 1)]
        return found

    def _info(self, members: Sequence[int]) -> GroupInfo:
        a, b = members[0], members[-1] + 1
        names = tuple(self.names[a:b])
        return GroupInfo(
            members=tuple(members), names=names, speeds=tuple(self.speeds[a:b]),
            caps=tuple(self.caps[a:b]), bound_speed=self._total[a][b],
            min_bw=self._min_bw[a][b], max_lat=self._max_lat[a][b],
            update_pairs=tuple(self.timing.update_pairs(names)),
            sources=tuple(self._srcs[a][b]))


EVEN_OFF_CLASS = 1
"""``EvenSpace``: the most devices of a group outside its largest class."""


class ClassSpace(SearchSpace):
    """Count vectors over the classes of interchangeable devices ([Note: group spaces])."""

    exhaustive_order = True

    def __init__(self, costs: CostTable, cluster: Cluster) -> None:
        devices = sorted_devices(cluster, costs)
        super().__init__(costs, cluster, devices)
        label = _class_keys(cluster, self.timing, devices)
        self.classes: list[list[int]] = []
        seen: dict[int, int] = {}
        for d, k in enumerate(label):
            if k not in seen:
                seen[k] = len(self.classes)
                self.classes.append([])
            self.classes[seen[k]].append(d)
        self.counts = tuple(len(c) for c in self.classes)
        self._class_of = {d: k for k, members in enumerate(self.classes) for d in members}
        # per class, its link (latency s, bandwidth bytes/s) to a device of every class
        # (its own: to another member; None for a class of one), the numbers of
        # Cluster.latency_s / bandwidth_bytes_s
        self._rows: list[tuple[tuple[float, float] | None, ...]] = []
        for members in self.classes:
            a = self.names[members[0]]
            row: list[tuple[float, float] | None] = []
            for others in self.classes:
                b = next((self.names[d] for d in others if d != members[0]), None)
                row.append(None if b is None else (cluster.latency_s(a, b),
                                                   cluster.bandwidth_bytes_s(a, b)))
            self._rows.append(tuple(row))
        k_count = len(self.classes)
        self._class_bound = [self.bounds[c[0]] for c in self.classes]
        self._class_src = [self.srcs[c[0]] for c in self.classes]
        # classes by bound speed, fastest first (best_speed's greedy)
        self._by_bound = sorted(range(k_count), key=lambda k: -self._class_bound[k])
        self._pool_ids: dict[tuple[int, ...], int] = {}
        self._pools: list[tuple[int, ...]] = []
        self.pool_sizes, self.pool_speeds, self.outside_speeds = [], [], []
        self._groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self._group_counts: list[tuple[int, ...]] = []
        self.root = self.pool_id(self.counts)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def pool_id(self, counts: tuple[int, ...]) -> int:
        found = self._pool_ids.get(counts)
        if found is None:
            found = self._pool_ids[counts] = len(self._pools)
            self._pools.append(counts)
            inside = outside = 0.0
            for k, c in enumerate(counts):
                inside += c * self._class_bound[k]
                outside += (self.counts[k] - c) * self._class_bound[k]
            self.pool_sizes.append(sum(counts))
            self.pool_speeds.append(inside)
            self.outside_speeds.append(outside)
        return found

    def pool_counts(self, pool: int) -> tuple[int, ...]:
        return self._pools[pool]

    def best_speed(self, pool: int, limit: int) -> float:
        counts = self._pools[pool]
        left, total = limit, 0.0
        for k in self._by_bound:
            take = min(left, counts[k])
            total += take * self._class_bound[k]
            left -= take
            if not left:
                break
        return total

    def pool_sources(self, pool: int, limit: int) -> list[int]:
        counts = self._pools[pool]
        return sorted({self._class_src[k] for k, c in enumerate(counts) if c})

    def groups(self, pool: int, limit: int,
               deadline: float | None = None) -> list[tuple[int, int]]:
        key = (pool, limit)
        found = self._groups.get(key)
        if found is not None:
            return found
        counts = self._pools[pool]
        out = [self._take(counts, take) for take in self._takes(counts, limit, deadline)]
        self._groups[key] = out
        return out

    def _takes(self, counts: tuple[int, ...], limit: int,
               deadline: float | None) -> Iterator[tuple[int, ...]]:
        """The count vectors a pool of ``counts`` offers: every nonzero one of at most
        ``limit`` devices."""
        # a pool of a fleet's many classes has millions of count vectors (32 boards with
        # ten wired pairs: 35 million, 10 s to list): the deadline is checked as they go
        takes: Iterator[tuple[int, ...]] = itertools.product(*(range(c + 1) for c in counts))
        if deadline is not None:
            takes = _until(takes, deadline)
        return (take for take in takes if 0 < sum(take) <= limit)

    def _take(self, counts: tuple[int, ...], take: tuple[int, ...]) -> tuple[int, int]:
        """``(group, pool it leaves)`` of the count vector ``take`` from the pool of
        ``counts``: the first free devices of each class, interned."""
        members = [d for k, t in enumerate(take) for d in self.classes[k][:t]]
        gid = self._intern(take, members)
        if gid == len(self._group_counts):
            self._group_counts.append(take)
        return gid, self.pool_id(tuple(c - t for c, t in zip(counts, take, strict=True)))

    def group_counts(self, gid: int) -> tuple[int, ...]:
        return self._group_counts[gid]

    def rest_speed(self, gid: int, left: int) -> float:
        """Everything outside the group: a group's stages are then built once for every
        pool that offers it."""
        return self.pool_speeds[self.root] - self.groups_info[gid].bound_speed

    def signature(self, gid: int, shares: tuple[int, ...]) -> Any:
        """The shares and, per member, its links to every class: a receiver of class ``l``
        sees a sender of class ``k`` over the link between the classes, so two groups
        with equal signatures re-shard to any next group in the same time."""
        return (shares, tuple(self._rows[self._class_of[d]]
                              for d in self.groups_info[gid].members))

    def pieces(self, prev: int, prev_shares: tuple[int, ...], cur: int,
               shares: tuple[int, ...]) -> Pieces:
        """The messages between two disjoint groups of these classes: a link's numbers
        follow from the classes of its ends ([Note: device classes])."""
        rows = self._rows
        senders = [self._class_of[d] for d in self.groups_info[prev].members]
        receivers = [self._class_of[d] for d in self.groups_info[cur].members]
        return resharding_pieces(prev_shares, shares,
                                 lambda i, j: rows[senders[i]][receivers[j]])

    def assign(self, gids: Sequence[int]) -> list[tuple[str, ...]]:
        used = [0] * len(self.classes)
        out = []
        for gid in gids:
            take = self._group_counts[gid]
            out.append(tuple(self.names[d] for k, t in enumerate(take)
                             for d in self.classes[k][used[k]:used[k] + t]))
            for k, t in enumerate(take):
                used[k] += t
        return out


class EvenSpace(ClassSpace):
    """The groups of ``ClassSpace`` whose size divides the micro-batch (the ``limit``
    ``asteroid_dp`` asks for), with at most ``EVEN_OFF_CLASS`` devices outside their
    largest class ([Note: even groups]).

    [Note: even groups]
    The best plans known on Jetson mixes give every stage a group whose size divides the
    micro-batch, nearly all of one class: on ResNet-50 and 16 Jetsons at 1 Gbps the
    optimum over the 92 candidate cuts (147 s of CPU to prove) has groups of 4 NX, 4
    TX2, 2 NX, 4 Nano and a TX2 with a Nano at micro-batch 4; on 32 Jetsons the best
    plan known (found by the wide search in 80 s) has one NX with seven TX2, 8 NX, 8
    Nano, 4 TX2 and 2 NX at micro-batch 8. Such a group splits the micro-batch evenly
    where its devices are alike, and where one device is of another class it still
    takes a share like the rest. These few groups (27 count vectors on three classes at
    micro-batch 8, against 1584 in a pool of 32 Jetsons) make the classes DP quick: on
    12 balanced cut candidates it finds 0.8389 s on 32 Jetsons in under a second (the
    paper's space's optimum: 0.8851 s) and on 24 cuts 1.3694 s on 16 Jetsons in 0.4 s.
    No device order holds these plans: the paper's space puts the fastest devices first,
    so a stage of TX2 before a stage of NX is outside it. The space is a part of the
    wide space, so its plans are real and its bounds are its own (``exhaustive_order``
    False)."""

    exhaustive_order = False

    def _takes(self, counts: tuple[int, ...], limit: int,
               deadline: float | None) -> Iterator[tuple[int, ...]]:
        """The even count vectors within ``counts``, in order."""
        takes: set[tuple[int, ...]] = set()
        for size in (d for d in range(1, min(limit, sum(counts)) + 1) if limit % d == 0):
            for k, have in enumerate(counts):
                for off in range(min(EVEN_OFF_CLASS, size - 1) + 1):
                    if have < size - off:
                        continue
                    # `off` devices from the other classes, any mix of them
                    others = [j for j in range(len(counts)) if j != k]
                    for mix in itertools.combinations_with_replacement(others, off):
                        vector = [0] * len(counts)
                        vector[k] = size - off
                        for j in mix:
                            vector[j] += 1
                        if all(t <= c for t, c in zip(vector, counts, strict=True)):
                            takes.add(tuple(vector))
        return iter(sorted(takes))
