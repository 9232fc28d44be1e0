"""Tests of the proven bound's bisection (solver/bound_bisection.py): the class bounds
over the micro-batch sizes stay below the optimum, follow the incumbent, count after
pricing, and split over two processes."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import pytest

import solver.anytime
import solver.bound_bisection
from contracts.cluster import Cluster
from contracts.table import CostTable
from solver.bound_bisection import work_bound
from solver.dp import asteroid_dp
from solver.evaluate import evaluate
from tests.solver_cases import patch_class_bound, patch_planner, random_instance


def _brute_cases(seeds: range) -> Iterator[tuple[int, CostTable, Cluster, int, float]]:
    """Small random instances (links; latency on even seeds) with a plan, and the best
    round over every plan of the wide space (brute force)."""
    from solver.brute import enumerate_plans

    for seed in seeds:
        costs, cluster, batch = random_instance(seed, max_layers=5, max_devices=4, links=True,
                                                latency=seed % 2 == 0)
        cluster = cluster.for_costs(costs)
        best = min((evaluate(p, costs, cluster).round_time_s
                    for p in enumerate_plans(costs, cluster, batch, wide=True)),
                   default=math.inf)
        if math.isfinite(best):
            yield seed, costs, cluster, batch, best


@pytest.mark.parametrize("seeds", [range(800, 820),
                                   pytest.param(range(820, 840), marks=pytest.mark.slow)],
                         ids=["first-half", "second-half"])
@pytest.mark.parametrize("pools", [True, False])
def test_the_class_bounds_over_the_sizes_stay_below_the_optimum(
        pools: bool, seeds: range, monkeypatch: pytest.MonkeyPatch) -> None:
    # each size's class bound targets the smallest bound so far: the smallest over the
    # sizes is still below every plan of the wide space (brute force), for a target at and
    # above the optimum; with the pools counted (these small clusters) and priced (forced).
    # `on_bound` sees that smallest bound each time it rises, the last one the result's
    from solver.bound_bisection import class_bounds
    from solver.space import micro_batch_choices

    if not pools:
        patch_class_bound(monkeypatch, "CLASS_POOLS_MAX", 0)
    raised = 0
    for seed, costs, cluster, batch, best in _brute_cases(seeds):
        mbs = micro_batch_choices(batch, None)
        for target in (best, 1.5 * best):
            shown: list[float] = []
            out = class_bounds(costs, cluster, batch, mbs, None, target, {},
                                time.perf_counter() + 60.0, on_bound=shown.append)
            assert out
            bound = min(out.get(mb, work_bound(costs, cluster, batch, mb)) for mb in mbs)
            assert bound <= best * (1 + 1e-9), (seed, target, bound, best)
            assert shown and shown == sorted(set(shown)), (seed, shown)
            assert shown[-1] == pytest.approx(bound, rel=1e-12), (seed, shown, bound)
            raised += bound > min(work_bound(costs, cluster, batch, mb)
                                  for mb in mbs) * (1 + 1e-9)
    assert raised > 10, raised     # (of up to 40: the class bound proves more than work)


def _pids_of_class_bounds(monkeypatch: pytest.MonkeyPatch, log: Any,
                           fail_beside: bool = False) -> None:
    """``solver.bound_bisection.class_bound`` wrapped: each call appends its process id to the file
    ``log`` (every process, forked ones too); ``fail_beside``: it raises in any process
    but this one."""
    import os


    real, parent = solver.bound_bisection.class_bound, os.getpid()

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with open(log, "a") as out:
            out.write(f"{os.getpid()}\n")
        if fail_beside and os.getpid() != parent:
            raise RuntimeError("the bound beside failed")
        return real(*args, **kwargs)

    patch_planner(monkeypatch, "class_bound", wrapped)


@pytest.mark.parametrize("fail_beside", [False, True])
def test_the_counted_sizes_split_over_two_processes(
        fail_beside: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    # [Note: the counted sizes on two cores]: every other size in a forked process gives
    # the bounds of one process where every size reaches the target, and bounds below the
    # optimum (brute force) where some fall short; a child that fails costs only time:
    # its sizes are bounded in this process, with a warning
    from solver.bound_bisection import class_bounds
    from solver.class_tables import counts_pools
    from solver.space import ClassSpace, micro_batch_choices

    patch_planner(monkeypatch, "spare_core", lambda: True)
    log = tmp_path / "pids"
    _pids_of_class_bounds(monkeypatch, log, fail_beside)
    compared = same = split = 0
    for seed, costs, cluster, batch, best in _brute_cases(range(800, 816)):
        if not counts_pools(ClassSpace(costs, cluster)):
            continue
        mbs = micro_batch_choices(batch, None)
        for short in (False, True):
            one = class_bounds(costs, cluster, batch, mbs, None, best, {},
                                time.perf_counter() + 60.0, stop_short=short)
            log.write_text("")
            two = class_bounds(costs, cluster, batch, mbs, None, best, {},
                                time.perf_counter() + 60.0, stop_short=short, split=True)
            calls = log.read_text().split()
            assert min(two.values(), default=math.inf) <= best * (1 + 1e-9), seed
            asked = [mb for mb in mbs if mb in one and one[mb] < best * (1 - 1e-6)]
            if not asked:       # every size reached the target: the same bounds
                assert two == one, (seed, short, one, two)
                same += 1
            compared += 1
            if len(calls) >= 2:     # (two sizes asked or more: the child asked some)
                assert len(set(calls)) == 2, (seed, calls)
                split += 1
    assert compared >= 20 and same >= 15 and split >= 12
    if fail_beside:
        assert "the counted class bound beside this process failed" in caplog.text


@pytest.mark.parametrize("pools", [True, False])
def test_the_class_bounds_follow_a_falling_incumbent(
        pools: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # [Note: the bound beside the search]: the incumbent of a search beside falls while
    # the bounds run; no size is asked for more than the incumbent read last, and the
    # bound stays below every plan of the wide space (brute force)
    from solver.bound_bisection import class_bounds
    from solver.space import micro_batch_choices

    if not pools:
        patch_class_bound(monkeypatch, "CLASS_POOLS_MAX", 0)
    plain = solver.bound_bisection.class_bound
    now = [math.inf]
    asked: list[tuple[float, float]] = []

    def recorded(*args: Any, **kwargs: Any) -> float | None:
        asked.append((args[6], now[0]))
        return plain(*args, **kwargs)

    patch_planner(monkeypatch, "class_bound", recorded)
    fell = 0
    for seed, costs, cluster, batch, best in _brute_cases(range(800, 820)):
        reads = [0]

        def incumbent(best: float = best, reads: list[int] = reads) -> float:
            reads[0] += 1
            now[0] = 2.0 * best if reads[0] <= 1 else best     # (better after one read)
            return now[0]

        asked.clear()
        mbs = micro_batch_choices(batch, None)
        out = class_bounds(costs, cluster, batch, mbs, None, 2.0 * best, {},
                            time.perf_counter() + 60.0, incumbent=incumbent)
        assert all(target <= seen * (1 + 1e-12) for target, seen in asked), (seed, asked)
        bound = min(out.get(mb, work_bound(costs, cluster, batch, mb)) for mb in mbs)
        assert bound <= best * (1 + 1e-9), (seed, bound, best)
        fell += any(seen == best for _, seen in asked)
    assert fell > 5      # (measured: 19 of 20 counted, 8 priced)


def test_the_classes_are_counted_after_the_priced_bisection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # [Note: counted classes]: once the priced bisection ends short of the best round (or a
    # size falls just short of a priced target: [Note: counting from the floor]), a second
    # one counts the slowest classes; it asks nothing before the first ends, never lowers
    # the smallest bound over the sizes (the one reported; another size may end lower,
    # since the priced rounds stop early) and raises it on some instances (the pools
    # priced, forced: these small clusters are counted by default)
    from solver.bound_bisection import class_bounds
    from solver.space import micro_batch_choices

    patch_class_bound(monkeypatch, "CLASS_POOLS_MAX", 0)
    asked: list[bool] = []
    plain = solver.bound_bisection.class_bound

    def recorded(*args: Any, **kwargs: Any) -> float | None:
        asked.append(kwargs.get("count", True))
        return plain(*args, **kwargs)

    patch_planner(monkeypatch, "class_bound", recorded)
    raised = counted_runs = 0
    for seed in range(800, 830):
        costs, cluster, batch = random_instance(seed, max_layers=5, max_devices=4, links=True,
                                                latency=seed % 2 == 0)
        cluster = cluster.for_costs(costs)
        mbs = micro_batch_choices(batch, None)
        target = asteroid_dp(costs, cluster, batch, space="classes").round_time_s
        if not math.isfinite(target):
            continue
        results = []
        for counting in (False, True):
            with monkeypatch.context() as patch:
                if not counting:
                    patch_planner(patch, "counted_classes", lambda space: ())
                asked.clear()
                out = class_bounds(costs, cluster, batch, mbs, None, target, {},
                                    time.perf_counter() + 60.0)
            assert asked == sorted(asked), (seed, asked)     # (False before True)
            counted_runs += any(asked)
            results.append(out)
        smallest = [min(out.get(mb, work_bound(costs, cluster, batch, mb)) for mb in mbs)
                    for out in results]
        assert smallest[1] >= smallest[0] * (1 - 1e-9), seed
        assert smallest[1] <= target * (1 + 1e-9)
        raised += smallest[1] > smallest[0] * (1 + 1e-9)
    # (measured: 12 of the instances, 9 raised; 6 after the counted steps, 5 after the
    # first round's smaller target, which leaves the priced bounds as high on average:
    # 0.9792 of the best round with either first target, counted 0.9803-0.9804; 7 since
    # the counted bisection starts from the floor, one size of seed 821 lower but never
    # the smallest)
    assert counted_runs > 8
    assert raised >= 6


def _work_cases(seeds: range) -> Iterator[tuple[int, CostTable, Cluster, int,
                                               dict[int, float]]]:
    """Per seed of ``random_instance`` whose work bounds are all finite and positive:
    ``(seed, costs, cluster, batch, work bound per micro-batch size)``."""
    from solver.space import micro_batch_choices

    for seed in seeds:
        costs, cluster, batch = random_instance(seed, max_layers=5, max_devices=4)
        cluster = cluster.for_costs(costs)
        work = {mb: work_bound(costs, cluster, batch, mb)
                for mb in micro_batch_choices(batch, None)}
        if all(0.0 < value < math.inf for value in work.values()):
            yield seed, costs, cluster, batch, work


@pytest.mark.parametrize("links", [False, True])
def test_the_first_round_asks_a_small_step_above_the_work_bounds(
        links: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # [Note: the first target]: with a poor best round, the first round asks every size
    # for at most CLASS_FIRST_RISE times the smallest work bound, or
    # CLASS_FIRST_RISE_LINKS times the smallest bound where that is a link bound
    from solver.bound_bisection import CLASS_FIRST_RISE, CLASS_FIRST_RISE_LINKS, class_bounds

    patch_class_bound(monkeypatch, "CLASS_POOLS_MAX", 0)
    firsts: list[float] = []

    def scripted(*args: Any, **kwargs: Any) -> float | None:
        if kwargs.get("buckets") is not None:
            firsts.append(args[6])
        return float(args[6])

    patch_planner(monkeypatch, "class_bound", scripted)
    checked = 0
    for seed, costs, cluster, batch, work in _work_cases(range(800, 820)):
        mbs, low = list(work), min(work.values())
        start = {mb: 1.1 * value for mb, value in work.items()} if links else None
        firsts.clear()
        class_bounds(costs, cluster, batch, mbs, None, 10.0 * max(work.values()), {},
                      time.perf_counter() + 60.0, start=start)
        rise, smallest = (CLASS_FIRST_RISE_LINKS, 1.1 * low) if links \
            else (CLASS_FIRST_RISE, low)
        assert firsts and all(t <= rise * smallest * (1 + 1e-12) for t in firsts), seed
        assert max(firsts) >= rise * smallest * (1 - 1e-12), seed
        checked += 1
    assert checked > 10


def test_the_counted_bisection_steps_from_where_the_prices_fell_short(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # [Note: counted steps]: a class bound that proves up to a ceiling (the prices a lower
    # one than the counts); the counted trials ask at most CLASS_COUNTED_STEP above the
    # lowest target the priced bisection fell short of after its first round (or the
    # bound proven, if higher),
    # never the midpoint towards a poor best round, and still climb to the counted ceiling
    from solver.bound_bisection import CLASS_BOUND_BISECT_TOL, CLASS_COUNTED_STEP, class_bounds

    patch_class_bound(monkeypatch, "CLASS_POOLS_MAX", 0)
    patch_planner(monkeypatch, "counted_classes", lambda space: (0,))
    asked: list[tuple[float, bool, float, bool]] = []
    ceiling = {False: 0.0, True: 0.0}

    def scripted(*args: Any, **kwargs: Any) -> float | None:
        target, count = args[6], bool(kwargs.get("count"))
        found = min(target, ceiling[count])
        asked.append((target, count, found, kwargs.get("buckets") is not None))
        return found

    patch_planner(monkeypatch, "class_bound", scripted)
    checked = 0
    for seed, costs, cluster, batch, bounds in _work_cases(range(800, 830)):
        mbs, work = list(bounds), max(bounds.values())
        best = 2.0 * work               # (a poor best round: the midpoints ask far above)
        ceiling[False], ceiling[True] = 1.5 * work, 1.56 * work
        asked.clear()
        out = class_bounds(costs, cluster, batch, mbs, None, best, {},
                            time.perf_counter() + 60.0)
        # (the first round's quicker tables aside)
        short = min((t for t, count, found, first in asked
                     if not count and not first and found < t), default=math.inf)
        counted = [(t, found) for t, count, found, _ in asked if count]
        if not counted or not math.isfinite(short):
            continue
        proven = 0.0
        for target, found in counted:
            assert target <= max(short, proven) * (1 + CLASS_COUNTED_STEP) * (1 + 1e-12), (
                seed, short, proven, target)
            proven = max(proven, found) if found >= target * (1 - 1e-6) else proven
        bound = min(out.get(mb, work_bound(costs, cluster, batch, mb)) for mb in mbs)
        assert bound >= ceiling[True] / (1 + CLASS_BOUND_BISECT_TOL) * (1 - 1e-9), seed
        checked += 1
    assert checked > 10


def test_beside_the_search_the_last_bisection_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # [Note: bisecting on beside the search]: with `tolerance` the counted bisection ends
    # within it of the counted ceiling, not within 1 %; the priced one before it asks the
    # same targets either way; the counted steps start small after a proven trial and
    # double as they are proven
    from solver.bound_bisection import (
        CLASS_BOUND_BESIDE_TOL,
        CLASS_BOUND_BISECT_TOL,
        CLASS_COUNTED_STEP,
        CLASS_COUNTED_STEP_AFTER,
        class_bounds,
    )

    patch_class_bound(monkeypatch, "CLASS_POOLS_MAX", 0)
    patch_planner(monkeypatch, "counted_classes", lambda space: (0,))
    asked: list[tuple[float, bool]] = []
    ceiling = {False: 0.0, True: 0.0}

    def scripted(*args: Any, **kwargs: Any) -> float | None:
        target, count = args[6], bool(kwargs.get("count"))
        asked.append((target, count))
        # (as the class bound: above what it can prove, it proves less than that)
        return target if target <= ceiling[count] else 0.98 * ceiling[count]

    patch_planner(monkeypatch, "class_bound", scripted)
    finer = doubled = 0
    for seed, costs, cluster, batch, bounds in _work_cases(range(800, 815)):
        mbs, work = list(bounds), max(bounds.values())
        ceiling[False], ceiling[True] = 1.5 * work, 1.56 * work
        got, priced = {}, {}
        for tol in (CLASS_BOUND_BISECT_TOL, CLASS_BOUND_BESIDE_TOL):
            asked.clear()
            out = class_bounds(costs, cluster, batch, mbs, None, 2.0 * work, {},
                               time.perf_counter() + 60.0, tolerance=tol)
            got[tol] = min(out.get(mb, work_bound(costs, cluster, batch, mb)) for mb in mbs)
            priced[tol] = [t for t, count in asked if not count]
            # [Note: counted steps]: after a counted trial every size proved, the step is
            # CLASS_COUNTED_STEP_AFTER, twice the last after each further one
            step, proven, proofs = CLASS_COUNTED_STEP, 0.0, 0
            for target in dict.fromkeys(t for t, count in asked if count):
                if proven:
                    assert target <= proven * (1 + step) * (1 + 1e-12), (seed, tol)
                    doubled += target > proven * (1 + CLASS_COUNTED_STEP_AFTER) * (1 + 1e-9)
                if target <= ceiling[True]:
                    proven = max(proven, target)
                    step = (CLASS_COUNTED_STEP_AFTER if not proofs
                            else min(2 * step, CLASS_COUNTED_STEP))
                    proofs += 1
            assert got[tol] >= ceiling[True] / (1 + tol) * (1 - 1e-9), (seed, tol)
        assert priced[CLASS_BOUND_BISECT_TOL] == priced[CLASS_BOUND_BESIDE_TOL], seed
        assert got[CLASS_BOUND_BESIDE_TOL] >= got[CLASS_BOUND_BISECT_TOL] * (1 - 1e-12)
        finer += got[CLASS_BOUND_BESIDE_TOL] > got[CLASS_BOUND_BISECT_TOL] * (1 + 1e-6)
    assert finer >= 3
    assert doubled, "no counted step grew after a proven one"


def test_the_counted_steps_grow_to_their_cap_and_stay() -> None:
    # [Note: counted steps]: CLASS_COUNTED_STEP before a counted proof, then an eighth of it,
    # doubled after each further proof, never back down once at the cap
    from solver.bound_bisection import CLASS_COUNTED_STEP, CLASS_COUNTED_STEP_AFTER, counted_step

    after = CLASS_COUNTED_STEP_AFTER
    assert [counted_step(n) for n in range(8)] == pytest.approx(
        [CLASS_COUNTED_STEP, after, 2 * after, 4 * after] + [CLASS_COUNTED_STEP] * 4)
