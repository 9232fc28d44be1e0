"""Anytime planning: the exact search in phases, with the best plan so far and its proven gap.

[Note: anytime planning]
``search`` runs the Asteroid DP (``solver.dp``) in phases, each exact over its space and
each starting from the best round time so far (the incumbent, which only prunes):

1. the paper's space: slices of the capability order (fast: one order);
2. the baselines' plans (``solver.baselines``), a safety net: a baseline plan outside the
   DP's spaces (equal shares, another order of a group) is kept when it is better;
3. the wide space: every group in every order, as counts of interchangeable devices
   (``space="classes"``, [Note: device classes] in ``solver.space``). When it finishes
   the plan is optimal over every plan of the wide space on the candidate cuts (the
   space of ``planner="ilp-wide"``); where the wide space holds nothing better than the
   incumbent, that proves the incumbent optimal.

With a time limit (a wall-clock deadline) every phase stops where it is, and the result
is the best plan found so far with a *proven* lower bound on the wide space's optimum:
per micro-batch size, the bound its finished wide search proved (``DPResult.bounds``),
or else the work bound ``M * work / (sum of bound speeds)``: some stage has ``X`` at
least the average ``work / V`` and every round is at least ``M X`` of its dominant stage
(``[Note: incumbent pruning]`` in ``solver.dp``). The gap ``(round - bound) / bound`` goes
into ``plan.planner.bound``; the work bound ignores communication, so a search cut
short on a network-bound instance reports a large but honest gap. Without a limit every
phase runs to its end and the plan is optimal over the wide space (gap 0).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from asteroid_fx.errors import AsteroidError, PlanError
from cost_models.table import CostTable
from solver.cluster import Cluster
from solver.diagnose import no_fit_error
from solver.dp import DPResult, asteroid_dp
from solver.evaluate import LayerSums, evaluate
from solver.plan import Plan, PlannerInfo, SearchBound
from solver.space import DEFAULT_MAX_CUTS, candidate_cuts, micro_batch_choices
from solver.timing import Timing

__all__ = ["Progress", "SearchReport", "search", "plan_or_raise", "work_bound",
           "check_time_limit"]

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


def check_time_limit(time_limit: float | None) -> None:
    """``PlanError`` unless ``time_limit`` is None or a finite number of seconds > 0."""
    if time_limit is None:
        return
    ok = (isinstance(time_limit, (int, float)) and not isinstance(time_limit, bool)
          and math.isfinite(time_limit) and time_limit > 0)
    if not ok:
        raise PlanError(f"time limit must be a number of seconds > 0, got {time_limit!r}; "
                        f"leave it out for an exact search")


def work_bound(costs: CostTable, cluster: Cluster, batch_size: int, micro_batch: int) -> float:
    """``M * work_i / V``: a lower bound on the round time of every plan with this
    micro-batch size (``work_i``: every layer's forward and backward for one micro-batch,
    intercepts included; ``V``: the sum of the bound speeds, solver.timing)."""
    sums = LayerSums.of(costs)
    work = ((sums.fwd_slope[-1] + sums.bwd_slope[-1]) * micro_batch
            + sums.fwd_intercept[-1] + sums.bwd_intercept[-1])
    speed = sum(Timing.of(costs, cluster).bound_speeds.values())
    return (batch_size // micro_batch) * work / speed


def _baseline_plans(costs: CostTable, cluster: Cluster, batch_size: int, osf: float,
                    micro_batch_sizes: Sequence[int] | None,
                    deadline: float | None) -> list[tuple[str, Plan, float]]:
    """The baselines' plans that fit, with their round times (``[Note: baseline seeds]``
    of before, now a safety net), as far as the deadline allows."""
    try:
        from solver.baselines import BASELINES
    except Exception as exc:  # a broken or missing module must not break planning
        log.warning("baseline planners unavailable: %s", exc)
        return []
    out = []
    for name, fn in BASELINES.items():
        if deadline is not None and time.perf_counter() > deadline:
            break
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
        time_limit: wall-clock seconds (> 0); None searches to the end (exact).
        baselines: keep a baseline's plan when it beats the DP's (the safety net).
        progress: called with the fraction done and a short description.

    Returns:
        The report; ``plan`` is None only when nothing fits (or the deadline passed before
        any plan was found).

    Raises:
        PlanError: a time limit that is not a number > 0, or bad micro-batch sizes.
    """
    check_time_limit(time_limit)
    cluster = cluster.for_costs(costs)
    started = time.perf_counter()
    deadline = None if time_limit is None else started + time_limit
    mbs = micro_batch_choices(batch_size, micro_batch_sizes)
    best: Plan | None = None
    best_value = math.inf
    phases: list[str] = []

    def report(share: float, offset: float, what: str) -> Callable[[int, int, str], None]:
        def step(done: int, total: int, where: str) -> None:
            if progress is not None:
                progress(offset + share * done / max(total, 1),
                         f"{what}, {where}, best {best_value:.4g} s")
        return step

    def take(result: DPResult) -> None:
        nonlocal best, best_value
        if result.plan is not None and result.round_time_s < best_value:
            best, best_value = result.plan, result.round_time_s

    # 1: the paper's space (slices of the capability order)
    take(asteroid_dp(costs, cluster, batch_size, optimizer_state_factor=optimizer_state_factor,
                     micro_batch_sizes=micro_batch_sizes, max_cuts=max_cuts,
                     deadline=deadline, progress=report(_ORDER_SHARE, 0.0, "one order")))
    phases.append("order")
    # 2: the safety net
    seeded = ""
    if baselines:
        for name, seed, value in _baseline_plans(costs, cluster, batch_size,
                                                 optimizer_state_factor, micro_batch_sizes,
                                                 deadline):
            if value < best_value:
                best, best_value, seeded = seed, value, name
        phases.append("baselines")
    # 3: the wide space
    wide: DPResult | None = None
    if deadline is None or time.perf_counter() < deadline:
        wide = asteroid_dp(costs, cluster, batch_size,
                           optimizer_state_factor=optimizer_state_factor,
                           micro_batch_sizes=micro_batch_sizes, max_cuts=max_cuts,
                           space="classes", incumbent=best_value, deadline=deadline,
                           progress=report(1.0 - _ORDER_SHARE, _ORDER_SHARE, "every order"))
        if wide.plan is not None and wide.round_time_s < best_value:
            seeded = ""
        take(wide)
        phases.append("classes")
    if progress is not None:
        progress(1.0, f"done, best {best_value:.4g} s")
    complete = wide is not None and wide.complete
    if best is None:
        return SearchReport(None, math.inf, None, tuple(phases), complete)
    # what is proven about the wide space: per micro-batch size its finished search's
    # bound, else the work bound
    proven = wide.bounds if wide is not None else {}
    bound = min(min(proven.get(mb, work_bound(costs, cluster, batch_size, mb)), best_value)
                for mb in mbs)
    cuts = len(candidate_cuts(costs, max_cuts))
    info = SearchBound(space="classes", bound_s=bound,
                       gap=0.0 if complete else max(0.0, (best_value - bound) / bound),
                       cuts=cuts, layers=costs.num_layers,
                       stopped="" if complete else "time limit")
    check = {"seeded_from": seeded} if seeded else {}
    plan = replace(best, planner=PlannerInfo("asteroid", PLANNER_VERSION,
                                             time.perf_counter() - started, check, info))
    return SearchReport(plan, best_value, info, tuple(phases), complete)


def plan_or_raise(costs: CostTable, cluster: Cluster, batch_size: int, *,
                  optimizer_state_factor: float = 0.0,
                  micro_batch_sizes: Sequence[int] | None = None,
                  max_cuts: int | None = DEFAULT_MAX_CUTS,
                  time_limit: float | None = None,
                  progress: Progress | None = None) -> Plan:
    """``search``'s plan, or the ``PlanError`` of why there is none."""
    report = search(costs, cluster, batch_size, optimizer_state_factor=optimizer_state_factor,
                    micro_batch_sizes=micro_batch_sizes, max_cuts=max_cuts,
                    time_limit=time_limit, progress=progress)
    if report.plan is not None:
        return report.plan
    if not report.complete:
        raise PlanError(f"no plan found within the time limit of {time_limit:g} s (the "
                        f"search had not finished); raise the time limit or leave it out")
    raise no_fit_error(costs, cluster, batch_size, optimizer_state_factor, "asteroid")
