"""Re-planning after device failures: a fast layer-wise repair, checked against a full re-plan.

[Note: layer-wise re-planning]
The base repair keeps every stage that still has a device, in the same order, with the
failed devices removed from its group (a group that lost a member keeps its layers and
its survivors share the micro-batch). A stage whose whole group failed is *lost*; a run
of lost stages between two kept stages ``p`` and ``n`` leaves the layer range ``[a, b]``
without a device, and the cut between ``p`` and ``n`` may fall anywhere in
``[a - 1 - k, b + k]`` (at either end of the pipeline the single neighbour takes the
whole range). Every other cut may move by ``k`` layers plus its part of the lost load:
the load ripples away from the failure, so a cut may move towards it by up to twice the
share of the load that the stages behind the cut would take in proportion to their
number (at most all of it). Stages far from the failure therefore keep most of their
layers and the runtime moves few weights.

Besides the base repair a few local *layouts* are tried: the changed stage merged with
a neighbour into one data-parallel group; one device moved across a boundary next to
the failure; a lost range given, as a stage of its own, to a survivor the plan did not
use or to a member of a neighbouring multi-device group; an unused survivor joining a
group that lost members.

For every layout a windowed DP over the cuts summarises suffix pipelines by the same
``(R, Xm, Pre, G)`` numbers as the Asteroid DP (``solver.summary.prepend``), so it ranks cut
vectors by the model's round time; shares come from Algorithm 1
(``solver.split.split_stage``: by capability speed, capped by memory at the new in-flight
counts; times per device from ``solver.timing.Timing``, cost columns included)
and a stage that its group cannot hold is excluded. All layouts run at the current
micro-batch size, the two best also at the ``micro_batch_radius`` neighbouring divisors
of the batch size. The best few candidates (and the unmoved cuts) are polished by
coordinate descent on the exact ``solver.evaluate`` round time (each cut over its
window, the others fixed, until nothing improves; at most ``max_passes`` passes); only
plans that fit count. This takes milliseconds to tens of milliseconds.

``replan`` also runs the full planner (``solver.api.plan``) on the survivors and takes
the layer-wise plan when its round time is within ``tolerance`` of the full plan's.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from contracts.cluster import Cluster
from contracts.errors import PlanError
from contracts.plan import Plan, PlannerInfo, Stage
from contracts.table import CostTable
from solver.anytime import check_time_limit
from solver.evaluate import (
    LayerSums,
    check_covers,
    evaluate,
    in_flight,
    stage_memory_bytes,
    stage_tail_time,
    transfer_time,
)
from solver.replicas import with_replicas
from solver.space import divisors
from solver.split import split_shares, split_stage
from solver.summary import PipelineSummary, dominates, prepend
from solver.timing import Timing

__all__ = ["ReplanInfo", "replan_layerwise", "replan", "survivors_of", "FullPlanner",
           "REPLAN_TIME_LIMIT_S"]

logger = logging.getLogger(__name__)

FullPlanner = Callable[[CostTable, Cluster, int, float], Plan]
"""``(costs, survivors, batch_size, optimizer_state_factor) -> Plan`` (raises PlanError)."""

LAYERWISE_PLANNER = "layerwise-replan"

REPLAN_TIME_LIMIT_S: float | None = 10.0
"""Seconds the full re-plan of a recovery may search (``solver.api.plan(time_limit=)``;
None: exact, however long); it returns the best plan found by then, with its proven gap.
The survivors wait for it: after one device failed, the exact search took 42-52 s on
ResNet-50 x 32 Jetsons (1 Gbps) and 104-122 s on the 32-device home fleet
(examples/clusters/fleet-32.yaml), where the layer-wise repair took 0.2-0.4 s and was
chosen either way (``python tools/time_planner.py --replan jetsons 32``). Clusters of up
to 8 boards of a few types are planned exactly well within it (2.2 s at 8 Jetsons; the
same plan with and without the limit)."""


@dataclass(frozen=True)
class ReplanInfo:
    """What ``replan`` compared and why it chose what it chose (times in seconds;
    a round time is None when that search found no plan that fits)."""

    failed: tuple[str, ...]
    chosen: str  # "layerwise" or "full"
    reason: str
    layerwise_round_s: float | None
    full_round_s: float | None
    layerwise_search_s: float
    full_search_s: float
    tolerance: float
    layerwise_error: str = ""
    full_error: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """Layer-wise round time over the full re-plan's (None if either is missing)."""
        if self.layerwise_round_s is None or not self.full_round_s:
            return None
        return self.layerwise_round_s / self.full_round_s

    def to_dict(self) -> dict[str, Any]:
        return {"failed": list(self.failed), "chosen": self.chosen, "reason": self.reason,
                "layerwise_round_s": self.layerwise_round_s,
                "full_round_s": self.full_round_s,
                "layerwise_search_s": self.layerwise_search_s,
                "full_search_s": self.full_search_s, "tolerance": self.tolerance,
                "ratio": self.ratio, "layerwise_error": self.layerwise_error,
                "full_error": self.full_error, "extra": dict(self.extra)}


def survivors_of(plan: Plan, cluster: Cluster, failed: Iterable[str]) -> Cluster:
    """The cluster without ``failed``; PlanError for unknown names or no survivor."""
    lost = set(failed)
    unknown = sorted(lost - set(cluster.names))
    if unknown:
        raise PlanError(f"failed device(s) {unknown} are not in the cluster "
                        f"{list(cluster.names)}")
    if not lost:
        raise PlanError("replanning needs at least one failed device, got none")
    alive = [d for d in cluster.names if d not in lost]
    if not alive or not any(d not in lost for d in plan.devices):
        raise PlanError(f"no device of the plan survives the failure of {sorted(lost)}; "
                        f"restart from the last checkpoint on new devices")
    return cluster.subset(alive)


def _neighbour_divisors(batch_size: int, mb: int, radius: int) -> list[int]:
    """The ``radius`` divisors of ``batch_size`` below and above ``mb``."""
    sizes = divisors(batch_size)
    i = sizes.index(mb)
    return [sizes[j] for j in range(i - radius, i + radius + 1) if j != i and 0 <= j < len(sizes)]


def _memory_hint(costs: CostTable, survivors: Cluster, osf: float) -> str:
    """A lower bound that explains a failure to fit: weights alone vs total memory."""
    sums = LayerSums.of(costs)
    need = math.ceil(sums.params(0, costs.num_layers - 1) * (2.0 + osf)) \
        + sums.buffers(0, costs.num_layers - 1)
    have = sum(survivors.usable_bytes(d.name) for d in survivors.devices)
    return (f"weights, gradients and optimizer state alone need {need / 2**20:.1f} MiB; "
            f"the survivors have {have / 2**20:.1f} MiB in all")


class _Search:
    """The windowed DP and the exact coordinate descent for one layout's groups."""

    def __init__(self, plan: Plan, costs: CostTable, survivors: Cluster,
                 groups: list[tuple[str, ...]]) -> None:
        self.plan = plan
        self.costs = costs
        self.cluster = survivors
        self.groups = groups
        self.timing = Timing.of(costs, survivors)
        self.sums = self.timing.base
        self.speeds = self.timing.speeds  # capability: Algorithm 1's split
        self.capacity = {d.name: survivors.usable_bytes(d.name) for d in survivors.devices}
        self.evaluations = 0
        self.front_cap = 8
        self.comm_cache: dict[tuple[int, int, tuple[int, ...]], float] = {}
        self.cache: dict[tuple[tuple[int, ...], int], tuple[float, Plan | None]] = {}
        self.least_short: tuple[int, str] = (0, "")
        self.share_cache: dict[tuple[int, int, int, int], tuple[int, ...] | None] = {}

    def build(self, cuts: tuple[int, ...], mb: int) -> tuple[float, Plan | None]:
        """Round time and plan for ``cuts`` (last layer of every stage but the last)."""
        key = (cuts, mb)
        if key in self.cache:
            return self.cache[key]
        result = self._build(cuts, mb)
        self.cache[key] = result
        return result

    def _build(self, cuts: tuple[int, ...], mb: int) -> tuple[float, Plan | None]:
        bounds = (-1, *cuts, self.costs.num_layers - 1)
        if any(bounds[i] >= bounds[i + 1] for i in range(len(bounds) - 1)):
            return math.inf, None
        m = self.plan.batch_size // mb
        stages = []
        for s, group in enumerate(self.groups):
            first, last = bounds[s] + 1, bounds[s + 1]
            shares = self._shares(s, first, last, mb)
            if shares is None:
                return math.inf, None
            stages.append(Stage((first, last), group, shares))
        candidate = replace(self.plan, stages=tuple(stages), micro_batch_size=mb,
                            num_micro_batches=m, replicas={}, predicted=None,
                            num_layers=self.costs.num_layers)
        self.evaluations += 1
        pred = evaluate(candidate, self.costs, self.cluster)
        if not pred.fits:
            short = max(pred.memory_shortfall().items(), key=lambda kv: kv[1])
            if self.least_short[0] == 0 or short[1] < self.least_short[0]:
                self.least_short = (short[1], short[0])
            return math.inf, None
        return pred.round_time_s, candidate.with_prediction(pred)

    def _shares(self, s: int, first: int, last: int, mb: int) -> tuple[int, ...] | None:
        """Algorithm 1 shares of group ``s`` on layers ``first..last`` (None: no fit)."""
        key = (s, first, last, mb)
        if key not in self.share_cache:
            group = self.groups[s]
            count = self.plan.batch_size // mb
            flight = in_flight(count, len(self.groups), s, self.plan.schedule)
            osf = self.plan.optimizer_state_factor
            free = self._free_shares(s, mb)
            if free is not None and all(
                    stage_memory_bytes(self.sums, first, last, b, flight, osf, len(group),
                                       count)
                    <= self.capacity[d] for b, d in zip(free, group, strict=True)):
                shares: tuple[int, ...] | None = free  # what split_stage returns too
            else:
                shares = split_stage(self.sums, first, last, [self.speeds[d] for d in group],
                                     [self.capacity[d] for d in group], mb, flight, osf,
                                     num_micro_batches=count)
            self.share_cache[key] = shares
        return self.share_cache[key]

    def _free_shares(self, s: int, mb: int) -> tuple[int, ...] | None:
        """Algorithm 1 shares of group ``s`` without memory caps."""
        key = (s, -1, -1, mb)
        if key not in self.share_cache:
            self.share_cache[key] = split_shares(mb, [self.speeds[d] for d in self.groups[s]])
        return self.share_cache[key]

    def _stage_terms(self, s: int, start: int, end: int,
                     mb: int) -> tuple[float, float, float] | None:
        """``(E_f, E_b, T_a)`` of stage ``s`` on layers ``start+1..end`` (None when its
        group cannot hold them). The previous group's shares are taken without memory
        caps, so this is exact unless memory binds there (the polishing step is exact)."""
        shares = self._shares(s, start + 1, end, mb)
        if shares is None:
            return None
        group = self.groups[s]
        cf, cb = self.timing.compute(start + 1, end, group, shares)
        comm = 0.0
        if s > 0:
            key = (s, start, shares)
            if key not in self.comm_cache:
                prev = self._free_shares(s - 1, mb)
                self.comm_cache[key] = math.inf if prev is None else transfer_time(
                    self.cluster, self.groups[s - 1], prev, group, shares,
                    self.costs.cut_bytes[start])
            comm = self.comm_cache[key]
            if comm == math.inf:
                return None
        return (cf + comm, cb + comm,
                stage_tail_time(self.cluster, group, self.timing, start + 1, end))

    def window_dp(self, windows: list[tuple[int, int]], mb: int,
                  keep: int = 3) -> list[tuple[float, tuple[int, ...]]]:
        """Best cut vectors with every cut ``i`` inside ``windows[i]``.

        A backward DP over the windows that summarises every suffix pipeline by
        ``(R, Xm, Pre, G)`` and prepends stages with ``solver.summary.prepend``, so a complete
        pipeline's ``R`` is the model's round time (exact up to the share caveat of
        ``_stage_terms``); per start cut it keeps the Pareto front of summaries under
        ``solver.summary.dominates``, the DP's own rule (exact with the drain term).
        """
        last = self.costs.num_layers - 1
        m = self.plan.batch_size // mb
        starts = [(-1, -1), *windows]  # the cut in front of stage s
        tails: dict[int, list[tuple[PipelineSummary | None, tuple[int, ...]]]] = {
            last: [(None, ())]}
        for s in reversed(range(len(self.groups))):
            lo, hi = starts[s]
            nxt: dict[int, list[tuple[PipelineSummary, tuple[int, ...]]]] = {}
            for end, entries in tails.items():
                for start in range(lo, min(hi, end - 1) + 1):
                    terms = self._stage_terms(s, start, end, mb)
                    if terms is None:
                        continue
                    bucket = nxt.setdefault(start, [])
                    for summary, cuts in entries:
                        bucket.append((prepend(m, *terms, summary), (end, *cuts)))
            tails = {}
            for key, bucket in nxt.items():
                bucket.sort()
                kept: list[tuple[PipelineSummary, tuple[int, ...]]] = []
                for item in bucket:  # sorted by R: keep what no kept summary dominates
                    if not any(dominates(o, item[0], m) for o, _ in kept):
                        kept.append(item)
                        if len(kept) == self.front_cap:
                            break
                tails[key] = list(kept)
        finals = sorted((summary[0], cuts[:-1]) for entries in tails.values()
                        for summary, cuts in entries if summary is not None)
        return finals[:keep]

    def descend(self, cuts: tuple[int, ...], windows: Mapping[int, tuple[int, int]], mb: int,
                max_passes: int) -> tuple[float, tuple[int, ...]]:
        best_value, _ = self.build(cuts, mb)
        for _ in range(max_passes):
            improved = False
            for index, (lo, hi) in sorted(windows.items()):
                for value in range(lo, hi + 1):
                    if value == cuts[index]:
                        continue
                    trial = (*cuts[:index], value, *cuts[index + 1:])
                    score, _ = self.build(trial, mb)
                    if score < best_value:
                        best_value, cuts, improved = score, trial, True
            if not improved:
                break
        return best_value, cuts


@dataclass(frozen=True)
class _Layout:
    """Groups of a repaired pipeline with the initial cuts and the window of every cut."""

    label: str
    groups: list[tuple[str, ...]]
    cuts: list[int]
    windows: list[tuple[int, int]]


def _layouts(plan: Plan, costs: CostTable, cluster: Cluster, survivors: Cluster,
             lost: set[str], k: int) -> list[_Layout]:
    """The base repair and its local variants (see [Note: layer-wise re-planning])."""
    cluster_speeds = Timing.of(costs, cluster).speeds  # capability (columns included)
    speeds = {d: cluster_speeds[d] for d in survivors.names}
    memory = {d.name: survivors.usable_bytes(d.name) for d in survivors.devices}

    def order(devices: Iterable[str]) -> tuple[str, ...]:
        return tuple(sorted(devices, key=lambda d: (-speeds[d], -memory[d], d)))

    last_layer = costs.num_layers - 1

    def clip(lo: int, hi: int) -> tuple[int, int]:
        return max(lo, 0), min(hi, last_layer - 1)

    # kept stages with their survivors; lost layer ranges in front of each kept stage
    groups: list[tuple[str, ...]] = []
    ranges: list[tuple[int, int]] = []
    kept: list[Stage] = []
    affected: list[bool] = []
    gap_before: list[tuple[int, int] | None] = []
    pending: tuple[int, int] | None = None
    for stage in plan.stages:
        alive = tuple(d for d in stage.devices if d not in lost)
        if not alive:
            pending = (stage.first if pending is None else pending[0], stage.last)
            continue
        groups.append(alive)
        ranges.append(stage.layers)
        kept.append(stage)
        affected.append(len(alive) != len(stage.devices) or pending is not None)
        gap_before.append(pending)
        pending = None
    tail_gap = pending
    if tail_gap is not None:
        affected[-1] = True
    # events: (position in kept-stage coordinates, layers whose load must move). A cut i
    # sits at i + 0.5; the load ripples away from an event, spread over the stages on
    # each side: a cut left of it may move right by twice the share of the load that the
    # stages left of the cut would take in proportion to their number (at most all of
    # it), and vice versa; every cut may also move +-k.
    events: list[tuple[float, int]] = []
    if gap_before and gap_before[0] is not None:
        events.append((-0.5, gap_before[0][1] - gap_before[0][0] + 1))
    if tail_gap is not None:
        events.append((len(groups) - 0.5, tail_gap[1] - tail_gap[0] + 1))
    for s, stage in enumerate(kept):
        if len(groups[s]) != len(stage.devices):
            total = sum(cluster_speeds[d] for d in stage.devices)
            gone = sum(cluster_speeds[d] for d in stage.devices if d in lost)
            events.append((float(s), math.ceil((stage.last - stage.first + 1) * gone / total)))
    cuts: list[int] = []
    windows: list[tuple[int, int]] = []
    for s in range(len(groups) - 1):
        gap = gap_before[s + 1]
        if gap is not None:
            a, b = gap
            affected[s] = True
            cuts.append(a - 1 + (b - a + 1) // 2)
            windows.append(clip(a - 1 - k, b + k))
            events.append((s + 0.5, b - a + 1))
        else:
            cuts.append(ranges[s][1])
            windows.append((cuts[-1] - k, cuts[-1] + k))
    num = len(groups)
    for i, (lo, hi) in enumerate(windows):
        right = left = 0
        for q, g in events:
            if q > i + 0.5:  # stages 0..i take their part of the load left of the event
                side = sum(1 for j in range(num) if j < q)
                right += math.ceil(g * min(1.0, 2.0 * (i + 1) / side))
            elif q < i + 0.5:
                side = sum(1 for j in range(num) if j > q)
                left += math.ceil(g * min(1.0, 2.0 * (num - 1 - i) / side))
        windows[i] = clip(lo - left, hi + right)
    out = [_Layout("base", groups, cuts, windows)]

    for i in range(len(groups) - 1):
        if not (affected[i] or affected[i + 1]):
            continue
        # merge two neighbouring groups into one data-parallel stage
        out.append(_Layout(f"merge stages {i}+{i + 1}",
                           [*groups[:i], order(groups[i] + groups[i + 1]), *groups[i + 2:]],
                           cuts[:i] + cuts[i + 1:], windows[:i] + windows[i + 1:]))
        # move one device across the boundary
        for src, dst in ((i, i + 1), (i + 1, i)):
            if len(groups[src]) < 2:
                continue
            for device in groups[src]:
                moved = list(groups)
                moved[src] = tuple(d for d in groups[src] if d != device)
                moved[dst] = order((*groups[dst], device))
                out.append(_Layout(f"move {device} to stage {dst}", moved, cuts, windows))

    # a device for a lost range: a spare survivor the plan did not use, or a member of a
    # neighbouring multi-device group (which leaves its group)
    spares = order(d for d in survivors.names if d not in plan.devices)[:2]

    def donors(*neighbours: int) -> list[tuple[str, int | None]]:
        found: list[tuple[str, int | None]] = [(d, None) for d in spares]
        for s in neighbours:
            if 0 <= s < len(groups) and len(groups[s]) > 1:
                found.extend((d, s) for d in groups[s])
        return found

    def without(device: str, source: int | None) -> list[tuple[str, ...]]:
        if source is None:
            return list(groups)
        return [tuple(d for d in g if d != device) if i == source else g
                for i, g in enumerate(groups)]

    if gap_before[0] is not None:
        a, b = gap_before[0]
        for device, source in donors(0):
            out.append(_Layout(f"{device} takes lost layers {a}..{b}",
                               [(device,), *without(device, source)],
                               [b, *cuts], [clip(b - k, b + k), *windows]))
    for s in range(len(groups) - 1):
        gap = gap_before[s + 1]
        if gap is None:
            continue
        a, b = gap
        for device, source in donors(s, s + 1):
            rest = without(device, source)
            out.append(_Layout(f"{device} takes lost layers {a}..{b}",
                               [*rest[:s + 1], (device,), *rest[s + 1:]],
                               [*cuts[:s], a - 1, b, *cuts[s + 1:]],
                               [*windows[:s], clip(a - 1 - k, a - 1 + k), clip(b - k, b + k),
                                *windows[s + 1:]]))
    if tail_gap is not None:
        a, b = tail_gap
        for device, source in donors(len(groups) - 1):
            out.append(_Layout(f"{device} takes lost layers {a}..{b}",
                               [*without(device, source), (device,)],
                               [*cuts, a - 1], [*windows, clip(a - 1 - k, a - 1 + k)]))
    for spare in spares:  # or a spare joins a group that lost members
        for s, group in enumerate(groups):
            if affected[s]:
                out.append(_Layout(f"{spare} joins stage {s}",
                                   [*groups[:s], order((*group, spare)), *groups[s + 1:]],
                                   cuts, windows))
    return out


def replan_layerwise(plan: Plan, costs: CostTable, cluster: Cluster, failed: Iterable[str],
                     *, k: int = 2, max_passes: int = 4, micro_batch_radius: int = 1,
                     polish: int = 3, keep_replicas: bool = True) -> Plan:
    """Repair ``plan`` after ``failed`` devices died (see [Note: layer-wise re-planning]).

    Args:
        plan: the plan that was running.
        costs: the model's cost table.
        cluster: the cluster the plan ran on (failed devices included).
        failed: names of the failed devices.
        k: how far (in layers) a kept cut may move (and the widening of a lost range).
        max_passes: coordinate-descent passes of the polishing step.
        micro_batch_radius: also try this many divisors of the batch size below and
            above the current micro-batch size (0: keep it).
        polish: how many of the best DP candidates the coordinate descent polishes.
        keep_replicas: when ``plan`` had replicas, place new ones (``with_replicas``).

    Returns:
        The repaired plan, evaluated on the survivors: ``plan_version + 1``, the same
        ``model_hash``, the survivors' ``cluster_hash``, planner ``layerwise-replan``.

    Raises:
        PlanError: unknown or no failed devices, no survivor in the plan, or no repair
            of this shape fits in the survivors' memory.
    """
    cluster = cluster.for_costs(costs)
    start = time.perf_counter()
    lost = set(failed)
    survivors = survivors_of(plan, cluster, lost)
    if k < 0 or max_passes < 1 or micro_batch_radius < 0:
        raise PlanError(f"k and micro_batch_radius must be >= 0 and max_passes >= 1, got "
                        f"k={k}, micro_batch_radius={micro_batch_radius}, "
                        f"max_passes={max_passes}")
    check_covers(plan, costs)

    layouts = _layouts(plan, costs, cluster, survivors, lost, k)
    sizes = [plan.micro_batch_size,
             *_neighbour_divisors(plan.batch_size, plan.micro_batch_size, micro_batch_radius)]
    searches = [_Search(plan, costs, survivors, layout.groups) for layout in layouts]
    # every layout at the current micro-batch size; the other sizes for the best layouts;
    # rank the DP candidates by the DP's round time and polish the best few
    scored: list[tuple[float, int, tuple[int, ...], int]] = []
    for index, (layout, search) in enumerate(zip(layouts, searches, strict=True)):
        scored.extend((value, index, cuts, plan.micro_batch_size)
                      for value, cuts in search.window_dp(layout.windows, plan.micro_batch_size))
    scored.sort()
    leaders = list(dict.fromkeys(index for _, index, _, _ in scored))[:2]
    for index in leaders:
        for mb in sizes[1:]:
            scored.extend((value, index, cuts, mb)
                          for value, cuts in searches[index].window_dp(layouts[index].windows,
                                                                       mb))
    scored.sort()
    base = (0.0, 0, tuple(layouts[0].cuts), plan.micro_batch_size)  # the unmoved cuts
    best_value, best_index = math.inf, 0
    best_cuts, best_mb = tuple(layouts[0].cuts), plan.micro_batch_size
    for _, index, cuts, mb in dict.fromkeys([*scored[:polish], base]):
        movable = dict(enumerate(layouts[index].windows))
        value, found = searches[index].descend(cuts, movable, mb, max_passes)
        if value < best_value:
            best_value, best_index, best_cuts, best_mb = value, index, found, mb
    search = searches[best_index]
    evaluations = sum(x.evaluations for x in searches)
    _, repaired = search.build(best_cuts, best_mb)
    if repaired is None:
        short = ""
        shorts = [x.least_short for x in searches if x.least_short[0]]
        if shorts:
            least = min(shorts)
            short = (f" (closest candidate: {least[1]!r} short by "
                     f"{least[0] / 2**20:.1f} MiB)")
        raise PlanError(f"no layer-wise re-plan fits after losing {sorted(lost)}{short}; "
                        f"{_memory_hint(costs, survivors, plan.optimizer_state_factor)}")
    elapsed = time.perf_counter() - start
    repaired = replace(
        repaired, plan_version=plan.plan_version + 1, model_hash=plan.model_hash,
        cluster_hash=survivors.cluster_hash,
        planner=PlannerInfo(LAYERWISE_PLANNER, "1", elapsed, {
            "failed": sorted(lost), "from_plan_version": plan.plan_version,
            "evaluations": evaluations, "k": k, "layout": layouts[best_index].label,
            "layouts": len(layouts)}))
    if keep_replicas and plan.replicas:
        repaired = with_replicas(repaired, costs, survivors)
    logger.info("layer-wise re-plan after losing %s: %d stages, round %.4g s, %d evaluations "
                "in %.1f ms (%s)", sorted(lost), repaired.num_stages, best_value, evaluations,
                1e3 * elapsed, layouts[best_index].label)
    return repaired


def _full_planner_within(time_limit: float | None) -> FullPlanner:
    """The default full re-planner: ``solver.api.plan(planner="asteroid")`` within
    ``time_limit`` seconds (None: exact)."""
    def full(costs: CostTable, survivors: Cluster, batch_size: int,
             optimizer_state_factor: float) -> Plan:
        from solver.api import plan as full_plan

        return full_plan(costs, survivors, batch_size, planner="asteroid",
                         optimizer_state_factor=optimizer_state_factor, time_limit=time_limit)

    return full


def replan(plan: Plan, costs: CostTable, cluster: Cluster, failed: Iterable[str], *,
           tolerance: float = 0.10, k: int = 2,
           full_planner: FullPlanner | None = None,
           time_limit: float | None = REPLAN_TIME_LIMIT_S) -> tuple[Plan, ReplanInfo]:
    """Layer-wise repair or full re-plan, whichever is right for the survivors.

    Runs ``replan_layerwise`` and the full planner on ``cluster`` without ``failed``; the
    layer-wise plan wins when its round time is at most ``(1 + tolerance)`` times the full
    plan's (it moves fewer weights and is found in milliseconds).

    Args:
        plan, costs, cluster, failed: as for ``replan_layerwise``.
        tolerance: how much slower (fraction) the layer-wise plan may be.
        k: cut window of the layer-wise search.
        full_planner: ``(costs, survivors, batch_size, optimizer_state_factor) -> Plan``;
            default ``solver.api.plan(..., planner="asteroid")`` within ``time_limit``.
        time_limit: seconds for the default full re-plan (``REPLAN_TIME_LIMIT_S``; None:
            exact); not used with ``full_planner``.

    Returns:
        ``(new_plan, info)``; ``new_plan`` has ``plan_version + 1``, the same
        ``model_hash`` and the survivors' ``cluster_hash``.

    Raises:
        PlanError: bad arguments, or neither search finds a plan that fits.
    """
    cluster = cluster.for_costs(costs)
    if not tolerance >= 0:
        raise PlanError(f"tolerance must be >= 0, got {tolerance}")
    lost = tuple(sorted(set(failed)))
    survivors = survivors_of(plan, cluster, lost)
    check_time_limit(time_limit)
    planner = full_planner or _full_planner_within(time_limit)

    t0 = time.perf_counter()
    layerwise: Plan | None = None
    lw_error = ""
    try:
        layerwise = replan_layerwise(plan, costs, cluster, lost, k=k)
    except PlanError as exc:
        lw_error = str(exc)
    lw_time = time.perf_counter() - t0

    t0 = time.perf_counter()
    full: Plan | None = None
    full_error = ""
    try:
        full = planner(costs, survivors, plan.batch_size, plan.optimizer_state_factor)
        pred = evaluate(full, costs, survivors)
        if not pred.fits:
            raise PlanError(f"the full re-plan does not fit: short by "
                            f"{pred.memory_shortfall()} bytes")
        full = replace(full, predicted=pred)
    except PlanError as exc:
        full, full_error = None, str(exc)
    full_time = time.perf_counter() - t0

    lw_round = None if layerwise is None or layerwise.predicted is None \
        else layerwise.predicted.round_time_s
    full_round = None if full is None or full.predicted is None \
        else full.predicted.round_time_s
    if layerwise is None and full is None:
        raise PlanError(f"the survivors {list(survivors.names)} cannot hold the model after "
                        f"losing {list(lost)}: layer-wise: {lw_error}; full re-plan: "
                        f"{full_error}")
    if full is None or full_round is None:
        chosen, reason = "layerwise", f"the full re-plan failed: {full_error}"
    elif layerwise is None or lw_round is None:
        chosen, reason = "full", f"no layer-wise re-plan fits: {lw_error}"
    elif lw_round <= (1.0 + tolerance) * full_round:
        chosen = "layerwise"
        reason = (f"layer-wise round {lw_round:.4g} s is within {tolerance:.0%} of the full "
                  f"re-plan's {full_round:.4g} s (ratio {lw_round / full_round:.3f})")
    else:
        chosen = "full"
        reason = (f"layer-wise round {lw_round:.4g} s is {lw_round / full_round:.3f}x the "
                  f"full re-plan's {full_round:.4g} s (more than {1 + tolerance:.2f}x)")

    if chosen == "layerwise" and layerwise is not None:
        new_plan = layerwise
    elif full is not None:
        new_plan = replace(full, plan_version=plan.plan_version + 1,
                           model_hash=plan.model_hash, cluster_hash=survivors.cluster_hash)
        if plan.replicas:
            new_plan = with_replicas(new_plan, costs, survivors)
    else:  # pragma: no cover - excluded by the checks above
        raise PlanError(f"no re-plan after losing {list(lost)}")
    info = ReplanInfo(failed=lost, chosen=chosen, reason=reason, layerwise_round_s=lw_round,
                      full_round_s=full_round, layerwise_search_s=lw_time,
                      full_search_s=full_time, tolerance=tolerance, layerwise_error=lw_error,
                      full_error=full_error)
    logger.info("re-plan after losing %s: %s (%s)", list(lost), chosen, reason)
    return new_plan, info
