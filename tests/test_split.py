"""Tests of Algorithm 1 (solver/split.py): proportional integer shares capped by memory."""

from __future__ import annotations

import itertools
import random

import pytest

from asteroid_fx.errors import PlanError
from solver.evaluate import LayerSums, stage_memory_bytes
from solver.split import cap_from_parts, memory_cap, split_shares, split_stage
from tests.solver_cases import MIB, make_costs


def _best_max_load(mb: int, speeds: list[float], caps: list[int]) -> float:
    best = float("inf")
    for shares in itertools.product(*(range(1, min(c, mb) + 1) for c in caps)):
        if sum(shares) == mb:
            best = min(best, max(b / v for b, v in zip(shares, speeds, strict=True)))
    return best


def test_shares_follow_speed() -> None:
    assert split_shares(6, [2.0, 1.0]) == (4, 2)
    assert split_shares(7, [2.0, 1.0]) == (5, 2)
    assert split_shares(4, [1.0, 1.0, 1.0, 1.0]) == (1, 1, 1, 1)
    assert split_shares(5, [1.0]) == (5,)


def test_every_device_gets_at_least_one_sample() -> None:
    assert split_shares(3, [10.0, 0.1, 0.1]) == (1, 1, 1)
    assert split_shares(2, [1.0, 1.0, 1.0]) is None  # more devices than samples


def test_memory_caps_redistribute_overflow() -> None:
    assert split_shares(6, [2.0, 1.0], caps=[2, 10]) == (2, 4)
    assert split_shares(6, [2.0, 1.0], caps=[2, 3]) is None
    assert split_shares(6, [2.0, 1.0], caps=[0, 10]) is None


def test_greedy_is_optimal_on_random_cases() -> None:
    rng = random.Random(1)
    for _ in range(200):
        n = rng.randint(1, 3)
        mb = rng.randint(n, 9)
        speeds = [round(rng.uniform(0.2, 3.0), 2) for _ in range(n)]
        caps = [rng.randint(1, 9) for _ in range(n)]
        shares = split_shares(mb, speeds, caps)
        best = _best_max_load(mb, speeds, caps)
        if shares is None:
            assert best == float("inf")
            continue
        assert sum(shares) == mb and all(1 <= b <= c for b, c in zip(shares, caps, strict=True))
        assert max(b / v for b, v in zip(shares, speeds, strict=True)) == pytest.approx(best)


def _costs():  # type: ignore[no-untyped-def]
    return make_costs([(0.0, 0.01)] * 3, [(0.0, 0.02)] * 3, [MIB, 2 * MIB, MIB],
                      [MIB // 2, MIB, MIB // 4], [1024, 1024])


def test_memory_cap_is_the_exact_boundary() -> None:
    sums = LayerSums.of(_costs())
    for capacity in (20 * MIB, 30 * MIB, 100 * MIB):
        cap = memory_cap(sums, 0, 2, 2, 1.0, capacity)
        assert stage_memory_bytes(sums, 0, 2, cap, 2, 1.0) <= capacity
        assert stage_memory_bytes(sums, 0, 2, cap + 1, 2, 1.0) > capacity
    assert memory_cap(sums, 0, 2, 2, 1.0, 8 * MIB) == 0  # the weights alone do not fit
    assert cap_from_parts(1000, 0, 2000) > 10**9  # no activations: no limit


def test_split_stage_uses_memory_only_when_needed() -> None:
    sums = LayerSums.of(_costs())
    roomy = split_stage(sums, 0, 2, [2.0, 1.0], [1024 * MIB, 1024 * MIB], 6, 1)
    assert roomy == (4, 2)
    # the fast device can hold only 2 samples of layers 0..2 at one micro-batch in flight
    fixed = stage_memory_bytes(sums, 0, 2, 2, 1, 0.0)
    capped = split_stage(sums, 0, 2, [2.0, 1.0], [fixed, 1024 * MIB], 6, 1)
    assert capped == (2, 4)
    assert split_stage(sums, 0, 2, [2.0, 1.0], [MIB, MIB], 6, 1) is None
    assert split_stage(sums, 0, 2, [2.0, 1.0, 1.0], [1024 * MIB] * 3, 2, 1) is None


def test_resplit_keeps_the_stages_and_splits_each_group_again() -> None:
    from solver.api import plan as plan_fn
    from solver.evaluate import evaluate
    from solver.split import resplit
    from tests.solver_cases import make_cluster, uniform_costs

    costs = uniform_costs(6)
    cluster = make_cluster([2.0, 1.0, 1.0, 1.0])
    plan = plan_fn(costs, cluster, 24, planner="dp-only")
    again = resplit(plan, costs, cluster, 12)
    assert again.micro_batch_size == 12 and again.num_micro_batches == 2
    assert [s.layers for s in again.stages] == [s.layers for s in plan.stages]
    assert [s.devices for s in again.stages] == [s.devices for s in plan.stages]
    for stage in again.stages:   # Algorithm 1 at 12 samples: shares by speed
        assert sum(stage.shares) == 12
        assert stage.shares == split_shares(12, [2.0, 1.0, 1.0, 1.0][:len(stage.shares)])
    assert again.predicted is not None
    assert again.predicted.round_time_s == evaluate(again, costs, cluster).round_time_s
    for bad, match in ((0, "integer >= 1"), (5, "does not divide"),
                       (48, "micro-batch 48 is larger than the batch 24"),
                       (2, "smaller than stage 0's group")):
        with pytest.raises(PlanError, match=match):
            resplit(plan, costs, cluster, bad)


def test_resplit_names_the_stage_that_does_not_fit() -> None:
    from solver.api import plan as plan_fn
    from solver.split import resplit
    from tests.solver_cases import make_cluster, uniform_costs

    costs = uniform_costs(4)
    plan = plan_fn(costs, make_cluster([1.0]), 8, micro_batch_size=1)
    assert plan.predicted is not None
    tight = make_cluster([1.0], memory_mib=plan.predicted.peak_memory_bytes["d0"] / MIB * 1.01)
    assert resplit(plan, costs, tight, 1).micro_batch_size == 1
    with pytest.raises(PlanError, match="does not fit on d0 at micro-batch 8"):
        resplit(plan, costs, tight, 8)
