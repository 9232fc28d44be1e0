"""Tests of anytime planning (solver/anytime.py): phases, time limits, proven bounds."""

from __future__ import annotations

import gc
import math
import time
from typing import Any

import pytest

import solver.anytime
import solver.bound_bisection
from contracts.cluster import Cluster
from contracts.errors import PlanError
from contracts.plan import Plan
from contracts.table import CostTable
from solver.anytime import (
    WIDE_EXACT_MAX,
    WIDE_SHORT_MAX,
    check_time_limit,
    search,
    search_or_raise,
    wide_size,
    work_bound,
)
from solver.dp import asteroid_dp
from solver.evaluate import evaluate
from tests.solver_cases import (
    MIB,
    make_cluster,
    make_costs,
    patch_planner,
    planner_instance,
    random_instance,
    uniform_costs,
)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), True, "5", None])
def test_bad_time_limits_are_refused(bad: object) -> None:
    if bad is None:
        check_time_limit(None)  # no limit: fine
        return
    with pytest.raises(PlanError, match=r"time limit must be a number of seconds > 0"):
        check_time_limit(bad)  # type: ignore[arg-type]


def test_without_a_limit_the_plan_is_optimal_over_every_order() -> None:
    costs, cluster, batch = random_instance(31, max_layers=6, max_devices=4, links=True)
    report = search(costs, cluster, batch)
    assert report.complete and report.plan is not None and report.bound is not None
    assert report.bound.optimal and report.bound.stopped == ""
    assert report.bound.bound_s == pytest.approx(report.round_time_s, rel=1e-12)
    wide = asteroid_dp(costs, cluster, batch, space="classes")
    assert report.round_time_s <= wide.round_time_s * (1 + 1e-12)
    assert evaluate(report.plan, costs, cluster).round_time_s == pytest.approx(
        report.round_time_s, rel=1e-12)
    assert report.phases == ("order", "baselines", "classes")


@pytest.mark.parametrize("beside", [False, True])
def test_a_time_limit_returns_the_best_plan_with_a_proven_gap(
        beside: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # eight devices of eight speeds: the wide space (6561 pairs) does not finish in 1 s;
    # the class bound after the search, or beside it ([Note: the bound beside the search])

    patch_planner(monkeypatch, "spare_core", lambda: beside)
    costs, cluster = planner_instance("spread", 7, 200, 8)
    assert wide_size(costs, cluster) > WIDE_EXACT_MAX
    started = time.perf_counter()
    seen: list[str] = []
    report = search(costs, cluster, 32, time_limit=1.0,
                    progress=lambda done, what: seen.append(what))
    assert time.perf_counter() - started < 10.0   # the limit, plus finishing a step
    assert report.plan is not None and report.bound is not None
    assert not report.bound.optimal and report.bound.stopped == "time limit"
    # the bar ends with the proven gap; beside the search, it shows the gap proven so
    # far on the way (never below the final one: the bound only rises, the best falls)
    assert seen[-1] == (f"done, best {report.round_time_s:.4g} s, "
                        f"gap <= {100.0 * report.bound.gap:.3g} %")
    shown = [float(what.rsplit("gap <= ", 1)[1].split()[0]) for what in seen[:-1]
             if "gap <= " in what]
    assert bool(shown) == beside
    assert all(value >= 100.0 * report.bound.gap * (1 - 5e-3) for value in shown)
    # the bound is a lower bound: no better than the exact optimum over one order
    exact = asteroid_dp(costs, cluster, 32)
    assert report.bound.bound_s <= exact.round_time_s
    assert report.bound.gap == pytest.approx(
        (report.round_time_s - report.bound.bound_s) / report.bound.bound_s)
    assert report.bound.bound_s >= min(work_bound(costs, cluster, 32, mb)
                                       for mb in (1, 2, 4, 8, 16, 32)) * (1 - 1e-12)


def test_a_bound_beside_that_fails_costs_only_the_class_bound(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # [Note: the bound beside the search]: its process raises; the plan and the other
    # bounds are the parent's, and the warning says why

    def broken(*args: Any, **kwargs: Any) -> dict[int, float]:
        raise RuntimeError("tables too large")

    patch_planner(monkeypatch, "spare_core", lambda: True)
    monkeypatch.setattr(solver.anytime, "class_bounds", broken)
    costs, cluster = planner_instance("spread", 7, 200, 8)
    report = search(costs, cluster, 32, time_limit=1.0)
    assert report.plan is not None and report.bound is not None
    assert report.bound.bound_s <= asteroid_dp(costs, cluster, 32).round_time_s
    assert "proved nothing: RuntimeError: tables too large" in caplog.text


def test_a_bound_beside_that_is_late_keeps_what_it_published(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # its process published a bound (the smallest over the sizes so far) and then failed
    # (or was late): that bound stands for every size, with a warning
    costs, cluster = planner_instance("spread", 7, 200, 8)
    published = 0.97 * asteroid_dp(costs, cluster, 32).round_time_s

    def publishes_then_fails(*args: Any, on_bound: Any = None, **kwargs: Any
                             ) -> dict[int, float]:
        on_bound(published)
        raise RuntimeError("tables too large")

    patch_planner(monkeypatch, "spare_core", lambda: True)
    monkeypatch.setattr(solver.anytime, "class_bounds", publishes_then_fails)
    report = search(costs, cluster, 32, time_limit=1.0)
    assert report.plan is not None and report.bound is not None
    assert report.bound.bound_s >= min(published, report.round_time_s) * (1 - 1e-12)
    assert (f"did not finish (RuntimeError: tables too large): its bound so far, "
            f"{published:.4g} s, stands") in caplog.text
    assert "proved nothing" not in caplog.text


def test_the_bound_beside_starts_with_the_search_and_waits_for_a_plan(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    # [Note: the bound's process from the start]: the process starts before the search
    # has a plan (its incumbent inf), and its class bound's first target is a plan's round
    started: list[float] = []
    plain = solver.anytime.Beside

    def recorded(work: Any, incumbent: float) -> Any:
        started.append(incumbent)
        return plain(work, incumbent)

    def target_seen(*args: Any, **kwargs: Any) -> dict[int, float]:
        (tmp_path / "target").write_text(repr(args[5]))     # (in the process beside)
        return {}

    patch_planner(monkeypatch, "spare_core", lambda: True)
    patch_planner(monkeypatch, "Beside", recorded)
    monkeypatch.setattr(solver.anytime, "class_bounds", target_seen)
    costs, cluster = planner_instance("spread", 7, 200, 8)
    report = search(costs, cluster, 32, time_limit=1.0)
    assert report.plan is not None and started == [math.inf]
    target = float((tmp_path / "target").read_text())
    assert math.isfinite(target) and target >= report.round_time_s * (1 - 1e-12)


def test_no_process_beside_means_the_bound_after_the_search(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # the fork fails (no memory, no processes left): the search leaves the bound its
    # share of the limit, as on one core

    def no_fork(*args: Any, **kwargs: Any) -> Any:
        raise OSError("Resource temporarily unavailable")

    asked: list[float] = []
    plain = solver.anytime.class_bounds

    def recorded(*args: Any, **kwargs: Any) -> dict[int, float]:
        asked.append(time.perf_counter())
        return plain(*args, **kwargs)

    patch_planner(monkeypatch, "spare_core", lambda: True)
    patch_planner(monkeypatch, "Beside", no_fork)
    monkeypatch.setattr(solver.anytime, "class_bounds", recorded)
    costs, cluster = planner_instance("spread", 7, 200, 8)
    started = time.perf_counter()
    report = search(costs, cluster, 32, time_limit=2.0)
    assert report.plan is not None and report.bound is not None
    assert "cannot run the class bound beside the search" in caplog.text
    assert len(asked) == 1 and asked[0] - started < 2.0    # before the deadline


def test_a_large_wide_space_is_not_searched_without_a_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # (its glimpse, [Note: a glimpse of every order], cut to nothing: the test's plan
    # does not depend on the host's speed)

    monkeypatch.setattr(solver.anytime, "WIDE_UNLIMITED_S", 0.0)
    costs, cluster = planner_instance("spread", 7, 200, 8)
    assert WIDE_SHORT_MAX < wide_size(costs, cluster) <= solver.anytime.WIDE_ANYTIME_MAX
    report = search(costs, cluster, 32)
    assert report.bound is not None and report.bound.stopped == "size limit"
    assert report.bound.order_optimal and not report.bound.optimal
    assert report.phases == ("order", "baselines", "classes")
    assert report.round_time_s <= asteroid_dp(costs, cluster, 32).round_time_s


def test_infinite_limit_searches_every_order() -> None:
    costs, cluster, batch = random_instance(33, max_layers=5, max_devices=4, links=True)
    report = search(costs, cluster, batch, time_limit=math.inf)
    assert report.complete and report.bound is not None and report.bound.optimal


def test_progress_reports_fractions_up_to_one() -> None:
    seen: list[float] = []
    costs, cluster, batch = random_instance(34, max_layers=5, max_devices=3)
    search(costs, cluster, batch, progress=lambda done, what: seen.append(done))
    assert seen and seen[-1] == 1.0
    assert all(0.0 <= x <= 1.0 for x in seen) and seen == sorted(seen)


def test_the_collector_is_paused_during_the_search_only() -> None:
    """[Note: no collection during the search]: off while the search runs, as it was after
    (also after an error), and left off where the caller turned it off."""
    costs, cluster, batch = random_instance(34, max_layers=5, max_devices=3)
    during: list[bool] = []
    assert gc.isenabled()
    search(costs, cluster, batch, progress=lambda done, what: during.append(gc.isenabled()))
    assert during and not any(during) and gc.isenabled()
    with pytest.raises(PlanError):
        search(costs, cluster, batch, time_limit=-1.0)
    assert gc.isenabled()
    gc.disable()
    try:
        search(costs, cluster, batch)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_nothing_fits_is_a_plan_error_with_the_shortfall() -> None:
    costs = uniform_costs(3, param_bytes=64 * MIB)
    cluster = make_cluster([1.0, 2.0], memory_mib=[100.0, 120.0])
    with pytest.raises(PlanError, match=r"no plan .* fits in memory.*short"):
        search_or_raise(costs, cluster, 4)


def test_a_plan_that_fits_only_in_another_order_is_found() -> None:
    # the fastest device cannot hold the layer: only the wide phase finds a plan, and it
    # runs even where the size gate would skip it
    costs = make_costs([(0.0, 0.01)], [(0.0, 0.02)], [16 * MIB], [MIB], [])
    cluster = make_cluster([2.0, 1.0, 1.0], memory_mib=[8.0, 256.0, 256.0])
    plan = search_or_raise(costs, cluster, 4).plan
    assert plan is not None
    assert "d0" not in plan.devices and evaluate(plan, costs, cluster).fits


def test_a_large_space_where_nothing_fits_is_searched_for_a_while_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """[Note: no plan to prune by]: without a limit, where no plan of the capability order
    fits and the wide space has more than WIDE_SHORT_MAX pairs, the wide search gets
    NO_FIT_WIDE_S; a plan it finds in that time is kept, else a PlanError says what was
    searched, with the diagnosis."""

    deadlines: list[float | None] = []
    dp = solver.anytime.asteroid_dp

    def recorded(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("space") == "classes":
            deadlines.append(kwargs.get("deadline"))
        return dp(*args, **kwargs)

    monkeypatch.setattr(solver.anytime, "asteroid_dp", recorded)
    monkeypatch.setattr(solver.anytime, "WIDE_SHORT_MAX", 0)
    monkeypatch.setattr(solver.anytime, "SAFETY_NET_MAX_DEVICES", 0)   # (no baseline plan)
    # a plan that fits only in another order is still found within the time
    monkeypatch.setattr(solver.anytime, "NO_FIT_WIDE_S", 30.0)
    # (two layers that no device holds together, and the fastest device holds neither)
    costs = make_costs([(0.0, 0.01)] * 2, [(0.0, 0.02)] * 2, [16 * MIB] * 2, [MIB] * 2, [MIB])
    cluster = make_cluster([2.0, 1.0, 1.0], memory_mib=[8.0, 48.0, 48.0])
    started = time.perf_counter()
    plan = search_or_raise(costs, cluster, 4).plan
    assert plan is not None and "d0" not in plan.devices and plan.num_stages == 2
    assert len(deadlines) == 1 and deadlines[0] is not None
    assert started + 29.0 < deadlines[0] < time.perf_counter() + 30.0
    assert plan.planner.bound is not None and plan.planner.bound.stopped == ""
    # nothing fits: the search is cut at its deadline and the error says so
    monkeypatch.setattr(solver.anytime, "NO_FIT_WIDE_S", 1e-9)
    tight = make_cluster([1.0, 2.0, 1.5], memory_mib=[100.0, 120.0, 90.0])
    heavy = uniform_costs(3, param_bytes=64 * MIB)
    with pytest.raises(PlanError, match=r"no plan .* fits in memory.*short.*\(no plan of the "
                                        r"capability order fits, and none was found in 1e-09 s "
                                        r"of the search over every device order, \d+ \(pool, "
                                        r"group\) pairs, which did not finish"):
        search_or_raise(heavy, tight, 4)
    # with a time limit (inf: to its end) the search is the caller's: nothing is cut
    deadlines.clear()
    with pytest.raises(PlanError, match=r"no plan .* fits in memory.*short.*memory$"):
        search_or_raise(heavy, tight, 4, time_limit=math.inf)
    assert deadlines == [None]


def test_the_bound_survives_plan_json() -> None:
    costs, cluster, batch = random_instance(35, max_layers=5, max_devices=3)
    plan = search_or_raise(costs, cluster, batch).plan
    assert plan is not None
    assert plan.planner.bound is not None and plan.planner.version == "2"
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.planner.bound == plan.planner.bound


@pytest.mark.parametrize(("seed", "first_sizes"), [(0, 2), (1, 1)])
def test_the_order_searches_the_sizes_the_class_bound_leaves(
        seed: int, first_sizes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # a wide space too large to search, pools counted: the order's pass over every cut
    # first runs the first sizes, the others where the class bound falls short; the plan
    # and its round are those of the pass over every size first, the bound is a bound
    # (the same where the best round did not change after the bound)
    import random

    from solver.class_tables import counts_pools
    from solver.space import ClassSpace
    from tests.solver_cases import random_costs

    costs = random_costs(random.Random(seed), 40)
    cluster = make_cluster([2.0, 2.0, 1.4, 1.4, 1.0, 1.0, 1.0, 0.7],
                           links=[("d0", "d1", 1000.0)]).for_costs(costs)
    assert wide_size(costs, cluster) > WIDE_EXACT_MAX
    assert counts_pools(ClassSpace(costs, cluster))
    # (the wide search where the bound falls short: tested below)
    monkeypatch.setattr(solver.anytime, "WIDE_SHORT_MAX", 0)
    monkeypatch.setattr(solver.anytime, "ORDER_FIRST_SIZES", first_sizes)
    first = search(costs, cluster, 32)
    monkeypatch.setattr(solver.anytime, "ORDER_FIRST_SIZES", 100)
    every = search(costs, cluster, 32)
    assert first.plan is not None and every.plan is not None
    assert first.bound is not None and every.bound is not None
    assert first.round_time_s == every.round_time_s
    assert first.plan.stages == every.plan.stages
    assert first.plan.micro_batch_size == every.plan.micro_batch_size
    assert first.bound.order_optimal and first.bound.stopped == "size limit"
    assert first.bound.bound_s <= first.round_time_s
    assert first.bound.bound_s >= min(work_bound(costs, cluster, 32, mb)
                                      for mb in (1, 2, 4, 8, 16, 32))
    if seed == 0:
        # (to a millionth: the two processes of [Note: the counted sizes on two cores]
        # share the sizes by timing, and a size asked for a target proves it to within
        # PROVED; under load the bound came out 13.276032390 against 13.276032377)
        assert first.bound.bound_s == pytest.approx(every.bound.bound_s, rel=1e-6)


@pytest.mark.parametrize(("seed", "speeds", "pairs"), [
    # pools counted (4 classes of 72 count vectors): the wide search replaces the
    # order's pass over the sizes left out where the counted bound falls short
    (0, [2.0, 2.0, 1.4, 1.4, 1.0, 1.0, 1.0, 0.7], [("d0", "d1")]),
    # a fleet: boards of three speeds, two wired pairs, one of two boards of a kind
    # (classes of 2, 2, 1, 1, 1, 1: 2916 pairs, 144 count vectors, priced bounds): the
    # wide search after the bounds
    (3, [2.0, 1.4, 1.0, 2.0, 1.4, 1.0, 2.0, 1.4], [("d0", "d3"), ("d1", "d2")]),
])
def test_a_wide_space_the_bounds_do_not_prove_is_searched_without_a_limit(
        seed: int, speeds: list[float], pairs: list[tuple[str, str]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # [Note: the wide space where the bound falls short]: more than WIDE_EXACT_MAX pairs
    # but at most WIDE_SHORT_MAX, the bounds leave a gap: the plan is optimal over every
    # order, as the wide search finds it on its own
    import random

    from solver.class_tables import counts_pools
    from solver.space import ClassSpace
    from tests.solver_cases import random_costs

    costs = random_costs(random.Random(seed), 24)
    cluster = make_cluster(speeds, links=[(a, b, 1000.0) for a, b in pairs],
                           latency_ms=2.0).for_costs(costs)
    assert WIDE_EXACT_MAX < wide_size(costs, cluster) <= WIDE_SHORT_MAX
    assert counts_pools(ClassSpace(costs, cluster)) == (seed == 0)
    report = search(costs, cluster, 16)
    assert report.complete and report.plan is not None and report.bound is not None
    assert report.bound.stopped == "" and report.bound.gap == 0.0
    assert report.bound.order_optimal and report.phases[-1] == "classes"
    wide = asteroid_dp(costs, cluster, 16, space="classes")
    assert report.round_time_s == pytest.approx(wide.round_time_s, rel=1e-9)
    assert evaluate(report.plan, costs, cluster).round_time_s == pytest.approx(
        report.round_time_s, rel=1e-12)
    # the bounds alone (no wide search, nor its glimpse) leave a gap: the case needs it
    monkeypatch.setattr(solver.anytime, "WIDE_SHORT_MAX", 0)
    monkeypatch.setattr(solver.anytime, "WIDE_ANYTIME_MAX", 0)
    alone = search(costs, cluster, 16)
    assert alone.bound is not None and alone.bound.stopped == "size limit"
    assert alone.bound.gap > 1e-6 and alone.round_time_s >= report.round_time_s


def _small_fleet(devices: int = 12) -> tuple[CostTable, Cluster]:
    """Boards of three speeds on 100 Mbps with 2 ms latency and wired 1000 Mbps pairs (as
    ``tests/test_widening.py``)."""
    import random

    from tests.solver_cases import random_costs

    costs = random_costs(random.Random(0), 10)
    speeds = [(2.0, 1.4, 1.0)[i % 3] for i in range(devices)]
    pairs = [(f"d{i}", f"d{i + 4}", 1000.0) for i in range(devices // 4)]
    return costs, make_cluster(speeds, links=pairs, latency_ms=2.0).for_costs(costs)


def test_a_time_limited_fleet_is_widened_and_no_worse_than_a_sub_cluster() -> None:
    # [Note: when to widen]: a 12-device fleet with a limit plans sub-clusters first; the
    # plan is no worse than the exact plan of the first sub-cluster (two wired pairs), and
    # its round is the whole cluster's prediction of it
    from solver.widening import sub_clusters

    costs, cluster = _small_fleet()
    assert wide_size(costs, cluster) > WIDE_EXACT_MAX
    report = search(costs, cluster, 16, time_limit=3.0)
    assert report.plan is not None and report.bound is not None
    assert report.phases[0] == "widening"
    first = cluster.subset(sub_clusters(costs, cluster)[0])
    exact = asteroid_dp(costs, first, 16, space="classes")
    assert exact.complete and report.round_time_s <= exact.round_time_s * (1 + 1e-12)
    assert evaluate(report.plan, costs, cluster).round_time_s == pytest.approx(
        report.round_time_s, rel=1e-12)
    assert 0.0 < report.bound.bound_s <= report.round_time_s
    assert report.bound.gap == pytest.approx(
        (report.round_time_s - report.bound.bound_s) / report.bound.bound_s)


def test_a_widened_search_that_finishes_proves_the_same_optimum(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the widening only seeds the incumbent: forced onto a small cluster whose wide search
    # finishes within the limit, the plan and the proven bound are the wide optimum's

    costs, cluster = _small_fleet(devices=6)
    monkeypatch.setattr(solver.anytime, "WIDEN_MIN_DEVICES", 2)
    monkeypatch.setattr(solver.anytime, "WIDE_EXACT_MAX", 1)
    report = search(costs, cluster, 16, time_limit=60.0)
    assert report.phases[0] == "widening"
    assert report.complete and report.bound is not None and report.bound.optimal
    wide = asteroid_dp(costs, cluster, 16, space="classes")
    assert report.round_time_s == pytest.approx(wide.round_time_s, rel=1e-12)
    assert report.bound.bound_s == pytest.approx(wide.round_time_s, rel=1e-12)


def test_no_widening_on_small_clusters(monkeypatch: pytest.MonkeyPatch) -> None:
    from solver.anytime import WIDEN_MIN_DEVICES, widens

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("widened")

    monkeypatch.setattr(solver.anytime, "widen", refuse)
    costs, cluster = _small_fleet(devices=8)
    assert len(cluster.devices) < WIDEN_MIN_DEVICES
    assert not widens(cluster, wide_size(costs, cluster))
    limited = search(costs, cluster, 16, time_limit=1.0)
    assert "widening" not in limited.phases
    costs, cluster, batch = random_instance(36, max_layers=5, max_devices=4, links=True)
    report = search(costs, cluster, batch)
    assert report.phases == ("order", "baselines", "classes")


def test_a_fleet_without_a_limit_is_widened_and_no_worse_than_either_seed() -> None:
    # [Note: when to widen]: without a limit a large fleet's sub-clusters seed the search
    # too (for WIDEN_UNLIMITED_S); the paper's space is still searched to its end, so the
    # plan is no worse than its optimum nor than the first sub-cluster's exact plan
    from solver.widening import sub_clusters

    costs, cluster = _small_fleet()
    report = search(costs, cluster, 16)
    assert report.phases[0] == "widening" and report.plan is not None
    assert report.bound is not None and report.bound.order_optimal
    assert report.bound.stopped == "size limit"
    order = asteroid_dp(costs, cluster, 16)
    assert report.round_time_s <= order.round_time_s * (1 + 1e-12)
    first = cluster.subset(sub_clusters(costs, cluster)[0])
    exact = asteroid_dp(costs, first, 16, space="classes")
    assert report.round_time_s <= exact.round_time_s * (1 + 1e-12)
    assert evaluate(report.plan, costs, cluster).round_time_s == pytest.approx(
        report.round_time_s, rel=1e-12)


def test_without_a_limit_a_middling_wide_space_gets_a_glimpse(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # [Note: a glimpse of every order]: without a limit, a wide space between
    # WIDE_SHORT_MAX and WIDE_ANYTIME_MAX pairs is searched for WIDE_UNLIMITED_S after
    # the paper's space; one that finishes in the time proves its plan optimal

    costs, cluster = _small_fleet(devices=6)
    size = wide_size(costs, cluster)
    monkeypatch.setattr(solver.anytime, "WIDE_EXACT_MAX", 1)
    monkeypatch.setattr(solver.anytime, "WIDE_SHORT_MAX", 1)
    monkeypatch.setattr(solver.anytime, "WIDE_ANYTIME_MAX", size)
    monkeypatch.setattr(solver.anytime, "WIDEN_MIN_DEVICES", 100)
    # (where the class bound counts the pools, [Note: the order's sizes after the bound]
    # decides instead)
    patch_planner(monkeypatch, "counts_pools", lambda space: False)
    report = search(costs, cluster, 16)
    assert "classes" in report.phases and report.complete
    assert report.bound is not None and report.bound.optimal
    wide = asteroid_dp(costs, cluster, 16, space="classes")
    assert report.round_time_s == pytest.approx(wide.round_time_s, rel=1e-12)
    # cut short at once: what the paper's space proved, and the size limit said
    monkeypatch.setattr(solver.anytime, "WIDE_UNLIMITED_S", 0.0)
    short = search(costs, cluster, 16)
    assert "classes" in short.phases and not short.complete
    assert short.bound is not None and short.bound.stopped == "size limit"
    assert short.bound.order_optimal
    order = asteroid_dp(costs, cluster, 16)
    assert short.round_time_s <= order.round_time_s * (1 + 1e-12)
    # above WIDE_ANYTIME_MAX it is not searched at all
    monkeypatch.setattr(solver.anytime, "WIDE_ANYTIME_MAX", size - 1)
    assert "classes" not in search(costs, cluster, 16).phases


def test_the_even_phase_adds_the_even_groups_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    # [Note: the even phase]: where it runs (here forced on a 5-device instance whose even
    # groups beat the capability order), the search returns a plan at least as good as
    # the even groups' optimum (a small model: the first pass takes every cut), the
    # report names the phase, and the bound still holds; switched off, the search keeps
    # the order's plan

    costs, cluster, batch = random_instance(1715, max_layers=6, max_devices=5, links=True)
    cluster = cluster.for_costs(costs)
    order = asteroid_dp(costs, cluster, batch, max_cuts=None)
    even = asteroid_dp(costs, cluster, batch, space="even", max_cuts=None)
    assert even.round_time_s < order.round_time_s * (1 - 1e-6)
    for name, value in (("WIDEN_MIN_DEVICES", 100), ("WIDE_EXACT_MAX", 1),
                        ("WIDE_SHORT_MAX", 1), ("WIDE_ANYTIME_MAX", 1)):
        monkeypatch.setattr(solver.anytime, name, value)
    monkeypatch.setattr(solver.anytime, "even_phase", lambda *args: True)
    patch_planner(monkeypatch, "counts_pools", lambda space: False)
    seen: list[tuple[float, str]] = []
    report = search(costs, cluster, batch, baselines=False,
                    progress=lambda done, what: seen.append((done, what)))
    assert "even" in report.phases and report.plan is not None
    # the bar says what the phase does
    assert any(what.startswith("even groups, micro-batch") for _, what in seen)
    assert report.round_time_s <= even.round_time_s * (1 + 1e-12)
    assert evaluate(report.plan, costs, cluster).round_time_s == pytest.approx(
        report.round_time_s, rel=1e-12)
    assert report.bound is not None and report.bound.bound_s <= report.round_time_s
    assert report.bound.order_optimal
    monkeypatch.setattr(solver.anytime, "even_phase", lambda *args: False)
    plain = search(costs, cluster, batch, baselines=False)
    assert "even" not in plain.phases
    assert plain.round_time_s == pytest.approx(order.round_time_s, rel=1e-12)


def test_the_even_phase_runs_on_jetson_mixes_only() -> None:
    # [Note: the even phase]: at least WIDEN_MIN_DEVICES devices, a wide space too large
    # to finish, and few pools: 16 or 32 boards of three types, not 8 (small), 64 (too
    # many pools) or a fleet whose wired pairs make many classes
    from solver.anytime import EVEN_POOLS_MAX, WIDEN_MIN_DEVICES, even_phase

    def boards(n: int, pairs: int = 0) -> Cluster:
        speeds = [(2.0, 1.4, 1.0)[i % 3] for i in range(n)]
        return make_cluster(speeds, links=[(f"d{i}", f"d{i + 1}", 1000.0)
                                           for i in range(0, 2 * pairs, 2)])

    costs = uniform_costs(4)

    def runs(cluster: Cluster) -> bool:
        from solver.space import device_classes

        pools = math.prod(len(c) + 1 for c in device_classes(cluster, costs))
        return even_phase(cluster, wide_size(costs, cluster), pools)

    assert WIDEN_MIN_DEVICES > 8 and not runs(boards(8))
    assert runs(boards(16)) and runs(boards(32))
    assert math.prod(c + 1 for c in (22, 21, 21)) > EVEN_POOLS_MAX and not runs(boards(64))
    assert not runs(boards(32, pairs=10))


def test_the_bound_gets_half_a_limit_where_it_counts_the_clusters_own_classes() -> None:
    # CLASS_BOUND_LIMIT_SHARE where the class bound counts the cluster's classes (three
    # speeds), CLASS_BOUND_COARSE_SHARE where wired pairs split them into classes too many
    # to count, so that it counts coarser ones
    import random

    from solver.anytime import CLASS_BOUND_COARSE_SHARE, CLASS_BOUND_LIMIT_SHARE, bound_share
    from solver.class_tables import bound_classes
    from solver.space import ClassSpace
    from tests.solver_cases import make_cluster, random_costs

    costs = random_costs(random.Random(3), 6)
    speeds = [1.7, 1.0, 0.4] * 11
    mix = ClassSpace(costs, make_cluster(speeds).for_costs(costs))
    assert len(mix.classes) == 3
    assert bound_share(mix) == CLASS_BOUND_LIMIT_SHARE
    pairs = [(f"d{2 * k}", f"d{2 * k + 1}", 1000.0) for k in range(11)]
    wired = ClassSpace(costs, make_cluster(speeds, links=pairs).for_costs(costs))
    coarse = bound_classes(wired)
    assert coarse is not None and len(coarse) < len(wired.classes)
    assert bound_share(wired) == CLASS_BOUND_COARSE_SHARE < CLASS_BOUND_LIMIT_SHARE
