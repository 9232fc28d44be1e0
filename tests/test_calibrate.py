"""Tests of solver.calibrate: a cost table and per-message overhead from a running plan."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from contracts.cluster import Cluster, Device
from contracts.errors import CostModelError
from contracts.plan import Plan, Stage
from contracts.table import RuntimeOverhead
from solver.calibrate import BASE_GROUP, calibrate_costs, with_message_overhead
from solver.evaluate import LayerSums, evaluate
from solver.simulate import simulate
from tests.solver_cases import make_cluster, uniform_costs

COSTS = uniform_costs(4, param_bytes=1000, cut_bytes=1000)


def _plan(stages: tuple[Stage, ...], batch: int = 8, micro: int = 2) -> Plan:
    return Plan("h", "c", batch, micro, batch // micro, stages, num_layers=4)


TWO = _plan((Stage((0, 1), ("d0",), (2,)), Stage((2, 3), ("d1",), (2,))))
ONE = _plan((Stage((0, 3), ("d0",), (2,)),))


def _compute(plan: Plan, speeds: dict[str, float], scale: dict[str, float]
             ) -> dict[str, tuple[float, float]]:
    """What the devices would measure: the prediction times ``scale``."""
    sums = LayerSums.of(COSTS)
    out = {}
    for st in plan.stages:
        for d, share in zip(st.devices, st.shares, strict=True):
            out[d] = (sums.fwd_time(st.first, st.last, share, speeds[d]) * scale[d],
                      sums.bwd_time(st.first, st.last, share, speeds[d]) * scale[d])
    return out


def test_a_run_as_predicted_changes_nothing() -> None:
    cluster = make_cluster([1.0, 0.5], bandwidth_mbps=8.0)
    predicted = evaluate(TWO, COSTS, cluster).round_time_s
    table, corr = calibrate_costs(TWO, COSTS, cluster, _compute(
        TWO, {"d0": 1.0, "d1": 0.5}, {"d0": 1.0, "d1": 1.0}), predicted)
    assert corr.ratios[BASE_GROUP] == {0: pytest.approx((1.0, 1.0)),
                                       1: pytest.approx((1.0, 1.0))}
    assert corr.message_overhead_s == 0.0
    assert corr.calibrated_round_s == pytest.approx(predicted)
    assert evaluate(TWO, table, cluster).round_time_s == pytest.approx(predicted)


def test_each_stage_of_a_group_gets_its_own_forward_and_backward_ratio() -> None:
    cluster = make_cluster([1.0, 0.5, 0.5], bandwidth_mbps=8.0)
    three = _plan((Stage((0, 1), ("d0",), (2,)), Stage((2, 2), ("d1",), (2,)),
                   Stage((3, 3), ("d2",), (2,))))
    speeds = {"d0": 1.0, "d1": 0.5, "d2": 0.5}
    measured = _compute(three, speeds, {"d0": 3.0, "d1": 2.0, "d2": 1.5})
    measured["d2"] = (measured["d2"][0], measured["d2"][1] * 2.0)   # backward x3
    rounds = evaluate(three, COSTS, cluster).round_time_s * 2.0
    table, corr = calibrate_costs(three, COSTS, cluster, measured, rounds)
    assert corr.ratios[BASE_GROUP] == {0: pytest.approx((3.0, 3.0)),
                                       1: pytest.approx((2.0, 2.0)),
                                       2: pytest.approx((1.5, 3.0))}
    # the corrected table predicts every device as it measured
    pred = evaluate(three, table, cluster)
    for st, got in zip(three.stages, pred.stages, strict=True):
        assert got.compute_f == pytest.approx(measured[st.devices[0]][0], rel=1e-9)
        assert got.compute_b == pytest.approx(measured[st.devices[0]][1], rel=1e-9)


def test_unexplained_round_time_becomes_a_per_message_overhead() -> None:
    cluster = make_cluster([1.0, 1.0], bandwidth_mbps=8.0)
    base = evaluate(TWO, COSTS, cluster).round_time_s
    measured = _compute(TWO, {"d0": 1.0, "d1": 1.0}, {"d0": 1.0, "d1": 1.0})
    table, corr = calibrate_costs(TWO, COSTS, cluster, measured, base + 0.05)
    assert corr.message_overhead_s > 0
    assert table.message_overhead_s == corr.message_overhead_s
    assert corr.calibrated_round_s == pytest.approx(base + 0.05, rel=1e-6)
    assert evaluate(TWO, table, cluster).round_time_s == pytest.approx(base + 0.05, rel=1e-6)
    # a faster measured round than predicted never gives a negative overhead
    _, fast = calibrate_costs(TWO, COSTS, cluster, measured, base * 0.5)
    assert fast.message_overhead_s == 0.0


def test_the_overhead_can_be_fitted_against_the_event_simulation() -> None:
    """What ``asteroid-fx calibrate`` does: a plan's prediction of a run is its simulation
    (``Prediction.expected_round_time_s``), so the overhead is what the simulation lacks."""
    cluster = make_cluster([1.0, 1.0], bandwidth_mbps=8.0)
    simulated = simulate(TWO, COSTS, cluster).round_time_s
    measured = _compute(TWO, {"d0": 1.0, "d1": 1.0}, {"d0": 1.0, "d1": 1.0})
    table, corr = calibrate_costs(TWO, COSTS, cluster, measured, simulated + 0.05,
                                  model="simulate")
    assert corr.predicted_round_s == pytest.approx(simulated)
    assert corr.message_overhead_s > 0
    assert simulate(TWO, table, cluster).round_time_s == pytest.approx(simulated + 0.05,
                                                                       rel=1e-6)
    with pytest.raises(CostModelError, match="'evaluate' or 'simulate'"):
        calibrate_costs(TWO, COSTS, cluster, measured, 1.0, model="guess")


def test_a_plan_without_messages_shows_no_overhead() -> None:
    cluster = make_cluster([1.0, 1.0], bandwidth_mbps=8.0)
    measured = _compute(ONE, {"d0": 1.0}, {"d0": 2.0})
    predicted = evaluate(ONE, COSTS, cluster).round_time_s
    table, corr = calibrate_costs(ONE, COSTS, cluster, measured, predicted * 3.0)
    assert corr.ratios[BASE_GROUP] == {0: pytest.approx((2.0, 2.0))}
    assert corr.message_overhead_s == 0.0
    # d1 ran nothing: as a device of the same group it is predicted with the correction
    other = _plan((Stage((0, 3), ("d1",), (2,)),))
    assert evaluate(other, table, cluster).stages[0].compute_f == pytest.approx(
        2.0 * evaluate(other, COSTS, cluster).stages[0].compute_f)
    json.dumps(corr.to_dict())
    # with nothing to fit, a table's per-message cost (e.g. the host's probe) is kept
    probed = replace(COSTS, message_overhead_s=7e-4)
    table, corr = calibrate_costs(ONE, probed, cluster, measured, predicted * 3.0)
    assert corr.message_overhead_s == 7e-4 and table.message_overhead_s == 7e-4


def test_with_message_overhead_adds_to_every_link() -> None:
    cluster = make_cluster([1.0] * 3, bandwidth_mbps=8.0, latency_ms=1.0,
                           links=[("d0", "d1", 16.0)], link_latency=[("d1", "d2", 4.0)])
    more = with_message_overhead(cluster, 0.002)
    assert more.latency_s("d0", "d2") == pytest.approx(0.003)
    assert more.latency_s("d1", "d2") == pytest.approx(0.006)
    assert more.latency_s("d0", "d1") == pytest.approx(0.003)    # bandwidth-only override
    assert more.bandwidth_mbps_between("d0", "d1") == 16.0
    assert with_message_overhead(cluster, 0.0) is cluster


def _typed_cluster() -> Cluster:
    """d0 (local, speed 1), d1 (a Nano, scaled from the base by its FLOP/s)."""
    return Cluster(devices=(Device("d0", "local", 1 << 30, speed=1.0),
                            Device("d1", "jetson-nano", 1 << 30, speed=0.5)),
                   bandwidth_mbps=8.0)


def test_calibrate_costs_corrects_per_group_and_stage() -> None:
    cluster = _typed_cluster()
    compute = _compute(TWO, {"d0": 1.0, "d1": 0.5}, {"d0": 2.0, "d1": 3.0})
    table, corr = calibrate_costs(TWO, COSTS, cluster, compute, 4.0)
    assert corr.ratios[BASE_GROUP] == {0: pytest.approx((2.0, 2.0))}
    assert corr.ratios["jetson-nano"] == {1: pytest.approx((3.0, 3.0))}
    # the base (local) times of stage 0's layers doubled, and layers 2..3 (not run on a
    # local device) took the group's median as well
    for i in range(4):
        assert table.layers[i].fwd.per_sample_s == pytest.approx(
            COSTS.layers[i].fwd.per_sample_s * 2.0)
    # the Nano had no column: it gets a calibrated one, base / speed x its ratio
    col = table.column("jetson-nano")
    assert col is not None and col.source == "calibrated"
    assert col.bwd[3].per_sample_s == pytest.approx(COSTS.layers[3].bwd.per_sample_s / 0.5 * 3)
    assert table.source == "calibrated" and table.meta["calibration"]["ratios"]
    assert table.model_hash == COSTS.model_hash and table.cut_bytes == COSTS.cut_bytes
    # what the corrected compute leaves of the measured round is a per-message overhead,
    # which the solver then charges on every message of any plan, at its slower end (the
    # Nano's calibrated column has no message cost of its own: the base's over its speed)
    assert corr.message_overhead_s > 0
    assert evaluate(TWO, table, cluster).round_time_s == pytest.approx(4.0, rel=1e-6)
    assert corr.calibrated_round_s == pytest.approx(4.0, rel=1e-6)
    plain = replace(table, message_overhead_s=0.0)
    assert evaluate(TWO, table, cluster) == evaluate(
        TWO, plain, with_message_overhead(cluster, corr.message_overhead_s / 0.5))


def test_calibrate_costs_ignores_broken_and_missing_measurements() -> None:
    cluster = _typed_cluster()
    compute = {"d0": (float("nan"), 1.0)}
    table, corr = calibrate_costs(TWO, COSTS, cluster, compute, 0.0)
    assert corr.ratios == {} and corr.unmeasured == ["d1"]
    assert table.layers == COSTS.layers and corr.message_overhead_s == 0.0


def test_a_device_with_a_cost_column_has_its_column_corrected() -> None:
    from solver.timing import Timing
    from tests.solver_cases import scaled_column, typed_cluster, with_ops

    costs = with_ops(COSTS, ["conv", "conv", "matmul", "matmul"])
    costs = replace(costs, columns=(scaled_column(costs, "jetson-nano",
                                                  {"conv": 0.5, "matmul": 3.0}),))
    cluster = typed_cluster(["custom", "jetson-nano"], [1.0, 5.0], bandwidth_mbps=8.0)
    timing = Timing.of(costs, cluster)
    # both devices measure twice what evaluate predicts for them (d1 from its column)
    measured = {}
    for st in TWO.stages:
        (d,), (share,) = st.devices, st.shares
        measured[d] = (2.0 * timing.fwd_time(d, st.first, st.last, share),
                       2.0 * timing.bwd_time(d, st.first, st.last, share))
    rounds = evaluate(TWO, costs, cluster).round_time_s * 2.0
    fixed, corr = calibrate_costs(TWO, costs, cluster, measured, rounds)
    assert corr.ratios == {BASE_GROUP: {0: pytest.approx((2.0, 2.0))},
                           "jetson-nano": {1: pytest.approx((2.0, 2.0))}}
    (col,) = fixed.columns
    assert col.source == "calibrated"
    # with the calibrated table both devices are predicted as they measured; the speed of
    # d1 still does not apply on top of its column
    pred = evaluate(TWO, fixed, cluster)
    assert pred.stages[0].compute_f == pytest.approx(measured["d0"][0], rel=1e-9)
    assert pred.stages[1].compute_b == pytest.approx(measured["d1"][1], rel=1e-9)
    assert corr.calibrated_round_s == pytest.approx(rounds, rel=1e-6)


def test_the_runtime_overhead_stays_out_of_the_ratios() -> None:
    # layers measured 2x their table times, the runtime's per-call overhead as predicted:
    # the ratio is 2 (not diluted by the overhead) and the calibrated table predicts the
    # measured stage times exactly
    over = RuntimeOverhead(forward_s=5e-3, backward_s=4e-3, round_s=1e-3)
    costs = replace(COSTS, runtime_overhead=over)
    bare = LayerSums.of(COSTS)
    cluster = make_cluster([1.0, 0.5], bandwidth_mbps=8.0)
    speeds = {"d0": 1.0, "d1": 0.5}
    measured = {}
    for st in TWO.stages:
        d, share = st.devices[0], st.shares[0]
        measured[d] = (2.0 * bare.fwd_time(st.first, st.last, share, speeds[d])
                       + over.forward_s / speeds[d],
                       2.0 * bare.bwd_time(st.first, st.last, share, speeds[d])
                       + over.backward_s / speeds[d])
    table, corr = calibrate_costs(TWO, costs, cluster, measured,
                                  evaluate(TWO, costs, cluster).round_time_s * 2.0)
    assert corr.ratios[BASE_GROUP] == {0: pytest.approx((2.0, 2.0)),
                                       1: pytest.approx((2.0, 2.0))}
    assert table.runtime_overhead == over
    sums = LayerSums.of(table)
    for st in TWO.stages:
        d, share = st.devices[0], st.shares[0]
        assert sums.fwd_time(st.first, st.last, share, speeds[d]) == pytest.approx(
            measured[d][0], rel=1e-9)
        assert sums.bwd_time(st.first, st.last, share, speeds[d]) == pytest.approx(
            measured[d][1], rel=1e-9)
