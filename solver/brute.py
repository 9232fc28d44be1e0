"""Exhaustive enumeration of the DP's plan spaces for tiny instances (the DP's test oracle).

Two spaces ([Note: group spaces] in ``solver.space``): consecutive slices of the
capability order (the default, ``space="order"``), or any disjoint groups, each listed in
capability order (``wide=True``: the ``space="classes"`` DP and ``planner="ilp-wide"``).
Every device is tried individually, so symmetry between devices is not assumed here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from contracts.cluster import Cluster
from contracts.errors import PlanError
from contracts.plan import Plan, PlannerInfo, Stage
from contracts.table import CostTable
from solver.evaluate import LayerSums, evaluate, in_flight
from solver.space import micro_batch_choices, sorted_devices
from solver.split import split_stage
from solver.timing import Timing

__all__ = ["BruteResult", "enumerate_plans", "brute_force", "MAX_BRUTE_LAYERS",
           "MAX_BRUTE_DEVICES"]

MAX_BRUTE_LAYERS = 8
MAX_BRUTE_DEVICES = 5


@dataclass
class BruteResult:
    """The best plan, its round time, and how many feasible plans were scored."""

    plan: Plan | None
    round_time_s: float
    plans_scored: int


def _compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Positive integer tuples of length ``parts`` summing to at most ``total``."""
    for used in range(parts, total + 1):
        for cuts in itertools.combinations(range(1, used), parts - 1):
            bounds = (0, *cuts, used)
            yield tuple(bounds[k + 1] - bounds[k] for k in range(parts))


def _groupings(num_devices: int, parts: int, wide: bool) -> Iterator[list[list[int]]]:
    """Device index groups (capability order) for ``parts`` stages: consecutive slices
    from the front, or (``wide``) any disjoint nonempty groups, unused devices allowed."""
    if not wide:
        for sizes in _compositions(num_devices, parts):
            bounds = list(itertools.accumulate(sizes, initial=0))
            yield [list(range(bounds[k], bounds[k + 1])) for k in range(parts)]
        return
    for owner in itertools.product(range(-1, parts), repeat=num_devices):
        groups: list[list[int]] = [[] for _ in range(parts)]
        for d, s in enumerate(owner):
            if s >= 0:
                groups[s].append(d)
        if all(groups):
            yield groups


def enumerate_plans(costs: CostTable, cluster: Cluster, batch_size: int, *,
                    optimizer_state_factor: float = 0.0,
                    micro_batch_sizes: Sequence[int] | None = None,
                    wide: bool = False) -> Iterator[Plan]:
    """Every plan of the DP's space (see ``solver.dp``; ``wide``: of the classes space)
    whose Algorithm-1 shares exist."""
    cluster = cluster.for_costs(costs)
    n_layers = costs.num_layers
    if n_layers > MAX_BRUTE_LAYERS or len(cluster.devices) > MAX_BRUTE_DEVICES:
        raise PlanError(f"brute force is for tiny instances (<= {MAX_BRUTE_LAYERS} layers, "
                        f"<= {MAX_BRUTE_DEVICES} devices), got {n_layers} layers and "
                        f"{len(cluster.devices)} devices; use the DP")
    devices = sorted_devices(cluster, costs)
    speed_of = Timing.of(costs, cluster).speeds  # capability: Algorithm 1's split
    sums = LayerSums.of(costs)
    for mb in micro_batch_choices(batch_size, micro_batch_sizes):
        m = batch_size // mb
        for s_count in range(1, min(len(devices), n_layers) + 1):
            for cuts in itertools.combinations(range(n_layers - 1), s_count - 1):
                bounds = (-1, *cuts, n_layers - 1)
                layer_ranges = [(bounds[k] + 1, bounds[k + 1]) for k in range(s_count)]
                for groups in _groupings(len(devices), s_count, wide):
                    stages = []
                    for s, ((first, last), members) in enumerate(zip(layer_ranges, groups,
                                                                     strict=True)):
                        group = [devices[d] for d in members]
                        shares = split_stage(sums, first, last,
                                             [speed_of[d.name] for d in group],
                                             [cluster.usable_bytes(d.name) for d in group], mb,
                                             in_flight(m, s_count, s), optimizer_state_factor,
                                             num_micro_batches=m)
                        if shares is None:
                            break
                        stages.append(Stage((first, last), tuple(d.name for d in group),
                                            shares))
                    else:
                        yield Plan(model_hash=costs.model_hash,
                                   cluster_hash=cluster.cluster_hash, batch_size=batch_size,
                                   micro_batch_size=mb, num_micro_batches=m,
                                   stages=tuple(stages), num_layers=n_layers,
                                   model_name=costs.model_name,
                                   optimizer_state_factor=optimizer_state_factor,
                                   planner=PlannerInfo("brute"))


def brute_force(costs: CostTable, cluster: Cluster, batch_size: int, *,
                optimizer_state_factor: float = 0.0,
                micro_batch_sizes: Sequence[int] | None = None,
                wide: bool = False) -> BruteResult:
    """Score every plan of the DP's space (``wide``: of the classes space) with
    ``evaluate`` and return the best one that fits."""
    cluster = cluster.for_costs(costs)
    best: tuple[float, Plan | None] = (math.inf, None)
    scored = 0
    for plan in enumerate_plans(costs, cluster, batch_size,
                                optimizer_state_factor=optimizer_state_factor,
                                micro_batch_sizes=micro_batch_sizes, wide=wide):
        pred = evaluate(plan, costs, cluster)
        if not pred.fits:
            continue
        scored += 1
        if pred.round_time_s < best[0]:
            best = (pred.round_time_s, plan.with_prediction(pred))
    return BruteResult(plan=best[1], round_time_s=best[0], plans_scored=scored)
