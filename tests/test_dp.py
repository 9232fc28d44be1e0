"""Tests of the Asteroid DP (solver/dp.py): the combine rule, exactness against brute force,
memory safety, cut candidates and speed."""

from __future__ import annotations

import math
import random
import time

import pytest

from asteroid_fx.errors import PlanError
from solver.brute import brute_force
from solver.dp import (
    asteroid_dp,
    candidate_cuts,
    dominates,
    hiding_ratio,
    micro_batch_choices,
    no_fit_error,
    prepend,
    sorted_devices,
)
from solver.evaluate import evaluate, round_terms
from tests.solver_cases import (
    MIB,
    make_cluster,
    make_costs,
    random_cluster,
    random_costs,
    random_instance,
    uniform_costs,
)


def _direct_round(e_f: list[float], e_b: list[float], t_a: list[float], m: int) -> float:
    t_w, t_e, _ = round_terms(e_f, e_b, m)
    return max(w + e + a for w, e, a in zip(t_w, t_e, t_a, strict=True))


@pytest.mark.parametrize("integer_times", [False, True])
def test_prepend_rule_matches_the_round_formula(integer_times: bool) -> None:
    """Folding ``prepend`` from the last stage gives exactly the DESIGN.md round latency,
    ties included (integer times make many exact ties)."""
    rng = random.Random(5)
    for _ in range(2000):
        s = rng.randint(1, 6)
        m = rng.randint(1, 8)
        if integer_times:
            e_f = [float(rng.randint(0, 3)) for _ in range(s)]
            e_b = [float(rng.randint(0, 3)) for _ in range(s)]
            t_a = [float(rng.choice([0, 0, 1, 5])) for _ in range(s)]
        else:
            e_f = [rng.uniform(0, 1) for _ in range(s)]
            e_b = [rng.uniform(0, 2) for _ in range(s)]
            t_a = [rng.choice([0.0, rng.uniform(0, 3)]) for _ in range(s)]
        summary = None
        for k in reversed(range(s)):
            summary = prepend(m, e_f[k], e_b[k], t_a[k], summary)
        assert summary is not None
        assert summary[0] == pytest.approx(_direct_round(e_f, e_b, t_a, m), rel=1e-12, abs=1e-12)
        assert summary[1] == max(f + b for f, b in zip(e_f, e_b, strict=True))


@pytest.mark.parametrize("rho", [0.0, 1 / 3.5])
def test_prepend_is_monotone_in_the_summary(rho: float) -> None:
    """The Pareto pruning relies on: ``dominates(a, b)`` => after prepending the same
    stages, ``a``'s round latency is never larger (and, up to rounding, ``a`` still
    dominates). Integer times and few stages make the dominant-crossing cases frequent;
    with ``rho > 0`` every stage has ``E_b = k E_f + c``, ``E_f = f + c``, ``k <= 2.5``."""
    rng = random.Random(6)
    checked = crossing = 0
    for trial in range(6000):
        m = rng.randint(1, 6)
        ints = trial % 2 == 0

        def stage(ints: bool = ints) -> tuple[float, float, float]:
            a = float(rng.choice([0, 0, 1, 4])) if ints else rng.choice([0.0, rng.uniform(0, 2)])
            if rho > 0:
                f, c = float(rng.randint(0, 2)), float(rng.randint(0, 1))
                return f + c, f * rng.choice([1.5, 2.0, 2.5]) + c, a
            if ints:
                return float(rng.randint(0, 3)), float(rng.randint(0, 3)), a
            return rng.uniform(0, 1), rng.uniform(0, 2), a

        pipes = []
        for _ in range(2):
            summary = None
            for f, b, a in reversed([stage() for _ in range(rng.randint(1, 4))]):
                summary = prepend(m, f, b, a, summary)
            pipes.append(summary)
        lo, hi = pipes
        assert lo is not None and hi is not None
        if not dominates(lo, hi, m, rho):
            continue
        checked += 1
        for _ in range(rng.randint(1, 3)):
            f, b, a = stage()
            crossing += lo[1] < f + b <= hi[1]
            lo, hi = prepend(m, f, b, a, lo), prepend(m, f, b, a, hi)
            assert lo[0] <= hi[0] + 1e-9
            assert all(x <= y + 1e-9 for x, y in zip(lo, hi, strict=True))
            assert lo.sum_x <= hi.sum_x + 1e-9 and lo.stages >= hi.stages
            h = 1 + (min(m, lo.stages + 1) - 1) * rho
            assert lo[1] == hi[1] or lo.sum_x - hi[2] <= h * lo[1] + 1e-9
    assert checked > 300 and crossing > 20


def test_hiding_ratio_bounds_every_stage() -> None:
    costs = make_costs([(0.001, 0.01), (0.0, 0.02)], [(0.002, 0.025), (0.0, 0.03)],
                       [0, 0], [1024, 1024], [0])
    # forward/backward ratios 0.5, 0.4 and 2/3: rho = min(0.4 / 1.4, 1 / (1 + 2/3))
    assert hiding_ratio(costs) == pytest.approx(0.4 / 1.4)
    assert hiding_ratio(uniform_costs(3)) == pytest.approx(1 / 3)  # backward = 2 x forward
    free_bwd = make_costs([(0.0, 0.01)], [(0.0, 0.0)], [0], [1024], [])
    assert hiding_ratio(free_bwd) == 0.0


def test_prepend_needs_the_full_summary() -> None:
    with pytest.raises(TypeError, match="needs the PipelineSummary"):
        prepend(2, 1.0, 1.0, 0.0, (2.0, 2.0, 0.0, 0.0))
    one = prepend(2, 1.0, 2.0, 0.5, None)
    assert tuple(one) == (6.5, 3.0, 0.0, 0.5) and one.sum_x == 3.0 and one.stages == 1


def test_drain_breaks_the_plain_four_number_dominance() -> None:
    """Why ``dominates`` needs more than ``<=`` in (R, Xm, Pre, G): ``lo`` is smaller in
    all four numbers, but a prepended stage becomes dominant over ``lo`` only and then
    pays the drain of ``lo``'s long tail, which ``hi``'s own dominant hides."""
    m = 4
    hi = None
    for f, b in reversed([(5.0, 5.0)] + [(0.5, 0.5)] * 6):
        hi = prepend(m, f, b, 0.0, hi)
    lo = None
    for f, b in reversed([(4.9, 4.9)] + [(0.5, 0.5)] * 6):
        lo = prepend(m, f, b, 0.0, lo)
    assert lo is not None and hi is not None
    assert all(x <= y for x, y in zip(lo, hi, strict=True))
    assert not dominates(lo, hi, m)
    new_lo, new_hi = prepend(m, 0.0, 10.0, 0.0, lo), prepend(m, 0.0, 10.0, 0.0, hi)
    assert new_lo[0] > new_hi[0]
    assert new_lo[0] == pytest.approx(_direct_round([0.0, 4.9] + [0.5] * 6,
                                                    [10.0, 4.9] + [0.5] * 6, [0.0] * 8, m))


@pytest.mark.parametrize("size", [(6, 4), (7, 5)])
def test_dp_equals_brute_force_on_random_instances(size: tuple[int, int]) -> None:
    agree = multi_stage = 0
    for seed in range(300):
        costs, cluster, batch = random_instance(seed + 10_000 * size[0], max_layers=size[0],
                                                max_devices=size[1])
        dp = asteroid_dp(costs, cluster, batch, max_cuts=None)
        brute = brute_force(costs, cluster, batch)
        assert (dp.plan is None) == (brute.plan is None), seed
        if dp.plan is None:
            continue
        pred = evaluate(dp.plan, costs, cluster)
        assert pred.fits, seed
        assert pred.round_time_s == pytest.approx(brute.round_time_s, rel=1e-9), seed
        assert dp.round_time_s == pytest.approx(pred.round_time_s, rel=1e-9), seed
        agree += 1
        multi_stage += dp.plan.num_stages > 1
    assert agree >= 240
    assert multi_stage >= 40  # the comparison covers real pipelines, not only data parallelism


def test_dp_plans_fit_in_memory() -> None:
    for seed in range(40):
        costs, cluster, batch = random_instance(1000 + seed, max_layers=10, max_devices=5,
                                                tight_memory=True)
        result = asteroid_dp(costs, cluster, batch, optimizer_state_factor=1.0)
        if result.plan is not None:
            pred = evaluate(result.plan, costs, cluster)
            assert pred.fits and not pred.memory_shortfall()


def test_dp_uses_a_pipeline_when_all_reduce_is_expensive() -> None:
    # 4 identical layers with big weights on 2 identical devices at 10 Mbps: the
    # all-reduce of data parallelism costs far more than sending small activations
    costs = uniform_costs(4, param_bytes=8 * MIB, cut_bytes=1024)
    cluster = make_cluster([1.0, 1.0], bandwidth_mbps=10.0)
    plan = asteroid_dp(costs, cluster, 8).plan
    assert plan is not None
    assert plan.num_stages == 2
    assert [s.layers for s in plan.stages] == [(0, 1), (2, 3)]


def test_dp_uses_data_parallelism_when_weights_are_free() -> None:
    costs = uniform_costs(4, param_bytes=0, cut_bytes=1024 * 1024)
    cluster = make_cluster([1.0, 1.0], bandwidth_mbps=10.0)
    plan = asteroid_dp(costs, cluster, 8).plan
    assert plan is not None
    assert plan.num_stages == 1 and plan.stages[0].devices == ("d0", "d1")


def test_devices_sorted_by_capability() -> None:
    cluster = make_cluster([1.0, 2.0, 2.0, 0.5], memory_mib=[64, 32, 128, 64])
    assert [d.name for d in sorted_devices(cluster, 1e9)] == ["d2", "d1", "d0", "d3"]


def test_micro_batch_choices() -> None:
    assert micro_batch_choices(12, None) == [1, 2, 3, 4, 6, 12]
    assert micro_batch_choices(12, [4, 2, 4]) == [2, 4]
    with pytest.raises(PlanError, match=r"micro-batch sizes \[5\] do not divide"):
        micro_batch_choices(12, [5])
    with pytest.raises(PlanError, match="batch_size must be >= 1"):
        micro_batch_choices(0, None)


def test_candidate_cuts() -> None:
    costs = random_costs(random.Random(3), 60)
    assert candidate_cuts(costs, None) == list(range(59))
    assert candidate_cuts(costs, 100) == list(range(59))
    cuts = candidate_cuts(costs, 10)
    assert 1 <= len(cuts) <= 10
    assert cuts == sorted(set(cuts)) and all(0 <= c < 59 for c in cuts)


def test_incumbent_and_device_order() -> None:
    costs, cluster, batch = random_instance(11)
    best = asteroid_dp(costs, cluster, batch, max_cuts=None)
    assert best.plan is not None
    again = asteroid_dp(costs, cluster, batch, max_cuts=None, incumbent=best.round_time_s)
    assert again.plan is None  # nothing strictly better exists
    names = [d.name for d in cluster.devices]
    one = asteroid_dp(costs, cluster, batch, device_order=names[-1:])
    assert one.plan is not None and one.plan.devices == (names[-1],)
    with pytest.raises(PlanError, match="repeats a device"):
        asteroid_dp(costs, cluster, batch, device_order=[names[0], names[0]])


def test_nothing_fits_gives_none_and_a_clear_error() -> None:
    costs = uniform_costs(3, param_bytes=64 * MIB)
    cluster = make_cluster([1.0, 2.0], memory_mib=[100.0, 120.0])
    result = asteroid_dp(costs, cluster, 4)
    assert result.plan is None and math.isinf(result.round_time_s)
    err = no_fit_error(costs, cluster, 4)
    assert isinstance(err, PlanError)
    assert "device 'd" in str(err) and "short" in str(err)
    assert "smaller batch" in str(err)


def test_large_model_is_fast() -> None:
    rng = random.Random(7)
    costs = random_costs(rng, 200)
    cluster = random_cluster(rng, 8)
    start = time.perf_counter()
    result = asteroid_dp(costs, cluster, 32)
    elapsed = time.perf_counter() - start
    assert result.plan is not None
    assert evaluate(result.plan, costs, cluster).fits
    assert elapsed < 10.0  # about 0.4 s on one core of the development host
