"""Weights tied across stages: the best one-stage plan against a plan that splits a tie.

[Note: planning tied weights]
A plan that puts the layers of a tied weight (``CostTable.tied``: GPT-2's embedding is
its head) in several stages pays an all-reduce of the weight over every device of those
stages each round, and a copy on each holder (solver.evaluate, [Note: tied weights]).
The searches do not see those terms: their stage costs are local to a stage and a group,
and the tie's cost depends on the groups of stages far apart. A tie between the first
and the last layer (every tied language model) can be kept inside one stage only by a
plan of one stage, so :func:`keep_ties_together` compares the search's plan, scored with
the tie, against the best plan of one stage (the same search on no cut, exact over
every group of devices), and keeps the faster one that fits.

Both searches' plans are scored by ``solver.evaluate``; the search's proven lower bound
stays a lower bound (the tie only adds time and memory to a plan), so the reported gap
is recomputed against the kept plan's round with the tie. Ties inside the model (not
reaching from the first to the last layer) are compared the same way, against one stage
only: a plan of several stages that keeps them whole is not searched for.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from contracts.cluster import Cluster
from contracts.errors import PlanError
from contracts.plan import Plan
from contracts.table import CostTable
from solver.dp import SpaceName, asteroid_dp
from solver.evaluate import evaluate, split_ties
from solver.space import device_classes

__all__ = ["keep_ties_together", "one_stage_plan", "ONE_STAGE_GROUPS_MAX", "TIED_STOP"]

TIED_STOP = "tied weights"
"""``SearchBound.stopped`` of a tied model's plan whose gap the ties opened: the search
finished, but its bound leaves out the ties' all-reduce and copies."""

ONE_STAGE_GROUPS_MAX = 4096
"""The most groups (``prod (n_k + 1) - 1`` over the classes of interchangeable devices)
for which the plan of one stage is searched over every group; above it, over the slices
of the capability order."""

log = logging.getLogger(__name__)


def one_stage_plan(costs: CostTable, cluster: Cluster, batch_size: int, *,
                   optimizer_state_factor: float = 0.0,
                   micro_batch_sizes: Sequence[int] | None = None,
                   time_limit: float | None = None) -> Plan:
    """The best plan of one stage (every layer on one group, no cut): over every group of
    devices where there are at most ``ONE_STAGE_GROUPS_MAX``, else over the capability
    order's slices; the best found by ``time_limit`` seconds if one is given.

    Raises:
        PlanError: no plan of one stage fits in memory.
    """
    groups = math.prod(len(members) + 1 for members in device_classes(cluster, costs)) - 1
    space: SpaceName = "classes" if groups <= ONE_STAGE_GROUPS_MAX else "order"
    deadline = None if time_limit is None else time.perf_counter() + time_limit
    result = asteroid_dp(costs, cluster, batch_size, optimizer_state_factor=optimizer_state_factor,
                         micro_batch_sizes=micro_batch_sizes, max_cuts=0, space=space,
                         deadline=deadline)
    if result.plan is None:
        raise PlanError("no plan of one stage fits in memory")
    return result.plan


def keep_ties_together(plan: Plan, costs: CostTable, cluster: Cluster,
                       one_stage: Callable[[], Plan]) -> Plan:
    """``plan``, or the plan of ``one_stage()`` (the best plan of one stage) where that
    fits and is faster once ``plan`` pays for the tied weights it splits; the choice is in
    ``planner.check["tied"]``. ``plan`` as it is where it splits no tie.

    Raises:
        PlanError: ``plan`` does not fit with its copies of the tied weights, and no plan
            of one stage fits.
    """
    split = split_ties(plan, costs)
    if not split:
        return plan
    mine = evaluate(plan, costs, cluster)
    names = [tie.name for tie, _ in split]
    try:
        alone = one_stage()
    except PlanError as exc:
        log.info("no plan of one stage fits (%s); the plan splits the tied %s", exc, names)
        alone = None
    theirs = None if alone is None else evaluate(alone, costs, cluster)
    keep_alone = (alone is not None and theirs is not None and theirs.fits
                  and (not mine.fits or theirs.round_time_s < mine.round_time_s))
    if not mine.fits and not keep_alone:
        device, short = min(mine.memory_shortfall().items(), key=lambda kv: kv[1])
        raise PlanError(f"the plan splits the tied weights {names} over stages and a copy "
                        f"does not fit: device {device!r} is {short / 2**20:.1f} MiB short, "
                        f"and no plan of one stage fits; use a smaller batch or "
                        f"micro-batch size, a lighter optimizer or more memory")
    chosen = alone if keep_alone and alone is not None else plan
    round_s = (theirs if keep_alone and theirs is not None else mine).round_time_s
    check = dict(chosen.planner.check)
    check["tied"] = {"weights": names, "split_round_s": mine.round_time_s,
                     "split_fits": mine.fits,
                     "one_stage_round_s": None if theirs is None else theirs.round_time_s,
                     "kept": "one stage" if keep_alone else "split"}
    log.info("tied weights %s: split plan %.4f s%s, one stage %s: kept the %s", names,
             mine.round_time_s, "" if mine.fits else " (does not fit)",
             "none fits" if theirs is None else f"{theirs.round_time_s:.4f} s",
             check["tied"]["kept"])
    bound = plan.planner.bound
    if bound is not None and bound.bound_s > 0:
        gap = max(0.0, (round_s - bound.bound_s) / bound.bound_s)
        if gap > bound.gap:   # no longer proven over the capability order either
            bound = replace(bound, gap=gap, order_optimal=False,
                            stopped=bound.stopped or TIED_STOP)
    return replace(chosen, planner=replace(chosen.planner, check=check, bound=bound))
