"""Tests of the exhaustive enumerator (solver/brute.py) that serves as the DP's oracle."""

from __future__ import annotations

from dataclasses import replace

import pytest

from contracts.errors import PlanError
from solver.brute import _compositions, brute_force, enumerate_plans
from solver.dp import sorted_devices
from solver.evaluate import evaluate
from tests.solver_cases import (
    make_cluster,
    random_instance,
    scaled_column,
    typed_cluster,
    uniform_costs,
    with_ops,
)


def test_compositions() -> None:
    assert sorted(_compositions(3, 2)) == [(1, 1), (1, 2), (2, 1)]
    assert list(_compositions(2, 3)) == []
    assert sorted(_compositions(2, 1)) == [(1,), (2,)]


def test_enumerates_exactly_the_dp_space() -> None:
    costs = uniform_costs(3)
    cluster = make_cluster([1.0, 2.0])
    plans = list(enumerate_plans(costs, cluster, 2))
    order = [d.name for d in sorted_devices(cluster, costs.host_flops)]
    assert order == ["d1", "d0"]
    for plan in plans:
        used = list(plan.devices)
        assert used == order[:len(used)]  # consecutive slices from the most capable device
        assert plan.stages[-1].last == 2
    # micro-batch 1 (M=2): 1 stage on d1, 1 stage on d1+d0 is impossible (2 devices > 1
    # sample), 2 stages x 2 cuts; micro-batch 2 (M=1): 1 stage on d1 or d1+d0, 2 stages x 2
    shapes = {(p.micro_batch_size, tuple((s.layers, s.devices) for s in p.stages))
              for p in plans}
    assert len(shapes) == len(plans) == 3 + 4


def test_enumerates_the_dp_space_in_capability_order_with_columns() -> None:
    # d1 (jetson-nano) is measured 4x faster than the base on every layer, so it leads the
    # order although it declares speed 0.1; the custom d0 (speed 2) follows
    costs = with_ops(uniform_costs(3), ["conv", "matmul", "conv"])
    costs = replace(costs, columns=(scaled_column(costs, "jetson-nano",
                                                  {"conv": 0.25, "matmul": 0.25}),))
    cluster = typed_cluster(["custom", "jetson-nano"], [2.0, 0.1])
    assert [d.name for d in sorted_devices(cluster, costs)] == ["d1", "d0"]
    for plan in enumerate_plans(costs, cluster, 6):
        used = list(plan.devices)
        assert used == ["d1", "d0"][:len(used)]
        for stage in plan.stages:
            if stage.devices == ("d1", "d0"):
                assert stage.shares in ((4, 2), (1, 1), (2, 1))  # 4 : 2 by speed
    best = brute_force(costs, cluster, 6)
    assert best.plan is not None and best.plan.devices[0] == "d1"


def test_brute_force_picks_the_best_fitting_plan() -> None:
    costs, cluster, batch = random_instance(4)
    result = brute_force(costs, cluster, batch)
    assert result.plan is not None and result.plans_scored > 0
    assert result.plan.predicted is not None
    for plan in enumerate_plans(costs, cluster, batch):
        pred = evaluate(plan, costs, cluster)
        if pred.fits:
            assert pred.round_time_s >= result.round_time_s


def test_brute_force_refuses_large_instances() -> None:
    with pytest.raises(PlanError, match="brute force is for tiny instances"):
        brute_force(uniform_costs(20), make_cluster([1.0]), 4)


def test_wide_enumeration_tries_every_group_in_every_order() -> None:
    costs = uniform_costs(2)
    cluster = make_cluster([2.0, 1.0])
    plans = list(enumerate_plans(costs, cluster, 2, micro_batch_sizes=[1], wide=True))
    shapes = {tuple((s.layers, s.devices) for s in p.stages) for p in plans}
    # one stage on d0 or d1; two stages on (d0, d1) or (d1, d0): the slice space has only
    # the first of each
    assert shapes == {(((0, 1), ("d0",)),), (((0, 1), ("d1",)),),
                      (((0, 0), ("d0",)), ((1, 1), ("d1",))),
                      (((0, 0), ("d1",)), ((1, 1), ("d0",)))}
    narrow = {tuple((s.layers, s.devices) for s in p.stages)
              for p in enumerate_plans(costs, cluster, 2, micro_batch_sizes=[1])}
    assert narrow < shapes
