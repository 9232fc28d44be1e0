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
    micro_batch_choices,
    no_fit_error,
    prepend,
    sorted_devices,
)
from solver.evaluate import evaluate, round_terms
from tests.solver_cases import (
    MIB,
    make_cluster,
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


def test_prepend_is_monotone_in_the_summary() -> None:
    """The Pareto pruning relies on: a <= b componentwise => prepend(a) <= prepend(b)."""
    rng = random.Random(6)
    for _ in range(3000):
        m = rng.randint(1, 6)
        pipes = []
        for _ in range(2):
            s = rng.randint(1, 4)
            stages = [(rng.uniform(0, 1), rng.uniform(0, 2), rng.choice([0.0, rng.uniform(0, 2)]))
                      for _ in range(s)]
            summary = None
            for f, b, a in reversed(stages):
                summary = prepend(m, f, b, a, summary)
            pipes.append(summary)
        lo, hi = pipes
        assert lo is not None and hi is not None
        if not all(x <= y for x, y in zip(lo, hi, strict=True)):
            continue
        f, b, a = rng.uniform(0, 1), rng.uniform(0, 2), rng.uniform(0, 1)
        new_lo, new_hi = prepend(m, f, b, a, lo), prepend(m, f, b, a, hi)
        assert all(x <= y + 1e-12 for x, y in zip(new_lo, new_hi, strict=True))


@pytest.mark.parametrize("size", [(6, 4), (7, 5)])
def test_dp_equals_brute_force_on_random_instances(size: tuple[int, int]) -> None:
    agree = multi_stage = 0
    for seed in range(150):
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
    assert agree >= 120
    assert multi_stage >= 30  # the comparison covers real pipelines, not only data parallelism


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
