"""``afx.plan``: run a named planner, score its plan with the model, refuse plans that do not fit.

Example::

    from solver.api import plan
    p = plan(costs, cluster, batch_size=32)                  # the Asteroid DP
    p = plan(costs, cluster, batch_size=32, check_ilp=True)  # + MILP cross-check
    p.predicted.round_time_s, p.planner.check["gap"]
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from asteroid_fx.errors import AsteroidError, PlanError
from cost_models.table import CostTable
from solver.cluster import Cluster
from solver.dp import DEFAULT_MAX_CUTS, DP_VERSION, asteroid_dp, no_fit_error, sorted_devices
from solver.evaluate import evaluate
from solver.ilp import ilp_plan
from solver.plan import Plan, PlannerInfo

__all__ = ["PLANNERS", "Planner", "plan", "planner_names", "DEFAULT_ILP_TIME_LIMIT_S"]

log = logging.getLogger(__name__)

Planner = Callable[..., Plan]
"""``(costs, cluster, batch_size, *, optimizer_state_factor) -> Plan`` (unevaluated is fine)."""

DEFAULT_ILP_TIME_LIMIT_S = 60.0


def asteroid(costs: CostTable, cluster: Cluster, batch_size: int, *,
             optimizer_state_factor: float = 0.0,
             micro_batch_sizes: Sequence[int] | None = None,
             max_cuts: int | None = DEFAULT_MAX_CUTS, seed_baselines: bool = True) -> Plan:
    """The Asteroid planner (Algorithm 2 over Algorithm 1); PlanError when nothing fits.

    [Note: baseline seeds]
    The DP searches stages on consecutive slices of the devices sorted by capability. A
    baseline may order devices differently (the cluster file's order, a memory-rich
    device first), which that space does not contain. With ``seed_baselines`` every
    baseline's plan seeds the search: the DP runs again over the baseline's device order
    (its stages' devices, then the unused ones by capability) with the best round time so
    far as incumbent, and the baseline plan itself is kept if it is still better. So
    the Asteroid plan is never worse than a baseline's; ``planner.check`` records
    ``device_order_from`` / ``seeded_from`` when a seed won.
    """
    cluster = cluster.for_costs(costs)
    front = None if len(cluster.devices) <= EXACT_MAX_DEVICES else LARGE_MAX_FRONT
    result = asteroid_dp(costs, cluster, batch_size, optimizer_state_factor=optimizer_state_factor,
                         micro_batch_sizes=micro_batch_sizes, max_cuts=max_cuts,
                         max_front=front)
    best_plan, best_value = result.plan, result.round_time_s
    check: dict[str, Any] = {} if front is None else {"max_front": front}
    if seed_baselines:
        ranked = [d.name for d in sorted_devices(cluster, costs)]
        tried = {tuple(ranked)}
        for name, fn in _baselines().items():
            try:
                seed = fn(costs, cluster, batch_size,
                          optimizer_state_factor=optimizer_state_factor)
                pred = evaluate(seed, costs, cluster)
            except AsteroidError as exc:
                log.debug("baseline %s gives no seed: %s", name, exc)
                continue
            if not pred.fits or (micro_batch_sizes is not None
                                 and seed.micro_batch_size not in micro_batch_sizes):
                continue
            order = tuple(seed.devices) + tuple(d for d in ranked if d not in seed.devices)
            if order not in tried:
                tried.add(order)
                again = asteroid_dp(costs, cluster, batch_size,
                                    optimizer_state_factor=optimizer_state_factor,
                                    micro_batch_sizes=micro_batch_sizes,
                                    max_cuts=_seed_cuts(max_cuts), max_front=SEED_MAX_FRONT,
                                    device_order=order, incumbent=best_value)
                if again.plan is not None:
                    best_plan, best_value = again.plan, again.round_time_s
                    check = {"device_order_from": name}
            if pred.round_time_s < best_value:
                best_plan = replace(seed, planner=PlannerInfo("asteroid", DP_VERSION))
                best_value = pred.round_time_s
                check = {"seeded_from": name}
    if best_plan is None:
        raise no_fit_error(costs, cluster, batch_size, optimizer_state_factor, "asteroid")
    return replace(best_plan, planner=replace(best_plan.planner, check=check))


EXACT_MAX_DEVICES = 8
LARGE_MAX_FRONT = 16
"""Above ``EXACT_MAX_DEVICES`` devices the DP keeps at most ``LARGE_MAX_FRONT`` summaries
per cell (lowest round time first): exactness is traded for bounded time; the plan's
``planner.check`` then records ``max_front``. (Since the issue-4 bounds the exact DP is
about as fast: 100 synthetic layers x 16 Jetson-mix devices, batch 32, 11.2 s exact vs
10.1 s capped on the 2-core development host, with a 2.6% better round time; the cap is
kept so that plans above 8 devices do not change.)"""

SEED_MAX_CUTS = 32
SEED_MAX_FRONT = 8
"""Re-runs of the DP over a baseline's device order search a coarser space (fewer cut
candidates, capped Pareto fronts): they are an insurance against the device-ordering
assumption, and the full-resolution search has already run on the capability order."""


def _seed_cuts(max_cuts: int | None) -> int:
    return SEED_MAX_CUTS if max_cuts is None else min(max_cuts, SEED_MAX_CUTS)


def _baselines() -> dict[str, Planner]:
    return {k: v for k, v in PLANNERS.items() if k not in _OWN}


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
    m = micro_batch_size
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise PlanError(f"the micro-batch size must be an integer >= 1, got {m!r}")
    if m > batch_size:
        raise PlanError(f"micro-batch {m} is larger than the batch {batch_size}; use at most "
                        f"{batch_size} (one micro-batch per round)")
    if batch_size % m:
        divisors = [d for d in range(1, batch_size + 1) if batch_size % d == 0]
        raise PlanError(f"micro-batch {m} does not divide the batch {batch_size}; use one of "
                        f"{divisors}")
    if planner not in _OWN:
        raise PlanError(f"a fixed micro-batch applies to the planners {sorted(_OWN)}; "
                        f"{planner!r} chooses its own (drop --micro-batch)")
    return m


def plan(costs: CostTable, cluster: Cluster, batch_size: int, *, planner: str = "asteroid",
         check_ilp: bool = False, optimizer_state_factor: float = 0.0,
         micro_batch_sizes: Sequence[int] | None = None,
         time_limit_s: float = DEFAULT_ILP_TIME_LIMIT_S,
         micro_batch_size: int | None = None) -> Plan:
    """Plan with the named planner and return the evaluated plan.

    Args:
        costs: the model's cost table.
        cluster: the devices and links.
        batch_size: samples per training round (mini-batch).
        planner: a name of ``PLANNERS`` (``asteroid``, ``ilp``, ``ilp-wide``, baselines).
        check_ilp: also solve the MILP and record ``dp_round``, ``ilp_round``, ``gap``
            (relative, DP minus ILP), ``dp_time_s``, ``ilp_time_s``, ``ilp_status`` in
            ``plan.planner.check``.
        optimizer_state_factor: optimizer state in units of the weights (0 SGD, 1
            momentum, 2 Adam).
        micro_batch_sizes: micro-batch sizes to try (asteroid / ilp planners only).
        time_limit_s: budget of the MILP solves.
        micro_batch_size: fix the micro-batch size (a divisor of ``batch_size``; asteroid /
            ilp planners only) instead of letting the planner choose it.

    Returns:
        The plan with ``predicted``, ``num_layers``, hashes and planner info filled in.

    Raises:
        PlanError: unknown planner, ``batch_size < 1``, micro-batch sizes that do not
            divide the batch, or a plan that does not fit in memory (with the shortfall).
    """
    cluster = cluster.for_costs(costs)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PlanError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    fn = PLANNERS.get(planner)
    if fn is None:
        raise PlanError(f"unknown planner {planner!r}; choose one of "
                        f"{', '.join(sorted(PLANNERS))}")
    if micro_batch_size is not None:
        micro_batch_sizes = [_fixed_micro_batch(micro_batch_size, batch_size, planner)]
    kwargs: dict[str, Any] = {"optimizer_state_factor": optimizer_state_factor}
    if planner in _OWN and micro_batch_sizes is not None:
        kwargs["micro_batch_sizes"] = micro_batch_sizes
    if planner in ("ilp", "ilp-wide"):
        kwargs["time_limit_s"] = time_limit_s
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
    check: dict[str, Any] = dict(result.planner.check)
    if check_ilp:
        check.update(_ilp_check(costs, cluster, batch_size, planner, prediction.round_time_s,
                                elapsed, optimizer_state_factor, micro_batch_sizes,
                                time_limit_s))
    info = PlannerInfo(name=planner, version=result.planner.version, search_time_s=elapsed,
                       check=check)
    return replace(result, predicted=prediction, planner=info, num_layers=costs.num_layers,
                   model_hash=costs.model_hash, cluster_hash=cluster.cluster_hash,
                   model_name=result.model_name or costs.model_name,
                   optimizer_state_factor=optimizer_state_factor)


def _ilp_check(costs: CostTable, cluster: Cluster, batch_size: int, planner: str,
               dp_round: float, dp_time: float, optimizer_state_factor: float,
               micro_batch_sizes: Sequence[int] | None, time_limit_s: float) -> dict[str, Any]:
    result = ilp_plan(costs, cluster, batch_size, optimizer_state_factor=optimizer_state_factor,
                      time_limit_s=time_limit_s, micro_batch_sizes=micro_batch_sizes)
    ilp_round = (evaluate(result.plan, costs, cluster).round_time_s
                 if result.plan is not None else math.inf)
    gap = (dp_round - ilp_round) / ilp_round if math.isfinite(ilp_round) else None
    if gap is not None and gap > 1e-6 and result.status == "optimal":
        log.warning("the %s plan (%.6g s) is %.3g%% slower than the MILP optimum (%.6g s)",
                    planner, dp_round, 100 * gap, ilp_round)
    return {"dp_round": dp_round, "ilp_round": ilp_round if math.isfinite(ilp_round) else None,
            "gap": gap, "dp_time_s": dp_time, "ilp_time_s": result.solve_time_s,
            "ilp_status": result.status, "ilp_solver": result.solver}
