"""Tests of the discrete-event simulator (solver/simulate.py) and its agreement with evaluate."""

from __future__ import annotations

import json
import random
import statistics
from typing import Any

import pytest

from contracts.cluster import Cluster
from contracts.errors import PlanError
from contracts.plan import Plan, Stage
from contracts.table import CostTable
from solver.evaluate import evaluate
from solver.simulate import SimResult, program_order, simulate
from tests.solver_cases import (
    make_cluster,
    make_costs,
    random_column_instance,
    random_instance,
    uniform_costs,
)


def _plan(costs: CostTable, stages: list[Stage], batch: int, m: int,
          schedule: str = "1f1b") -> Plan:
    return Plan(model_hash=costs.model_hash, cluster_hash="c", batch_size=batch,
                micro_batch_size=batch // m, num_micro_batches=m, stages=tuple(stages),
                schedule=schedule, num_layers=costs.num_layers)


def random_plan(rng: random.Random, costs: CostTable, cluster: Cluster, batch: int, *,
                single: bool = False) -> Plan | None:
    """A random valid plan: random cuts, devices, group sizes, shares and M."""
    names = list(cluster.names)
    rng.shuffle(names)
    n_layers = costs.num_layers
    ndev = rng.randint(1, len(names))
    n_stages = rng.randint(1, min(ndev, n_layers))
    if single:
        ndev = n_stages
    cuts = sorted(rng.sample(range(1, n_layers), n_stages - 1))
    bounds = [0, *cuts, n_layers]
    sizes = [1] * n_stages
    for _ in range(ndev - n_stages):
        sizes[rng.randrange(n_stages)] += 1
    options = [m for m in range(1, batch + 1) if batch % m == 0 and batch // m >= max(sizes)]
    if not options:
        return None
    m = rng.choice(options)
    micro = batch // m
    stages, k = [], 0
    for s in range(n_stages):
        group = tuple(names[k:k + sizes[s]])
        k += sizes[s]
        shares = [1] * len(group)
        for _ in range(micro - len(group)):
            shares[rng.randrange(len(group))] += 1
        stages.append(Stage((bounds[s], bounds[s + 1] - 1), group, tuple(shares)))
    return _plan(costs, stages, batch, m)


def test_program_order_1f1b_and_gpipe() -> None:
    assert program_order("1f1b", 0, 3, 4) == [("F", 0), ("F", 1), ("F", 2), ("B", 0),
                                               ("F", 3), ("B", 1), ("B", 2), ("B", 3)]
    assert program_order("1f1b", 2, 3, 2) == [("F", 0), ("B", 0), ("F", 1), ("B", 1)]
    assert program_order("1f1b", 0, 4, 2) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]
    assert program_order("gpipe", 1, 3, 3) == [("F", 0), ("F", 1), ("F", 2),
                                                ("B", 2), ("B", 1), ("B", 0)]
    with pytest.raises(PlanError, match="'zigzag'"):
        program_order("zigzag", 0, 1, 1)


def test_two_equal_stages_hand_computed() -> None:
    # 4 identical layers (f=0.01 s, b=0.02 s per sample), no communication, 2 stages on
    # devices of speed 1: X = 2 * (0.01 + 0.02) * mb, round = (M + 1) X for 1F1B.
    costs = uniform_costs(4, cut_bytes=0, param_bytes=0)
    cluster = make_cluster([1.0, 1.0])
    plan = _plan(costs, [Stage((0, 1), ("d0",), (2,)), Stage((2, 3), ("d1",), (2,))], 8, 4)
    res = simulate(plan, costs, cluster)
    x = 2 * 0.03 * 2
    assert res.round_time_s == pytest.approx(5 * x)
    assert res.round_time_s == pytest.approx(evaluate(plan, costs, cluster).round_time_s,
                                             rel=1e-12)
    assert res.busy_s["d0"] == pytest.approx(4 * x)
    assert res.bubble_fraction == pytest.approx(1 - 8 * x / (2 * 5 * x))
    kinds = {e.kind for e in res.events}
    assert kinds == {"F", "B"}
    assert len(res.events) == 16


def test_latency_delays_every_transfer_as_evaluate_charges_it() -> None:
    # two single-device stages, one cut of 1000 B per sample at 1e6 B/s plus 5 ms latency:
    # with one micro-batch the round is F0 + send + F1 + B1 + send + B0, exactly
    costs = uniform_costs(2, cut_bytes=1000, param_bytes=0)
    cluster = make_cluster([1.0, 1.0], bandwidth_mbps=8.0, latency_ms=5.0)
    plan = _plan(costs, [Stage((0, 0), ("d0",), (2,)), Stage((1, 1), ("d1",), (2,))], 2, 1)
    res = simulate(plan, costs, cluster)
    send = 0.005 + 2 * 1000 / 1e6
    sends = [e for e in res.events if e.kind == "SEND"]
    assert len(sends) == 2 and all(e.end - e.start == pytest.approx(send) for e in sends)
    assert res.round_time_s == pytest.approx(2 * 0.02 + 2 * 0.04 + 2 * send)
    assert res.round_time_s == pytest.approx(evaluate(plan, costs, cluster).round_time_s,
                                             rel=1e-12)


def test_allreduce_and_rounds() -> None:
    costs = uniform_costs(2, cut_bytes=0, param_bytes=1_000_000)
    cluster = make_cluster([1.0, 1.0], bandwidth_mbps=8.0)  # 1e6 B/s
    plan = _plan(costs, [Stage((0, 1), ("d0", "d1"), (1, 1))], 4, 2)
    one = simulate(plan, costs, cluster)
    ar = [e for e in one.events if e.kind == "ALLREDUCE"]
    assert len(ar) == 2 and ar[0].end - ar[0].start == pytest.approx(2.0)  # 2(2-1)/2*2e6/1e6
    assert one.round_time_s == pytest.approx(evaluate(plan, costs, cluster).round_time_s)
    three = simulate(plan, costs, cluster, rounds=3)
    assert three.total_time_s == pytest.approx(3 * one.total_time_s)
    assert three.round_time_s == pytest.approx(one.round_time_s)


def test_memory_peak_matches_evaluate_and_is_sampled() -> None:
    costs = make_costs([(0.0, 0.01)] * 3, [(0.0, 0.02)] * 3, [1000, 2000, 3000],
                       [100, 200, 300], [0, 0])
    cluster = make_cluster([1.0, 0.5, 2.0])
    plan = _plan(costs, [Stage((0, 0), ("d0",), (3,)), Stage((1, 1), ("d1",), (3,)),
                         Stage((2, 2), ("d2",), (3,))], 12, 4)
    res = simulate(plan, costs, cluster)
    pred = evaluate(plan, costs, cluster)
    assert dict(res.peak_memory_bytes) == dict(pred.peak_memory_bytes)
    samples = res.memory_samples["d0"]
    assert samples[0][0] == 0.0 and max(v for _, v in samples) == res.peak_memory_bytes["d0"]
    # activations are all freed at the end of the round
    assert samples[-1][1] == samples[0][1]
    gpipe = simulate(plan, costs, cluster, schedule="gpipe")
    gpred = evaluate(_plan(costs, list(plan.stages), 12, 4, schedule="gpipe"), costs, cluster)
    assert dict(gpipe.peak_memory_bytes) == dict(gpred.peak_memory_bytes)
    assert gpipe.peak_memory_bytes["d2"] > res.peak_memory_bytes["d2"]


def test_comm_blocking_vs_overlap() -> None:
    costs = uniform_costs(2, cut_bytes=100_000, param_bytes=0)
    cluster = make_cluster([1.0, 1.0], bandwidth_mbps=8.0)  # 0.1 s per sample across
    plan = _plan(costs, [Stage((0, 0), ("d0",), (1,)), Stage((1, 1), ("d1",), (1,))], 4, 4)
    blocking = simulate(plan, costs, cluster)
    overlap = simulate(plan, costs, cluster, comm="overlap")
    pred = evaluate(plan, costs, cluster)
    assert blocking.round_time_s == pytest.approx(pred.round_time_s)
    assert overlap.round_time_s < blocking.round_time_s
    sends = [e for e in blocking.events if e.kind == "SEND"]
    assert len(sends) == 8 and {e.device for e in sends} == {"d1"}
    assert {e.peer for e in sends} == {"d0"}


def test_result_to_json_round_trips_through_json() -> None:
    costs = uniform_costs(2)
    cluster = make_cluster([1.0, 2.0])
    plan = _plan(costs, [Stage((0, 0), ("d0",), (2,)), Stage((1, 1), ("d1",), (2,))], 4, 2)
    res = simulate(plan, costs, cluster)
    assert isinstance(res, SimResult)
    data = json.loads(res.to_json())
    assert data["round_time_s"] == res.round_time_s
    assert len(data["events"]) == len(res.events)
    assert set(data["memory_samples"]) == {"d0", "d1"}


def test_bad_arguments_raise_plan_error() -> None:
    costs = uniform_costs(2)
    cluster = make_cluster([1.0])
    plan = _plan(costs, [Stage((0, 1), ("d0",), (2,))], 2, 1)
    with pytest.raises(PlanError, match="schedule must be"):
        simulate(plan, costs, cluster, schedule="zigzag")
    with pytest.raises(PlanError, match="comm must be"):
        simulate(plan, costs, cluster, comm="telepathy")
    with pytest.raises(PlanError, match="network must be"):
        simulate(plan, costs, cluster, network="mesh")
    with pytest.raises(PlanError, match="rounds must be"):
        simulate(plan, costs, cluster, rounds=0)
    with pytest.raises(PlanError, match="rounds 1001 is above 1000"):
        simulate(plan, costs, cluster, rounds=1001)
    with pytest.raises(PlanError, match="'d0' is not in the cluster"):
        simulate(plan, costs, make_cluster([1.0, 1.0]).subset(["d1"]))
    with pytest.raises(PlanError, match="3 layers"):
        simulate(plan, uniform_costs(3), cluster)


def _ratios(single: bool, comm_free: bool, count: int = 150,
            instance: Any = random_instance) -> list[tuple[float, Plan, int]]:
    out = []
    for seed in range(count):
        rng = random.Random(seed)
        costs, cluster, batch = instance(seed, max_layers=7, max_devices=4)
        if comm_free:
            costs = CostTable.from_dict({**costs.to_dict(),
                                         "cut_bytes": [0] * (costs.num_layers - 1)})
        plan = random_plan(rng, costs, cluster, batch, single=single)
        if plan is None:
            continue
        pred = evaluate(plan, costs, cluster)
        res = simulate(plan, costs, cluster)
        out.append((res.round_time_s / pred.round_time_s, plan, pred.dominant_stage))
    return out


def test_exact_on_comm_free_single_device_stages_when_dominant_is_last() -> None:
    # The algebra of evaluate's formula is exact for single-device stages without
    # communication when the dominant stage is the last one: the first stage waits for
    # M X_dm plus the other stages' forward and backward of one micro-batch.
    checked = 0
    for ratio, plan, dm in _ratios(single=True, comm_free=True):
        if dm == plan.num_stages - 1:
            checked += 1
            assert ratio == pytest.approx(1.0, rel=1e-9)
    assert checked > 50


def test_evaluate_is_a_lower_bound_and_exact_with_one_micro_batch() -> None:
    # On comm-free single-device stages every term of evaluate's round (the drain
    # correction included) is the length of a path of the simulated schedule, so the
    # simulator is never faster; with M = 1 the round is the sum of all X, exactly.
    ratios = _ratios(single=True, comm_free=True)
    assert min(r for r, _, _ in ratios) >= 1.0 - 1e-9
    one = [r for r, plan, _ in ratios if plan.num_micro_batches == 1]
    assert len(one) > 30
    assert all(r == pytest.approx(1.0, rel=1e-9) for r in one)
    # measured: 98% exact, at most 5.3% above evaluate (long tails, near-dominant stages)
    assert sum(abs(r - 1.0) <= 1e-9 for r, _, _ in ratios) / len(ratios) >= 0.95
    assert max(r for r, _, _ in ratios) < 1.1


def test_agreement_with_evaluate_on_random_plans() -> None:
    # [Note: simulator vs evaluate]. Measured on 142 random plans (groups, uneven shares,
    # communication): the median ratio is 1, 94% are exact, 98.6% lie within 10% and
    # 99.3% within 15%, ratios 0.88..1.19 (before the drain correction of evaluate: 96.5%
    # within 10%, 97.2% within 15%, up to 1.99). The remaining outliers are known model
    # gaps: evaluate charges a group's transfer at the slowest device while the simulator
    # lets each device go at its own pace, and the drain correction does not model the
    # tail's own 1F1B order behind a long tail.
    ratios = [r for r, _, _ in _ratios(single=False, comm_free=False)]
    assert len(ratios) > 100
    assert statistics.median(ratios) == pytest.approx(1.0, abs=1e-9)
    assert sum(abs(r - 1.0) <= 0.10 for r in ratios) / len(ratios) >= 0.97
    assert sum(abs(r - 1.0) <= 0.15 for r in ratios) / len(ratios) >= 0.98
    assert min(ratios) > 0.85 and max(ratios) < 1.3


def test_agreement_with_evaluate_with_cost_columns() -> None:
    # the simulator charges every device the times evaluate does (solver.timing: a
    # measured type's column as it is, the base over the speed otherwise), so what held
    # without columns holds with them: exact on comm-free single-device stages with one
    # micro-batch or the dominant stage last, a lower bound there, close elsewhere
    # (measured on 139 random plans: 93.5% exact, all within 10%, ratios 0.94..1.005)
    exact = _ratios(single=True, comm_free=True, instance=random_column_instance)
    assert min(r for r, _, _ in exact) >= 1.0 - 1e-9
    checked = [r for r, plan, dm in exact
               if plan.num_micro_batches == 1 or dm == plan.num_stages - 1]
    assert len(checked) > 50
    assert all(r == pytest.approx(1.0, rel=1e-9) for r in checked)
    ratios = [r for r, _, _ in _ratios(single=False, comm_free=False,
                                       instance=random_column_instance)]
    assert len(ratios) > 100
    assert statistics.median(ratios) == pytest.approx(1.0, abs=1e-9)
    assert sum(abs(r - 1.0) <= 0.10 for r in ratios) / len(ratios) >= 0.95
