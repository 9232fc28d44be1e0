"""``afx.plan``: run a named planner, score its plan with the model, refuse plans that do not fit.

Example::

    from solver.api import plan
    p = plan(costs, cluster, batch_size=32)                  # the Asteroid DP
    p = plan(costs, cluster, batch_size=32, check_ilp=True)  # + MILP cross-check
    p = plan(costs, cluster, batch_size=32, time_limit=5.0)  # anytime: best in 5 s
    p.predicted.round_time_s, p.planner.bound.gap, p.planner.check["gap"]
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from contracts.arguments import check_cluster, check_costs, is_int, is_number
from contracts.cluster import Cluster
from contracts.errors import PlanError
from contracts.plan import Plan, PlannerInfo, SearchBound
from contracts.table import CostTable
from solver.alternatives import check_objective, describe, simulated_alternative
from solver.anytime import Progress, check_time_limit, search_or_raise
from solver.diagnose import no_fit_error
from solver.dp import DP_VERSION, asteroid_dp
from solver.evaluate import evaluate
from solver.ilp import ilp_plan, milp_size
from solver.simulate import simulate
from solver.space import DEFAULT_MAX_CUTS, candidate_cuts
from solver.split import check_micro_batch
from solver.tied_plan import keep_ties_together, one_stage_plan

__all__ = ["PLANNERS", "Planner", "plan", "planner_names", "DEFAULT_ILP_TIME_LIMIT_S",
           "ILP_CHECK_MAX_VARIABLES", "LIMITED_PLANNERS", "check_planner_limit"]

log = logging.getLogger(__name__)

Planner = Callable[..., Plan]
"""``(costs, cluster, batch_size, *, optimizer_state_factor) -> Plan`` (unevaluated is fine)."""

DEFAULT_ILP_TIME_LIMIT_S = 60.0


def asteroid(costs: CostTable, cluster: Cluster, batch_size: int, *,
             optimizer_state_factor: float = 0.0,
             micro_batch_sizes: Sequence[int] | None = None,
             max_cuts: int | None = DEFAULT_MAX_CUTS, time_limit: float | None = None,
             progress: Progress | None = None, objective: str = "model") -> Plan:
    """The Asteroid planner (Algorithm 2 over Algorithm 1, every device order searched);
    PlanError when nothing fits.

    The search runs in the phases of [Note: anytime planning] (``solver.anytime``): the
    paper's space (slices of the capability order), the baselines' plans as a safety net,
    then every group in every order (counts of interchangeable devices). Without
    ``time_limit`` the plan is optimal over that wide space (the space of ``ilp-wide``, on
    the candidate cuts); with one, it is the best found by then, and
    ``plan.planner.bound`` holds the proven lower bound and gap. A baseline plan that
    wins is recorded as ``planner.check["seeded_from"]``.

    The plans the search passed over are simulated against its best ([Note: simulated
    alternatives] in ``solver.alternatives``): one that simulates at least 5 % faster is
    recorded as ``planner.check["simulated_alternative"]``, and with ``objective=
    "simulated"`` returned instead.
    """
    tied = bool(costs.tied)
    # a tied model also searches one stage ([Note: planning tied weights]): a share of
    # the limit is kept for it
    main_limit = (time_limit if time_limit is None or not tied
                  else time_limit * (1 - _ONE_STAGE_SHARE))
    report = search_or_raise(costs, cluster, batch_size,
                             optimizer_state_factor=optimizer_state_factor,
                             micro_batch_sizes=micro_batch_sizes, max_cuts=max_cuts,
                             time_limit=main_limit, progress=progress)
    best = report.plan
    if best is None:    # (search_or_raise raises first)
        raise PlanError("the search returned no plan")
    best = _with_alternative(best, report.alternatives, costs, cluster, objective)
    if not tied:
        return best
    one_limit = None if time_limit is None else time_limit * _ONE_STAGE_SHARE
    return keep_ties_together(best, costs, cluster, lambda: one_stage_plan(
        costs, cluster, batch_size, optimizer_state_factor=optimizer_state_factor,
        micro_batch_sizes=micro_batch_sizes, time_limit=one_limit))


_ONE_STAGE_SHARE = 0.2
"""The share of a time limit that the plan of one stage of a tied model gets."""


def _with_alternative(best: Plan, alternatives: Sequence[Plan], costs: CostTable,
                      cluster: Cluster, objective: str) -> Plan:
    """``best`` with the simulated alternative in its check, or (``objective ==
    "simulated"``) the alternative with the model's optimum in its check."""
    found = simulated_alternative(best, alternatives, costs, cluster)
    if found is None:
        return best
    alt, alt_s, best_s = found
    info = best.planner
    if objective != "simulated":
        check = {**info.check, "simulated_alternative": describe(alt, alt_s, costs, cluster)}
        return replace(best, planner=replace(info, check=check))
    check = {**info.check, "objective": "simulated",
             "model_optimum": describe(best, best_s, costs, cluster)}
    bound = info.bound
    if bound is not None:
        alt_round = evaluate(alt, costs, cluster).round_time_s
        bound = replace(bound, gap=max(0.0, (alt_round - bound.bound_s) / bound.bound_s))
    return replace(alt, planner=replace(info, check=check, bound=bound))


def asteroid_order(costs: CostTable, cluster: Cluster, batch_size: int, *,
                   optimizer_state_factor: float = 0.0,
                   micro_batch_sizes: Sequence[int] | None = None,
                   max_cuts: int | None = DEFAULT_MAX_CUTS) -> Plan:
    """The paper's Algorithm 2 as published: the exact DP over consecutive slices of the
    capability order only (``solver.dp``, ``space="order"``); PlanError when nothing fits.
    Faster than ``asteroid`` where the device order matters, and never better."""
    result = asteroid_dp(costs, cluster, batch_size,
                         optimizer_state_factor=optimizer_state_factor,
                         micro_batch_sizes=micro_batch_sizes, max_cuts=max_cuts)
    if result.plan is None:
        raise no_fit_error(costs, cluster, batch_size, optimizer_state_factor, "asteroid-order")
    bound = SearchBound(space="order", bound_s=result.round_time_s, gap=0.0,
                        cuts=result.candidate_cuts, layers=costs.num_layers,
                        order_optimal=True)
    return replace(result.plan, planner=PlannerInfo("asteroid-order", DP_VERSION,
                                                    result.search_time_s, {}, bound))


def _ilp(wide: bool) -> Planner:
    name = "ilp-wide" if wide else "ilp"

    def run(costs: CostTable, cluster: Cluster, batch_size: int, *,
            optimizer_state_factor: float = 0.0,
            micro_batch_sizes: Sequence[int] | None = None,
            time_limit_s: float = DEFAULT_ILP_TIME_LIMIT_S) -> Plan:
        result = ilp_plan(costs, cluster, batch_size, wide=wide,
                          optimizer_state_factor=optimizer_state_factor,
                          time_limit_s=time_limit_s, micro_batch_sizes=micro_batch_sizes)
        if result.plan is None:
            if result.status == "infeasible":
                raise no_fit_error(costs, cluster, batch_size, optimizer_state_factor, name)
            raise PlanError(f"planner {name!r} found no plan within {time_limit_s:g} s "
                            f"({result.status}); raise time_limit_s or use planner 'asteroid'")
        check = {"ilp_status": result.status, "ilp_solver": result.solver,
                 "ilp_round": result.round_time_s, "candidates": result.candidates}
        return replace(result.plan, planner=PlannerInfo(name, result.plan.planner.version,
                                                        result.solve_time_s, check))

    run.__name__ = name.replace("-", "_")
    run.__doc__ = f"The planning MILP ({name}); see solver.ilp."
    return run


_OWN: dict[str, Planner] = {
    "asteroid": asteroid,
    "asteroid-order": asteroid_order,
    "ilp": _ilp(wide=False),
    "ilp-wide": _ilp(wide=True),
}


class _Registry(Mapping[str, Planner]):
    """The planners by name: ours plus the baselines of ``solver.baselines`` (imported on
    first use; absent when that module cannot be imported)."""

    def __init__(self) -> None:
        self._loaded: dict[str, Planner] | None = None

    def _all(self) -> dict[str, Planner]:
        if self._loaded is None:
            table = dict(_OWN)
            try:
                from solver.baselines import BASELINES
            except Exception as exc:  # a broken or missing module must not break planning
                log.warning("baseline planners unavailable: %s", exc)
            else:
                for key, fn in BASELINES.items():
                    table.setdefault(key, fn)
            self._loaded = table
        return self._loaded

    def __getitem__(self, key: str) -> Planner:
        return self._all()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


PLANNERS: Mapping[str, Planner] = _Registry()


def planner_names() -> list[str]:
    """The names ``plan(..., planner=NAME)`` accepts."""
    return list(PLANNERS)


def _fixed_micro_batch(micro_batch_size: int, batch_size: int, planner: str) -> int:
    """``micro_batch_size`` checked against the batch and the planner (``PlanError``)."""
    m = check_micro_batch(micro_batch_size, batch_size)
    if planner not in _OWN:
        raise PlanError(f"a fixed micro-batch applies to the planners {sorted(_OWN)}; "
                        f"{planner!r} chooses its own (drop --micro-batch)")
    return m


def check_optimizer_state_factor(factor: object) -> None:
    """``PlanError`` unless ``factor`` is a finite number >= 0 (NaN failed in the memory
    model, -1 shrank the predicted peak memory)."""
    if not is_number(factor) or \
            not (math.isfinite(factor) and factor >= 0):
        raise PlanError(f"optimizer_state_factor must be a finite number >= 0 (0 SGD, 1 "
                        f"momentum, 2 Adam), got {factor!r}")


def _checked_sizes(sizes: object, batch_size: int) -> list[int]:
    """``micro_batch_sizes`` as a list of integers >= 1 (``PlanError`` for a bare number, a
    string or anything else; ``micro_batch_choices`` checks that they divide the batch)."""
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Iterable):
        raise PlanError(f"micro_batch_sizes must be a list of integers (divisors of the batch "
                        f"{batch_size}), got {sizes!r}; for one size use micro_batch_size=")
    listed = list(sizes)
    bad = [b for b in listed if not is_int(b)]
    if bad or not listed:
        raise PlanError(f"micro_batch_sizes must be a non-empty list of integers (divisors "
                        f"of the batch {batch_size}), got {sizes!r}")
    return listed


LIMITED_PLANNERS = ("asteroid", "ilp", "ilp-wide")
"""The planners that take a time limit (the others have no search to cut short)."""


def check_planner_limit(planner: str, time_limit: float | None) -> None:
    """``PlanError`` for a time limit given to a planner that does not take one."""
    if time_limit is not None and planner not in LIMITED_PLANNERS:
        raise PlanError(f"time limit (--time-limit) applies to the planners "
                        f"{', '.join(map(repr, LIMITED_PLANNERS))}, not {planner!r}, whose "
                        f"search has no limit to take; drop it")


def plan(costs: CostTable, cluster: Cluster, batch_size: int, *, planner: str = "asteroid",
         check_ilp: bool = False, optimizer_state_factor: float = 0.0,
         micro_batch_sizes: Sequence[int] | None = None,
         time_limit_s: float = DEFAULT_ILP_TIME_LIMIT_S,
         micro_batch_size: int | None = None,
         time_limit: float | None = None,
         progress: Progress | None = None, objective: str = "model") -> Plan:
    """Plan with the named planner and return the evaluated plan.

    Args:
        costs: the model's cost table.
        cluster: the devices and links.
        batch_size: samples per training round (mini-batch).
        planner: a name of ``PLANNERS`` (``asteroid``, ``ilp``, ``ilp-wide``, baselines).
        check_ilp: also solve the MILP and record in ``plan.planner.check``: ``ilp_round``,
            ``dp_round`` (the DP over the same space and cuts: they must agree),
            ``gap`` (relative, DP minus ILP), ``plan_round`` (the plan returned, which
            may search a wider space), ``ilp_cuts``, ``dp_time_s``, ``ilp_time_s``,
            ``ilp_status``. An instance whose MILP would be too large is checked on
            fewer candidate cuts, or refused before planning (``ILP_CHECK_MAX_VARIABLES``).
        optimizer_state_factor: optimizer state in units of the weights (0 SGD, 1
            momentum, 2 Adam).
        micro_batch_sizes: micro-batch sizes to try (asteroid / ilp planners only).
        time_limit_s: budget of the MILP solves (planners ``ilp``, ``ilp-wide`` and the
            check).
        time_limit: wall-clock seconds for the ``asteroid`` search (anytime: the best plan
            by then, with its proven gap in ``plan.planner.bound``; the ``ilp`` planners
            take it as their budget); None: search to the end (exact).
        progress: ``(fraction done, what)`` callback of the ``asteroid`` search.
        micro_batch_size: fix the micro-batch size (a divisor of ``batch_size``; asteroid /
            ilp planners only) instead of letting the planner choose it.
        objective: ``model`` (the closed form's optimum) or ``simulated`` (of the plans
            the ``asteroid`` search found, the one whose event simulation is fastest, where
            it beats the optimum's by 5 %: ``solver.alternatives``).

    Returns:
        The plan with ``predicted``, ``num_layers``, hashes and planner info filled in.

    Raises:
        PlanError: unknown planner, ``batch_size < 1``, a time limit that is not > 0,
            micro-batch sizes that do not divide the batch, a check the MILP cannot make,
            or a plan that does not fit in memory (with the shortfall).
    """
    cluster = check_cluster(cluster).for_costs(check_costs(costs))
    if not is_int(batch_size) or batch_size < 1:
        raise PlanError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    check_time_limit(time_limit)
    check_optimizer_state_factor(optimizer_state_factor)
    if progress is not None and not callable(progress):
        raise PlanError(f"progress must be a callable (fraction done, what) or None, got "
                        f"{progress!r}")
    if micro_batch_sizes is not None:
        micro_batch_sizes = _checked_sizes(micro_batch_sizes, batch_size)
    if planner in ("ilp", "ilp-wide") and time_limit is None:
        if time_limit_s is None:
            raise PlanError("time_limit_s (the MILP's budget) must be a number of seconds "
                            "> 0, got None")
        check_time_limit(time_limit_s)
    fn = PLANNERS.get(planner) if isinstance(planner, str) else None
    if fn is None:
        raise PlanError(f"unknown planner {planner!r}; choose one of "
                        f"{', '.join(sorted(PLANNERS))}")
    check_objective(objective, planner)
    check_planner_limit(planner, time_limit)
    if micro_batch_size is not None:
        micro_batch_sizes = [_fixed_micro_batch(micro_batch_size, batch_size, planner)]
    ilp_cuts = _check_cuts(costs, cluster, batch_size, micro_batch_sizes) if check_ilp else None
    kwargs: dict[str, Any] = {"optimizer_state_factor": optimizer_state_factor}
    if planner in _OWN and micro_batch_sizes is not None:
        kwargs["micro_batch_sizes"] = micro_batch_sizes
    if planner in ("ilp", "ilp-wide"):
        kwargs["time_limit_s"] = time_limit_s if time_limit is None else time_limit
    if planner == "asteroid":
        kwargs["time_limit"] = time_limit
        kwargs["progress"] = progress
        kwargs["objective"] = objective
    start = time.perf_counter()
    result = fn(costs, cluster, batch_size, **kwargs)
    elapsed = time.perf_counter() - start
    prediction = evaluate(result, costs, cluster)
    if not prediction.fits:
        shortfall = prediction.memory_shortfall()
        device, short = min(shortfall.items(), key=lambda kv: kv[1])
        raise PlanError(
            f"the {planner!r} plan does not fit in memory: device {device!r} is {short} bytes "
            f"({short / 2**20:.1f} MiB) short"
            + (f" (and {len(shortfall) - 1} more device(s))" if len(shortfall) > 1 else "")
            + "; use a smaller batch or micro-batch size, a lighter optimizer, more devices, "
              "or planner 'asteroid'")
    # what a run should measure: the schedule executed event by event with the same times
    # (contracts.plan.Prediction; docs/latency-model.md, cause 7)
    prediction = replace(prediction, simulated_round_time_s=simulate(
        result, costs, cluster).round_time_s)
    check: dict[str, Any] = dict(result.planner.check)
    if check_ilp:
        check.update(_ilp_check(costs, cluster, batch_size, prediction.round_time_s,
                                optimizer_state_factor, micro_batch_sizes, time_limit_s,
                                ilp_cuts))
    info = PlannerInfo(name=planner, version=result.planner.version, search_time_s=elapsed,
                       check=check, bound=result.planner.bound)
    return replace(result, predicted=prediction, planner=info, num_layers=costs.num_layers,
                   model_hash=costs.model_hash, cluster_hash=cluster.cluster_hash,
                   model_name=result.model_name or costs.model_name,
                   optimizer_state_factor=optimizer_state_factor)


ILP_CHECK_MAX_VARIABLES = 4_000
"""The largest MILP (``solver.ilp.milp_size``, all micro-batch sizes together) that
``check_ilp`` solves: PuLP and the solver stay well under 2 GB and finish in seconds on
a laptop (CBC: about 5 s at this size). Larger instances are checked on fewer candidate
cuts."""


def _check_cuts(costs: CostTable, cluster: Cluster, batch_size: int,
                micro_batch_sizes: Sequence[int] | None) -> int | None:
    """The ``max_cuts`` of the cross-check: None for all cuts, else the most candidate
    cuts whose MILP fits ``ILP_CHECK_MAX_VARIABLES`` (PlanError, before any planning,
    when not even one does)."""
    full = milp_size(costs, cluster, batch_size, micro_batch_sizes=micro_batch_sizes)
    if full <= ILP_CHECK_MAX_VARIABLES:
        return None
    lo, hi = 0, min(costs.num_layers - 1, DEFAULT_MAX_CUTS)
    size = {k: milp_size(costs, cluster, batch_size, micro_batch_sizes=micro_batch_sizes,
                         ends=candidate_cuts(costs, k) if k else [])
            for k in (lo, hi)}
    if size[lo] > ILP_CHECK_MAX_VARIABLES:
        raise PlanError(
            f"--check-ilp: the MILP would have about {size[lo]} variables even for "
            f"single-stage plans on {len(cluster.devices)} devices (limit "
            f"{ILP_CHECK_MAX_VARIABLES}); the cluster is too large for the cross-check, plan "
            f"without it")
    while lo < hi:  # the most cuts whose MILP fits the budget
        mid = (lo + hi + 1) // 2
        if milp_size(costs, cluster, batch_size, micro_batch_sizes=micro_batch_sizes,
                     ends=candidate_cuts(costs, mid)) <= ILP_CHECK_MAX_VARIABLES:
            lo = mid
        else:
            hi = mid - 1
    log.warning("--check-ilp: the full MILP would have about %d variables (limit %d); "
                "checking the DP against it on %d candidate cuts instead of %d",
                full, ILP_CHECK_MAX_VARIABLES, lo, costs.num_layers - 1)
    return lo


def _ilp_check(costs: CostTable, cluster: Cluster, batch_size: int, plan_round: float,
               optimizer_state_factor: float, micro_batch_sizes: Sequence[int] | None,
               time_limit_s: float, max_cuts: int | None) -> dict[str, Any]:
    """The DP over the paper's space against the MILP over the same space and cuts."""
    ends = None if max_cuts is None else candidate_cuts(costs, max_cuts)
    started = time.perf_counter()
    dp = asteroid_dp(costs, cluster, batch_size, optimizer_state_factor=optimizer_state_factor,
                     micro_batch_sizes=micro_batch_sizes,
                     max_cuts=None if max_cuts is None else max(max_cuts, 0))
    dp_time = time.perf_counter() - started
    result = ilp_plan(costs, cluster, batch_size, optimizer_state_factor=optimizer_state_factor,
                      time_limit_s=time_limit_s, micro_batch_sizes=micro_batch_sizes,
                      ends=ends)
    ilp_round = (evaluate(result.plan, costs, cluster).round_time_s
                 if result.plan is not None else math.inf)
    dp_round = dp.round_time_s
    gap = (dp_round - ilp_round) / ilp_round if math.isfinite(ilp_round) else None
    if gap is not None and abs(gap) > 1e-6 and result.status == "optimal":
        log.warning("the DP (%.6g s) and the MILP (%.6g s) disagree by %.3g%% on the same "
                    "space", dp_round, ilp_round, 100 * gap)
    return {"dp_round": dp_round if math.isfinite(dp_round) else None,
            "ilp_round": ilp_round if math.isfinite(ilp_round) else None,
            "gap": gap, "plan_round": plan_round,
            "ilp_cuts": len(ends) if ends is not None else costs.num_layers - 1,
            "dp_time_s": dp_time, "ilp_time_s": result.solve_time_s,
            "ilp_status": result.status, "ilp_solver": result.solver}
