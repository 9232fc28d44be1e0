"""Tests of the planning MILP (solver/ilp.py): agreement with the DP, and the wide variant."""

from __future__ import annotations

import random
from typing import Any

import pytest

from contracts.errors import PlanError
from solver.dp import asteroid_dp
from solver.evaluate import evaluate
from solver.ilp import ilp_plan
from tests.solver_cases import (
    MIB,
    make_cluster,
    make_costs,
    random_cluster,
    random_column_instance,
    random_costs,
    random_instance,
    random_overhead_instance,
    uniform_costs,
)

pytest.importorskip("pulp")


def test_ilp_equals_dp_on_small_instances() -> None:
    # (the time limits below are generous: a loaded host; CBC's 10-s stalls were its
    # helper thread, [Note: CBC without threads] in solver.ilp)
    agree = pipelines = 0
    for seed in range(15):
        costs, cluster, batch = random_instance(500 + seed, max_layers=4, max_devices=3)
        dp = asteroid_dp(costs, cluster, batch, max_cuts=None)
        ilp = ilp_plan(costs, cluster, batch, time_limit_s=120)
        assert (dp.plan is None) == (ilp.plan is None), seed
        if dp.plan is None:
            assert ilp.status == "infeasible"
            continue
        assert ilp.status == "optimal", seed
        assert ilp.plan is not None
        ilp_round = evaluate(ilp.plan, costs, cluster).round_time_s
        assert ilp_round == pytest.approx(dp.round_time_s, rel=1e-6), seed
        assert ilp.round_time_s == pytest.approx(ilp_round, rel=1e-5), seed
        agree += 1
        pipelines += dp.plan.num_stages > 1
    assert agree >= 12 and pipelines >= 3


@pytest.mark.parametrize("seed", [1, 10, 23])
def test_ilp_equals_dp_where_the_drain_term_binds(seed: int) -> None:
    # instances whose optimal plan pays evaluate's drain correction (a pipeline with a
    # dominant stage before the last one and few micro-batches): the MILP models it too
    rng = random.Random(seed)
    costs = random_costs(rng, rng.randint(3, 4), param_scale=rng.choice([1.0, 10.0, 30.0]))
    cluster = random_cluster(rng, 3)
    batch = rng.choice([1, 2, 4])
    dp = asteroid_dp(costs, cluster, batch, max_cuts=None)
    assert dp.plan is not None
    pred = evaluate(dp.plan, costs, cluster)
    dom = pred.stages[pred.dominant_stage]
    assert dom.t_e > dp.plan.num_micro_batches * (dom.e_f + dom.e_b) * (1 + 1e-9)  # drain > 0
    ilp = ilp_plan(costs, cluster, batch, time_limit_s=120)
    assert ilp.status == "optimal" and ilp.plan is not None
    ilp_round = evaluate(ilp.plan, costs, cluster).round_time_s
    assert ilp_round == pytest.approx(dp.round_time_s, rel=1e-6)
    assert ilp.round_time_s == pytest.approx(ilp_round, rel=1e-5)


def _ilp_agrees_with_dp(instances: Any) -> tuple[int, int]:
    """(instances where the MILP is optimal with the DP's round, pipelines among them) over
    ``(costs, cluster, batch)`` triples."""
    agree = pipelines = 0
    for seed, (costs, cluster, batch) in enumerate(instances):
        dp = asteroid_dp(costs, cluster, batch, max_cuts=None)
        ilp = ilp_plan(costs, cluster, batch, time_limit_s=120)
        assert (dp.plan is None) == (ilp.plan is None), seed
        if dp.plan is None:
            continue
        assert ilp.status == "optimal" and ilp.plan is not None, seed
        ilp_round = evaluate(ilp.plan, costs, cluster).round_time_s
        assert ilp_round == pytest.approx(dp.round_time_s, rel=1e-6), seed
        assert ilp.round_time_s == pytest.approx(ilp_round, rel=1e-5), seed
        agree += 1
        pipelines += dp.plan.num_stages > 1
    return agree, pipelines


def test_ilp_equals_dp_with_link_latency() -> None:
    agree, _ = _ilp_agrees_with_dp(
        random_instance(900 + seed, max_layers=4, max_devices=3, latency=True)
        for seed in range(6))
    assert agree >= 4


def test_ilp_equals_dp_with_cost_columns() -> None:
    # devices of measured board types (their columns as measured, ratios differing per
    # layer kind) mixed with speed-scaled ones: the MILP searches the DP's space (same
    # capability order and shares) with the same per-device times
    agree, pipelines = _ilp_agrees_with_dp(
        random_column_instance(3000 + seed, max_layers=4, max_devices=3,
                               latency=seed % 2 == 1)
        for seed in range(10))
    assert agree >= 8 and pipelines >= 2


def test_ilp_equals_dp_with_runtime_overhead() -> None:
    # the per-call and per-round runtime overhead enters the MILP's stage times as it
    # enters the DP's (through Timing)
    agree, _ = _ilp_agrees_with_dp(
        random_overhead_instance(3100 + seed, max_layers=4, max_devices=3)
        for seed in range(6))
    assert agree >= 4


def test_ilp_wide_is_never_worse_than_the_dp() -> None:
    for seed in range(10):
        costs, cluster, batch = random_instance(700 + seed, max_layers=3, max_devices=3)
        dp = asteroid_dp(costs, cluster, batch, max_cuts=None)
        wide = ilp_plan(costs, cluster, batch, wide=True, time_limit_s=120)
        if dp.plan is not None:
            assert wide.plan is not None
            wide_round = evaluate(wide.plan, costs, cluster).round_time_s
            assert wide_round <= dp.round_time_s * (1 + 1e-6)


def test_ilp_wide_escapes_the_device_order() -> None:
    # the fastest device cannot hold the layer, so every plan of the DP's space (which
    # starts at the fastest device) fails; any subset (ilp-wide) can skip it
    costs = make_costs([(0.0, 0.01)], [(0.0, 0.02)], [16 * MIB], [MIB], [])
    cluster = make_cluster([2.0, 1.0, 1.0], memory_mib=[8.0, 256.0, 256.0])
    assert asteroid_dp(costs, cluster, 4).plan is None
    assert ilp_plan(costs, cluster, 4).plan is None
    wide = ilp_plan(costs, cluster, 4, wide=True)
    assert wide.status == "optimal" and wide.plan is not None
    assert "d0" not in wide.plan.devices
    assert evaluate(wide.plan, costs, cluster).fits


def test_ilp_wide_refuses_large_instances() -> None:
    with pytest.raises(PlanError, match="ilp-wide.*small instances"):
        ilp_plan(uniform_costs(20), make_cluster([1.0]), 4, wide=True)


def test_cbc_runs_without_a_helper_thread() -> None:
    # [Note: CBC without threads] in solver.ilp: `-threads 1` made CBC stall 10 s now and
    # then; the command line carries no thread option (HiGHS, where installed, is not CBC)
    from solver.ilp import _solver

    command, name = _solver(30.0)
    if name == "CBC":
        options = command.getOptions()
        assert not any(option.startswith("threads") for option in options), options
        assert "ratio 0.0" in options     # (still proven optimal)


def test_ilp_reports_infeasible() -> None:
    costs = uniform_costs(2, param_bytes=64 * MIB)
    result = ilp_plan(costs, make_cluster([1.0], memory_mib=16.0), 2)
    assert result.plan is None and result.status == "infeasible"


def test_ilp_wide_equals_the_classes_dp() -> None:
    # the DP over every order (counts of interchangeable devices) searches ilp-wide's
    # space: where the MILP proves its optimum, the two agree
    agree = 0
    for seed in range(8):
        costs, cluster, batch = random_instance(1400 + seed, max_layers=3, max_devices=3,
                                                links=True, latency=seed % 2 == 0)
        wide_dp = asteroid_dp(costs, cluster, batch, space="classes", max_cuts=None)
        wide = ilp_plan(costs, cluster, batch, wide=True, time_limit_s=120)
        assert (wide_dp.plan is None) == (wide.plan is None), seed
        if wide.plan is None or wide.status != "optimal":
            continue
        wide_round = evaluate(wide.plan, costs, cluster).round_time_s
        assert wide_dp.round_time_s == pytest.approx(wide_round, rel=1e-6), seed
        agree += 1
    assert agree >= 6


def test_milp_size_bounds_the_built_model() -> None:
    from solver.ilp import milp_size
    from solver.space import candidate_cuts

    for seed in range(5):
        costs, cluster, batch = random_instance(1500 + seed, max_layers=6, max_devices=4)
        for ends in (None, candidate_cuts(costs, 2)):
            result = ilp_plan(costs, cluster, batch, time_limit_s=60, ends=ends)
            assert result.candidates <= milp_size(costs, cluster, batch, ends=ends)
    costs, cluster, batch = random_instance(1500, max_layers=6, max_devices=4)
    assert milp_size(costs, cluster, batch, ends=[]) < milp_size(costs, cluster, batch)
