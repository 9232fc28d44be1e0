"""The planning problem as a MILP (PuLP): a cross-check of the DP and a measure of its assumptions.

[Note: the MILP]
Stages are indexed by ``r``, their distance from the end (``r = 1`` is the last stage).
A *candidate* is a stage ``(first, last, devices, shares)`` at some ``r``, with its
Algorithm-1 shares for the in-flight count ``min(M, r)`` precomputed (so memory is
always respected), and its compute times and all-reduce time as constants (each
device's times from ``solver.timing.Timing``: its type's cost column as measured, or
the base times over its speed; devices ordered and split by the same capability speeds
as the DP's, so both search the same space). Binary edge
variables ``z`` chain candidates into a path source -> stage at ``r = S`` -> ... ->
stage at ``r = 1`` -> sink; an edge between two adjacent stages carries the re-sharding
time of their cut, so ``E_f`` / ``E_b`` of position ``r`` are linear in ``x`` and ``z``.

``planner="ilp"`` allows exactly the DP's space (devices in capability order, stages on
consecutive slices). ``planner="ilp-wide"`` allows any device subset per stage (each
device in at most one stage) for small instances, to measure what the DP's ordering
assumption costs.

The round latency: a binary ``delta_d`` picks the dominant position. ``delta_d = 1``
forces ``X_d >= X_r`` for stages before ``d`` and ``X_d >= X_r + eps`` for stages
after it (the *last* argmax, as in ``evaluate``), and ``R >= T_w^r + T_e^r + T_a^r``
(written for dominant ``d``) for every ``r``, with big-M relaxation when
``delta_d = 0``. The drain term of ``evaluate`` ([Note: the drain correction]) is a
continuous ``D_d >= 0`` per dominant position with ``D_d >= T_tail - (w_d - 1) E_f^d`` and
``D_d >= T_tail - (w_d - 1) E_b^d`` (``T_tail = sum_{r<d} X_r``, ``w_d = min(M, d)``: the
``max(0, T_tail - (w_d - 1) min(E_f, E_b))`` of ``evaluate`` as linear lower bounds; the
minimisation makes it tight where it matters), added to the ``R`` constraints of the
stages ``r >= d``. Positions beyond the pipeline's length have all terms 0 and their
constraints are implied by those of the first stage. Times are scaled so that the
largest candidate ``X`` is about 1; ``eps = 1e-6`` of that scale, so two stages whose
``X`` differ by less than that (but are not equal) cannot both be represented — the
solver then skips such plans. The decoded plan is always re-scored with ``evaluate``.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
import warnings
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from contracts.cluster import Cluster
from contracts.errors import PlanError
from contracts.plan import Plan, PlannerInfo, Stage
from contracts.table import CostTable
from solver.evaluate import stage_tail_time, transfer_time
from solver.space import micro_batch_choices, sorted_devices
from solver.split import split_stage
from solver.timing import Timing

__all__ = ["ILPResult", "ilp_plan", "milp_size", "highs_available", "ILP_VERSION",
           "MAX_WIDE_DEVICES", "MAX_WIDE_LAYERS"]

log = logging.getLogger(__name__)

ILP_VERSION = "1"
MAX_WIDE_DEVICES = 5
MAX_WIDE_LAYERS = 8
_EPS = 1e-6


@dataclass
class ILPResult:
    """The best plan the MILP found over all micro-batch sizes, and how the solves went."""

    plan: Plan | None
    round_time_s: float  # the MILP objective (seconds) of the best plan
    status: str  # "optimal", "time limit (feasible)", "infeasible", "time limit (none)"
    solve_time_s: float
    solver: str
    candidates: int


@dataclass(frozen=True)
class _Cand:
    r: int
    first: int
    last: int
    devs: tuple[int, ...]  # indices into the capability order
    shares: tuple[int, ...]
    cf: float
    cb: float
    ta: float


def highs_available() -> bool:
    """True when ``highspy`` is installed (PuLP then solves with HiGHS)."""
    try:
        import highspy  # noqa: F401
    except ImportError:
        return False
    return True


def _solver(time_limit_s: float) -> tuple[Any, str]:
    import pulp

    limit = max(1.0, time_limit_s)
    if highs_available():
        return pulp.HiGHS(msg=False, timeLimit=limit, gapRel=0.0), "HiGHS"
    # [Note: CBC without threads]: no `threads` option, so no helper thread in CBC
    with warnings.catch_warnings():  # the bundled CBC is deprecated in PuLP 3.3, still fine
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=limit, gapRel=0.0), "CBC"


# [Note: CBC without threads]
# Until 2026-12-07 CBC was called with `threads=1` (`-threads 1`). With that option the
# bundled CBC (2.10) starts one helper thread as it finishes, and that thread waits on a
# condition with a 10-s timeout: now and then the wake-up comes before the wait and the
# solve takes 10.05 s whatever the model (traced with strace: the thread's timed futex
# wait ran out after 10.005 s, on models of 14-38 variables). In the test suite that hit
# 1-3 of the ~250 CBC calls of tests/test_ilp.py per run (the file took 35-66 s; 5-7 s
# since). Without the option CBC starts no thread at all (strace: no clone), solves on one
# core as before, and gives the same optima.


def _candidates(costs: CostTable, names: Sequence[str], speeds: Sequence[float],
                caps: Sequence[int], cluster: Cluster, timing: Timing, mb: int, m: int,
                osf: float, wide: bool, ends: Sequence[int] | None = None) -> list[_Cand]:
    sums = timing.base
    n = len(names)
    n_layers = costs.num_layers
    if wide:
        groups = [g for size in range(1, min(n, mb) + 1)
                  for g in itertools.combinations(range(n), size)]
    else:
        groups = [tuple(range(i, j)) for i in range(n) for j in range(i + 1, min(n, i + mb) + 1)]
    cut_after = set(range(n_layers - 1) if ends is None else ends)
    out: list[_Cand] = []
    for r in range(1, min(n, n_layers) + 1):
        for first in range(n_layers):
            if first > 0 and first - 1 not in cut_after:
                continue
            lasts = ([n_layers - 1] if r == 1 else
                     [e for e in range(first, n_layers - r + 1) if e in cut_after])
            for last in lasts:
                for g in groups:
                    if not wide and g[-1] + 1 > n - (r - 1):
                        continue
                    shares = split_stage(sums, first, last, [speeds[d] for d in g],
                                         [caps[d] for d in g], mb, min(m, r), osf,
                                         num_micro_batches=m)
                    if shares is None:
                        continue
                    group = [names[d] for d in g]
                    cf, cb = timing.compute(first, last, group, shares)
                    ta = stage_tail_time(cluster, group, timing, first, last)
                    out.append(_Cand(r, first, last, g, shares, cf, cb, ta))
    return out


def _solve_one(costs: CostTable, cluster: Cluster, names: Sequence[str], cands: list[_Cand],
               mb: int, m: int, wide: bool, time_limit_s: float
               ) -> tuple[float, list[_Cand] | None, str, str]:
    import pulp

    n_layers = costs.num_layers
    if not cands:
        return math.inf, None, "infeasible", "none"
    s_max = max(c.r for c in cands)
    by_start: dict[tuple[int, int], list[int]] = {}
    for k, c in enumerate(cands):
        by_start.setdefault((c.r, c.first), []).append(k)
    edges: list[tuple[int, int, float]] = []  # (from, to, comm); -1 = source
    for k, c in enumerate(cands):
        if c.first == 0 and (wide or c.devs[0] == 0):
            edges.append((-1, k, 0.0))
        for k2 in by_start.get((c.r - 1, c.last + 1), []):
            c2 = cands[k2]
            if wide:
                if set(c.devs) & set(c2.devs):
                    continue
            elif c2.devs[0] != c.devs[-1] + 1:
                continue
            comm = transfer_time(cluster, [names[d] for d in c.devs], c.shares,
                                 [names[d] for d in c2.devs], c2.shares,
                                 costs.cut_bytes[c2.first - 1])
            edges.append((k, k2, comm))
    max_comm = max((e[2] for e in edges), default=0.0)
    scale = max(c.cf + c.cb for c in cands) + 2 * max_comm
    scale = scale if scale > 0 else 1.0
    x_ub = 1.0 + 1e-9
    a_ub = max(c.ta for c in cands) / scale

    prob = pulp.LpProblem("asteroid_plan", pulp.LpMinimize)
    def var(name: str, cat: str = "Binary", low: float | None = None) -> Any:
        if hasattr(prob, "add_variable"):  # PuLP >= 3.3
            return prob.add_variable(name, lowBound=low, cat=cat)
        return pulp.LpVariable(name, lowBound=low, cat=cat)  # pragma: no cover

    x = [var(f"x{k}") for k in range(len(cands))]
    z = [var(f"z{e}") for e in range(len(edges))]
    delta = {d: var(f"dom{d}") for d in range(1, s_max + 1)}
    big_r = var("round", "Continuous", 0.0)
    prob += big_r
    into: dict[int, list[int]] = {}
    out_of: dict[int, list[int]] = {}
    for e, (a, b, _) in enumerate(edges):
        into.setdefault(b, []).append(e)
        out_of.setdefault(a, []).append(e)
    prob += pulp.lpSum(z[e] for e in out_of.get(-1, [])) == 1
    for k, c in enumerate(cands):
        prob += pulp.lpSum(z[e] for e in into.get(k, [])) == x[k]
        if c.r > 1:
            prob += pulp.lpSum(z[e] for e in out_of.get(k, [])) == x[k]
        # r == 1 stages flow to the sink
    for r in range(1, s_max + 1):
        prob += pulp.lpSum(x[k] for k, c in enumerate(cands) if c.r == r) <= 1
    if wide:
        for d in range(len(names)):
            prob += pulp.lpSum(x[k] for k, c in enumerate(cands) if d in c.devs) <= 1

    f_r: dict[int, Any] = {}
    b_r: dict[int, Any] = {}
    a_r: dict[int, Any] = {}
    for r in range(1, s_max + 1):
        ks = [k for k, c in enumerate(cands) if c.r == r]
        cut_terms = [(e, edges[e][2] / scale) for k in ks for e in into.get(k, [])
                if edges[e][0] >= 0 and edges[e][2] > 0]
        f_r[r] = (pulp.lpSum(x[k] * (cands[k].cf / scale) for k in ks)
                  + pulp.lpSum(z[e] * v for e, v in cut_terms))
        b_r[r] = (pulp.lpSum(x[k] * (cands[k].cb / scale) for k in ks)
                  + pulp.lpSum(z[e] * v for e, v in cut_terms))
        a_r[r] = pulp.lpSum(x[k] * (cands[k].ta / scale) for k in ks)
    x_r = {r: f_r[r] + b_r[r] for r in f_r}

    prob += pulp.lpSum(delta.values()) == 1
    big_x = x_ub + _EPS
    big_t = (4 * s_max + m) * x_ub + a_ub + 1.0
    for d in delta:
        prob += delta[d] <= pulp.lpSum(x[k] for k, c in enumerate(cands) if c.r == d)
        drain = var(f"drain{d}", "Continuous", 0.0)
        hide = min(m, d) - 1
        tail = pulp.lpSum(x_r[q] for q in range(1, d))
        prob += drain >= tail - hide * f_r[d]
        prob += drain >= tail - hide * b_r[d]
        for r in range(1, s_max + 1):
            if r > d:  # stage r runs before d
                prob += x_r[d] - x_r[r] >= -big_x * (1 - delta[d])
            elif r < d:  # after d: strictly smaller (d is the last argmax)
                prob += x_r[d] - x_r[r] >= _EPS - (big_x + _EPS) * (1 - delta[d])
            warm = pulp.lpSum(f_r[q] for q in range(r + 1, s_max + 1))
            if r >= d:
                steady = (m * x_r[d] + pulp.lpSum(x_r[q] for q in range(d + 1, r + 1))
                          + drain)
            else:
                steady = m * x_r[d] - pulp.lpSum(x_r[q] for q in range(r + 1, d + 1))
            prob += big_r >= warm + steady + a_r[r] - big_t * (1 - delta[d])

    solver, solver_name = _solver(time_limit_s)
    prob.solve(solver)
    sol = pulp.LpSolution.get(prob.sol_status, str(prob.sol_status))
    if prob.sol_status == pulp.LpSolutionOptimal:
        status = "optimal"
    elif prob.sol_status == pulp.LpSolutionIntegerFeasible:
        status = "time limit (feasible)"
    elif prob.sol_status == pulp.LpSolutionInfeasible:
        return math.inf, None, "infeasible", solver_name
    else:
        log.debug("MILP for micro-batch %d: %s", mb, sol)
        return math.inf, None, "time limit (none)", solver_name
    chain: list[_Cand] = []
    node = -1
    while True:
        nxt = [b for e in out_of.get(node, []) if (z[e].value() or 0.0) > 0.5
               for b in (edges[e][1],)]
        if not nxt:
            break
        node = nxt[0]
        chain.append(cands[node])
    if not chain or chain[-1].last != n_layers - 1:
        return math.inf, None, "time limit (none)", solver_name
    value = float(pulp.value(big_r)) * scale
    return value, chain, status, solver_name


def milp_size(costs: CostTable, cluster: Cluster, batch_size: int, *,
              micro_batch_sizes: Sequence[int] | None = None,
              ends: Sequence[int] | None = None) -> int:
    """An upper bound on the variables of ``ilp_plan``'s MILPs (the DP's space), summed
    over the micro-batch sizes, counted without building them: a candidate per (stage
    position, layers, slice) and an edge per pair of candidates that can follow each other
    (memory is not checked here, so the MILPs may be smaller)."""
    n, n_layers = len(cluster.devices), costs.num_layers
    cut_after = sorted(set(range(n_layers - 1) if ends is None else ends))
    starts = [0] + [c + 1 for c in cut_after]
    total = 0

    def count(r: int, first: int) -> int:
        """Candidate last layers of a stage at position ``r`` from layer ``first``."""
        if r == 1:
            return 1
        return max(0, bisect_right(cut_after, n_layers - r) - bisect_left(cut_after, first))

    for mb in micro_batch_choices(batch_size, micro_batch_sizes):
        positions = min(n, n_layers)
        # slices(r, i): slices starting at device i allowed at position r
        slices = [[max(0, min(n - (r - 1), i + mb) - i) for i in range(n + 1)]
                  for r in range(positions + 1)]
        for r in range(1, positions + 1):
            per_slice = sum(slices[r][i] for i in range(n))
            after = (sum(slices[r - 1][j] for i in range(n)
                         for j in range(i + 1, min(n, i + mb) + 1)) if r > 1 else 0)
            for first in starts:
                lasts = count(r, first)
                total += lasts * per_slice
                if r > 1 and lasts:
                    low = bisect_left(cut_after, first)
                    total += after * sum(count(r - 1, last + 1)
                                         for last in cut_after[low:low + lasts])
        total += 2 * positions + 1
    return total


def ilp_plan(costs: CostTable, cluster: Cluster, batch_size: int, *,
             optimizer_state_factor: float = 0.0, wide: bool = False,
             time_limit_s: float = 60.0,
             micro_batch_sizes: Sequence[int] | None = None,
             ends: Sequence[int] | None = None) -> ILPResult:
    """Solve the planning MILP for every micro-batch size and return the best plan.

    Args:
        costs, cluster, batch_size: the problem.
        optimizer_state_factor: optimizer state in units of the weights.
        wide: any device subset per stage (``ilp-wide``) instead of the DP's ordered slices.
        time_limit_s: wall-clock budget for all solves together.
        micro_batch_sizes: micro-batch sizes to try (default: every divisor of the batch).
        ends: the layers after which a stage may end (default: every layer; the DP's
            ``solver.space.candidate_cuts`` to compare with a DP over the same cuts).

    Raises:
        PlanError: ``wide`` on an instance larger than ``MAX_WIDE_LAYERS`` layers or
            ``MAX_WIDE_DEVICES`` devices.
    """
    cluster = cluster.for_costs(costs)
    if wide and (costs.num_layers > MAX_WIDE_LAYERS or len(cluster.devices) > MAX_WIDE_DEVICES):
        raise PlanError(f"planner 'ilp-wide' is for small instances (<= {MAX_WIDE_LAYERS} "
                        f"layers, <= {MAX_WIDE_DEVICES} devices), got {costs.num_layers} layers "
                        f"and {len(cluster.devices)} devices; use planner 'ilp' or 'asteroid'")
    start = time.perf_counter()
    mbs = micro_batch_choices(batch_size, micro_batch_sizes)
    devices = sorted_devices(cluster, costs)
    names = [d.name for d in devices]
    timing = Timing.of(costs, cluster)
    speed_of = timing.speeds  # capability: the order and Algorithm 1's split
    speeds = [speed_of[d] for d in names]
    caps = [cluster.usable_bytes(d.name) for d in devices]
    best: tuple[float, Plan | None] = (math.inf, None)
    statuses: list[str] = []
    solver_name = "none"
    total_cands = 0
    for index, mb in enumerate(mbs):
        m = batch_size // mb
        left = time_limit_s - (time.perf_counter() - start)
        if left <= 0:
            statuses.append("time limit (none)")
            break
        cands = _candidates(costs, names, speeds, caps, cluster, timing, mb, m,
                            optimizer_state_factor, wide, ends)
        total_cands += len(cands)
        value, chain, status, used = _solve_one(costs, cluster, names, cands, mb, m, wide,
                                                left / (len(mbs) - index))
        solver_name = used if used != "none" else solver_name
        statuses.append(status)
        if chain is not None and value < best[0]:
            stages = tuple(Stage((c.first, c.last), tuple(names[d] for d in c.devs), c.shares)
                           for c in chain)
            plan = Plan(model_hash=costs.model_hash, cluster_hash=cluster.cluster_hash,
                        batch_size=batch_size, micro_batch_size=mb, num_micro_batches=m,
                        stages=stages, num_layers=costs.num_layers,
                        model_name=costs.model_name,
                        optimizer_state_factor=optimizer_state_factor,
                        planner=PlannerInfo("ilp-wide" if wide else "ilp", ILP_VERSION))
            best = (value, plan)
    if any(s.startswith("time limit") for s in statuses):
        overall = ("time limit (feasible)" if best[1] is not None else "time limit (none)")
    elif best[1] is None:
        overall = "infeasible"
    else:
        overall = "optimal"
    return ILPResult(plan=best[1], round_time_s=best[0], status=overall,
                     solve_time_s=time.perf_counter() - start, solver=solver_name,
                     candidates=total_cands)
