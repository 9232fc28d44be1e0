"""Tests of per-device times from cost columns (solver/timing.py): columns taken as measured,
speed-scaled base times otherwise, the capability and bound speeds, and the warning."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import replace
from typing import Any

import pytest

import solver.timing as timing_module
from contracts.plan import Plan, Stage
from contracts.table import DeviceColumn, RuntimeOverhead, TimeFit
from solver.dp import asteroid_dp, hiding_ratio, sorted_devices
from solver.evaluate import LayerSums, evaluate
from solver.timing import Timing, column_bound_speed, column_speed
from tests.solver_cases import (
    make_cluster,
    random_cluster,
    random_column_instance,
    random_columns,
    random_costs,
    scaled_column,
    typed_cluster,
    uniform_costs,
    with_ops,
)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test sees the unmeasured-type warning as if for the first time."""
    monkeypatch.setattr(timing_module, "_warned", set())


def _plan(costs, stages, batch, m):  # type: ignore[no-untyped-def]
    return Plan(model_hash=costs.model_hash, cluster_hash="c", batch_size=batch,
                micro_batch_size=batch // m, num_micro_batches=m, stages=tuple(stages),
                num_layers=costs.num_layers)


def test_without_columns_the_times_are_the_scaled_base_bit_for_bit() -> None:
    rng = random.Random(1)
    for _ in range(20):
        costs = random_costs(rng, rng.randint(1, 12))
        costs = replace(costs, update_s_per_byte=rng.choice([0.0, 1e-9]))
        cluster = random_cluster(rng, rng.randint(1, 5))
        timing = Timing.of(costs, cluster)
        sums = LayerSums.of(costs)
        speeds = cluster.speeds(costs.host_flops)
        assert not timing.has_columns and timing.base == sums
        assert timing.speeds == speeds and timing.bound_speeds == speeds
        names = list(cluster.names)
        for _ in range(30):
            first = rng.randrange(costs.num_layers)
            last = rng.randrange(first, costs.num_layers)
            group = rng.sample(names, rng.randint(1, len(names)))
            shares = [rng.randint(1, 9) for _ in group]
            for d, b in zip(group, shares, strict=True):
                assert timing.fwd_time(d, first, last, b) == sums.fwd_time(first, last, b,
                                                                             speeds[d])
                assert timing.bwd_time(d, first, last, b) == sums.bwd_time(first, last, b,
                                                                             speeds[d])
            assert timing.compute(first, last, group, shares) == sums.compute(
                first, last, shares, [speeds[d] for d in group])
            assert timing.group_update_time(first, last, group) == sums.update_time(
                first, last, min(speeds[d] for d in group))


def test_columns_for_types_outside_the_cluster_change_nothing() -> None:
    rng = random.Random(2)
    for seed in range(10):
        costs, cluster, batch = random_column_instance(seed)
        plain = replace(costs, columns=())
        customs = make_cluster([rng.uniform(0.2, 2.0) for _ in cluster.devices],
                               memory_mib=1024.0)
        with_cols = asteroid_dp(costs, customs, batch, max_cuts=None)
        without = asteroid_dp(plain, customs, batch, max_cuts=None)
        assert with_cols.round_time_s == without.round_time_s
        assert with_cols.plan is not None and without.plan is not None
        assert with_cols.plan.stages == without.plan.stages
        assert evaluate(with_cols.plan, costs, customs) == evaluate(with_cols.plan, plain,
                                                                    customs)


def test_a_device_with_a_column_takes_it_as_measured() -> None:
    costs = with_ops(uniform_costs(3, param_bytes=1000), ["conv", "matmul", "conv"])
    costs = replace(costs, update_s_per_byte=1e-6)
    col = scaled_column(costs, "jetson-nano", {"conv": 0.5, "matmul": 4.0}, update_factor=3.0)
    costs = replace(costs, columns=(col,))
    cluster = typed_cluster(["jetson-nano", "custom"], [7.0, 2.0])
    timing = Timing.of(costs, cluster)
    assert timing.has_columns and timing.device("d0").column == "jetson-nano"
    # layers 0..2 at 3 samples: (0.5 + 4 + 0.5) x 0.01 x 3 forward, x 0.02 x 3 backward
    assert timing.fwd_time("d0", 0, 2, 3) == pytest.approx(5.0 * 0.01 * 3, rel=1e-12)
    assert timing.bwd_time("d0", 0, 2, 3) == pytest.approx(5.0 * 0.02 * 3, rel=1e-12)
    assert timing.update_time("d0", 0, 2) == pytest.approx(3000 * 3e-6, rel=1e-12)
    # the custom device scales the base times by its declared speed
    assert timing.fwd_time("d1", 0, 2, 3) == pytest.approx(3 * 0.01 * 3 / 2.0, rel=1e-12)
    assert timing.update_time("d1", 0, 2) == pytest.approx(3000 * 1e-6 / 2.0, rel=1e-12)
    # layer 1 ("matmul") on one sample each: the column device (4x slower) decides
    assert timing.compute(1, 1, ["d0", "d1"], [1, 1]) == (
        pytest.approx(4.0 * 0.01), pytest.approx(4.0 * 0.02))
    assert timing.group_update_time(0, 2, ["d0", "d1"]) == pytest.approx(3000 * 3e-6)


@pytest.mark.parametrize("declared", [0.05, 1.0, 40.0])
def test_a_device_with_a_column_ignores_its_declared_speed(declared: float) -> None:
    rng = random.Random(3)
    costs = random_columns(rng, random_costs(rng, 6), ["jetson-nano"])
    reference = typed_cluster(["jetson-nano", "custom"], [1.0, 0.8])
    cluster = typed_cluster(["jetson-nano", "custom"], [declared, 0.8])
    plan = _plan(costs, [Stage((0, 2), ("d0",), (4,)), Stage((3, 5), ("d1",), (4,))], 8, 2)
    assert evaluate(plan, costs, cluster) == evaluate(plan, costs, reference)
    assert Timing.of(costs, cluster).speeds == Timing.of(costs, reference).speeds
    ours, theirs = (asteroid_dp(costs, c, 8, max_cuts=None) for c in (cluster, reference))
    assert ours.round_time_s == theirs.round_time_s
    assert ours.plan is not None and theirs.plan is not None
    assert ours.plan.stages == theirs.plan.stages


@pytest.mark.parametrize("m", [1, 4])
def test_a_single_device_plan_predicts_the_columns_own_sum(m: int) -> None:
    """One stage on one measured device: round = M (F + B) + update, with F and B summed
    straight from the column's fits (not from prefix sums)."""
    rng = random.Random(4)
    for _ in range(10):
        costs = random_columns(rng, random_costs(rng, rng.randint(1, 10)),
                               ["jetson-nano", "jetson-tx2"])
        costs = replace(costs, update_s_per_byte=1e-9)
        costs = replace(costs, columns=tuple(replace(c, update_s_per_byte=2e-9 * (k + 1))
                                             for k, c in enumerate(costs.columns)))
        for col in costs.columns:
            cluster = typed_cluster([col.device_type], [rng.uniform(0.1, 10.0)],
                                    memory_mib=4096.0)
            micro = rng.randint(1, 8)
            plan = _plan(costs, [Stage((0, costs.num_layers - 1), ("d0",), (micro,))],
                         micro * m, m)
            f = sum(fit.at(micro) for fit in col.fwd)
            b = sum(fit.at(micro) for fit in col.bwd)
            update = costs.total_param_bytes * col.update_s_per_byte
            pred = evaluate(plan, costs, cluster)
            assert pred.round_time_s == pytest.approx(m * (f + b) + update, rel=1e-9)
            assert pred.stages[0].t_a == pytest.approx(update, rel=1e-9)


def test_a_table_measured_on_a_board_is_that_types_column() -> None:
    base = uniform_costs(2, param_bytes=1000)
    costs = replace(base, device_type="jetson-nano", update_s_per_byte=1e-6)
    cluster = typed_cluster(["jetson-nano", "local", "jetson-tx2"], [9.0, 0.5, 2.0])
    timing = Timing.of(costs, cluster)
    assert timing.device("d0").column == "jetson-nano" and timing.device("d0").speed == 1.0
    assert timing.fwd_time("d0", 0, 1, 2) == pytest.approx(2 * 0.01 * 2)
    assert timing.fwd_time("d1", 0, 1, 2) == pytest.approx(2 * 0.01 * 2 / 0.5)
    assert timing.fwd_time("d2", 0, 1, 2) == pytest.approx(2 * 0.01 * 2 / 2.0)


def test_capability_speed_is_the_whole_model_ratio() -> None:
    costs = with_ops(uniform_costs(4), ["conv", "conv", "matmul", "matmul"])
    fast = scaled_column(costs, "jetson-tx2", {"conv": 0.25, "matmul": 0.25})
    mixed = scaled_column(costs, "jetson-nano", {"conv": 0.5, "matmul": 1.5})
    costs = replace(costs, columns=(mixed, fast))
    assert column_speed(costs, fast, 1.0) == pytest.approx(4.0)
    assert column_speed(costs, mixed, 1.0) == pytest.approx(1.0)  # (2 + 2) / (1 + 3)
    cluster = typed_cluster(["jetson-nano", "custom", "jetson-tx2"], [10.0, 2.0, 0.1])
    assert Timing.of(costs, cluster).speeds == pytest.approx({"d0": 1.0, "d1": 2.0,
                                                              "d2": 4.0})
    assert [d.name for d in sorted_devices(cluster, costs)] == ["d2", "d1", "d0"]
    # degenerate columns (no time at all) keep the declared speed
    free = DeviceColumn("jetson-xavier-nx", tuple(TimeFit(0.0, 0.0) for _ in range(4)),
                        tuple(TimeFit(0.0, 0.0) for _ in range(4)))
    assert column_speed(costs, free, 3.0) == 3.0
    assert column_bound_speed(costs, free) == math.inf


def test_bound_speed_bounds_every_stage() -> None:
    """``u_d``: no stage of any layers, share and direction is faster on ``d`` than the
    base times over ``u_d`` (the DP's lower bounds rely on it), in floats."""
    rng = random.Random(5)
    for _ in range(30):
        costs, cluster, _ = random_column_instance(rng.randrange(10**6), max_layers=10)
        timing = Timing.of(costs, cluster)
        base = timing.base
        for name, t in timing.devices.items():
            assert t.bound_speed >= t.speed * (1.0 - 1e-12)
            for first in range(costs.num_layers):
                for last in range(first, costs.num_layers):
                    for share in (1, 3, 16):
                        for own, ref in ((timing.fwd_time, base.fwd_time),
                                         (timing.bwd_time, base.bwd_time)):
                            assert own(name, first, last, share) >= ref(
                                first, last, share, t.bound_speed)


def test_hiding_ratio_covers_every_column() -> None:
    """``min(E_f, E_b) >= rho (E_f + E_b)`` for groups mixing columns and scaled devices."""
    rng = random.Random(6)
    for seed in range(40):
        costs, cluster, _ = random_column_instance(seed, max_layers=8)
        rho = hiding_ratio(costs, cluster)
        timing = Timing.of(costs, cluster)
        if any(t.column is None for t in timing.devices.values()):  # the base counts too
            assert rho <= hiding_ratio(costs)
        for _ in range(20):
            first = rng.randrange(costs.num_layers)
            last = rng.randrange(first, costs.num_layers)
            group = rng.sample(list(cluster.names), rng.randint(1, len(cluster.names)))
            cf, cb = timing.compute(first, last, group, [rng.randint(1, 6) for _ in group])
            assert min(cf, cb) >= rho * (cf + cb)


def test_an_unmeasured_type_is_scaled_with_one_warning(caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    rng = random.Random(7)
    costs = random_columns(rng, random_costs(rng, 4), ["jetson-nano"])
    cluster = typed_cluster(["jetson-nano", "jetson-xavier-nx", "jetson-xavier-nx", "local",
                             "custom"], [1.0, 2.5, 2.5, 1.0, 0.5])
    with caplog.at_level(logging.WARNING, logger="solver.timing"):
        timing = Timing.of(costs, cluster)
        Timing.of(costs, cluster)
        evaluate(_plan(costs, [Stage((0, 3), ("d1",), (2,))], 2, 1), costs, cluster)
    warnings = [r.getMessage() for r in caplog.records if r.name == "solver.timing"]
    assert len(warnings) == 1
    assert warnings[0].startswith("device type jetson-xavier-nx has no measured column in "
                                  "the cost table")
    assert "by speed 2.5" in warnings[0] and "jetson-nano" in warnings[0]
    assert timing.device("d1").column is None
    assert timing.fwd_time("d1", 0, 3, 2) == timing.base.fwd_time(0, 3, 2, 2.5)


def test_no_warning_without_measured_types(caplog: pytest.LogCaptureFixture) -> None:
    costs = uniform_costs(2)  # base times from the workstation, no columns
    cluster = typed_cluster(["jetson-tx2", "local", "custom"], [2.0, 1.0, 0.5])
    with caplog.at_level(logging.WARNING, logger="solver.timing"):
        Timing.of(costs, cluster)
    assert not [r for r in caplog.records if r.name == "solver.timing"]


# (seed, DP round, evaluate, simulate, hetpipe, pipedream) as float.hex(), computed by the
# solver before cost columns existed (commit 8950538); None: no plan fits
_BEFORE_COLUMNS: list[tuple[Any, ...]] = [
    (0, "0x1.2f1048127a7ecp+1", "0x1.2f1048127a7ecp+1", "0x1.2f1048127a7ecp+1",
     "0x1.2d5c98d5d6387p+4", "0x1.2d5c98d5d6387p+4"),
    (1, "0x1.f08daa8be0090p-4", "0x1.f08daa8be0090p-4", "0x1.f08daa8be0090p-4",
     "0x1.66128633e8f32p+1", "0x1.66128633e8f32p+1"),
    (2, "0x1.8855932bb6219p+0", "0x1.8855932bb6219p+0", "0x1.8855932bb6219p+0",
     "0x1.05a882a3b439dp+1", "0x1.05a882a3b439dp+1"),
    (3, "0x1.d187075bc3befp-5", "0x1.d187075bc3befp-5", "0x1.d187075bc3befp-5",
     "0x1.26ac6df96323cp+0", "0x1.26ac6df96323cp+0"),
    (4, "0x1.e1824f89228c2p-1", "0x1.e1824f89228c2p-1", "0x1.3195e44d3f7ddp+0",
     "0x1.166763d8899c6p+1", "0x1.166763d8899c6p+1"),
    (5, None, None, None),
    (6, None, None, None),
    (7, "0x1.0f7834f7c79bbp+1", "0x1.0f7834f7c79bbp+1", "0x1.13bcae047efd0p+1",
     "0x1.26cf51e2a7bcdp+3", "0x1.c44c371e206a8p+2"),
    (8, "0x1.0ca1d1a820550p+0", "0x1.0ca1d1a820550p+0", "0x1.0ca1d1a820550p+0",
     "0x1.ed5ad65e9b2f5p+1", "0x1.ed5ad65e9b2f5p+1"),
    (9, "0x1.6fd280ba38331p-2", "0x1.6fd280ba38331p-2", "0x1.6fd280ba38331p-2",
     "0x1.5c9484e016ddfp+2", "0x1.373fa474aad6dp+2"),
    (10, "0x1.e3981f16b7e22p-2", "0x1.e3981f16b7e22p-2", "0x1.e3981f16b7e22p-2",
     "0x1.2cda51aa0497ep+1", "0x1.75a3e35affe56p+1"),
    (11, "0x1.7dee10f31ed52p-2", "0x1.7dee10f31ed52p-2", "0x1.7dee10f31ed52p-2",
     "0x1.34e65fac73cc5p+1", "0x1.34e65fac73cc5p+1"),
]


def test_without_columns_predictions_are_bit_for_bit_those_of_before() -> None:
    from solver.baselines import hetpipe, pipedream
    from solver.simulate import simulate
    from tests.solver_cases import random_instance

    for seed, *expected in _BEFORE_COLUMNS:
        costs, cluster, batch = random_instance(7000 + seed, max_layers=8, max_devices=5,
                                                latency=seed % 3 == 0)
        if seed % 2:
            costs = replace(costs, update_s_per_byte=1e-9)
        dp = asteroid_dp(costs, cluster, batch)
        if dp.plan is None:
            assert expected == [None, None, None], seed
            continue
        got = [dp.round_time_s, evaluate(dp.plan, costs, cluster).round_time_s,
               simulate(dp.plan, costs, cluster).round_time_s,
               evaluate(hetpipe(costs, cluster, 16), costs, cluster).round_time_s,
               evaluate(pipedream(costs, cluster, 16), costs, cluster).round_time_s]
        assert [x.hex() for x in got] == expected, seed


def test_runtime_overhead_is_charged_per_stage_call_and_round() -> None:
    """Every stage call pays the source's per-call overhead and every device the round's,
    divided by its speed; a column device pays its column's; zero changes nothing."""
    costs = random_columns(random.Random(4), random_costs(random.Random(3), 6),
                           ["jetson-nano"])
    cluster = typed_cluster(["local", "jetson-nano"], [0.5, 1.0])
    plain = Timing.of(costs, cluster)
    base = RuntimeOverhead(forward_s=1e-3, backward_s=2e-3, round_s=4e-3)
    nano = RuntimeOverhead(forward_s=3e-3)
    over = replace(costs, runtime_overhead=base,
                   columns=(replace(costs.columns[0], runtime_overhead=nano),))
    timing = Timing.of(over, cluster)
    assert timing.fwd_time("d0", 1, 4, 3) == pytest.approx(
        plain.fwd_time("d0", 1, 4, 3) + 1e-3 / 0.5, rel=1e-12)
    assert timing.bwd_time("d0", 1, 4, 3) == pytest.approx(
        plain.bwd_time("d0", 1, 4, 3) + 2e-3 / 0.5, rel=1e-12)
    assert timing.update_time("d0", 1, 4) == pytest.approx(
        plain.update_time("d0", 1, 4) + 4e-3 / 0.5, rel=1e-12)
    assert timing.fwd_time("d1", 1, 4, 3) == pytest.approx(
        plain.fwd_time("d1", 1, 4, 3) + 3e-3, rel=1e-12)
    assert timing.bwd_time("d1", 1, 4, 3) == plain.bwd_time("d1", 1, 4, 3)
    assert timing.fwd_time("d0", 1, 4, 0) == 0.0      # a device with no share computes nothing
    zero = Timing.of(over.without_runtime_overhead(), cluster)
    for name in ("d0", "d1"):
        assert zero.fwd_time(name, 0, 5, 7) == plain.fwd_time(name, 0, 5, 7)   # bit for bit
        assert zero.update_time(name, 0, 5) == plain.update_time(name, 0, 5)
