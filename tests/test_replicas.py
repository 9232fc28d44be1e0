"""Tests of replica placement (solver/replicas.py) on hand-written plans and clusters."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import pytest

from contracts.cluster import Cluster, Device
from contracts.errors import PlanError
from contracts.plan import Plan, Stage
from contracts.table import CostTable
from solver.evaluate import evaluate
from solver.replicas import (
    IDLE_BUCKET,
    auto_replicate_every,
    choose_replicas,
    idle_time_s,
    plan_replication,
    replication_load_s,
    replication_time_s,
    stage_state_bytes,
    with_replicas,
)
from tests.solver_cases import MIB, make_cluster, make_costs, uniform_costs

COSTS = uniform_costs(6)  # 4 MiB of weights per layer


def _chain(devices: tuple[str, ...] = ("d0", "d1", "d2"), **kw: object) -> Plan:
    """Three single-device stages of two layers each, micro-batches of 2."""
    stages = tuple(Stage((2 * i, 2 * i + 1), (d,), (2,)) for i, d in enumerate(devices))
    return Plan(model_hash="h", cluster_hash="c", batch_size=4, micro_batch_size=2,
                num_micro_batches=2, stages=stages, num_layers=6, **kw)  # type: ignore[arg-type]


def _tight(plan: Plan, extra_mib: dict[str, float], speeds: list[float] | None = None,
           **kw: object) -> Cluster:
    """A cluster where every device has its peak memory (no replicas) plus ``extra_mib``."""
    roomy = make_cluster(speeds or [1.0] * len(plan.devices), memory_mib=4096)
    peak = evaluate(plan, COSTS, roomy).peak_memory_bytes
    names = sorted(peak)
    return make_cluster(speeds or [1.0] * len(names),
                        memory_mib=[peak[d] / MIB + extra_mib.get(d, 0.0) for d in names],
                        **kw)  # type: ignore[arg-type]


def test_holders_spread_the_traffic_and_memory_fits() -> None:
    plan = _chain()
    cluster = make_cluster([1.0, 1.0, 1.0], memory_mib=1024)
    replicas = choose_replicas(plan, COSTS, cluster)
    # one copy takes 8 MiB / 100 Mbps = 0.67 s, more than a round (0.38 s): d0's stage goes
    # to its neighbour d1, d1's to d2 (d0 already sends), and d2's to d0, not to d1, which
    # already sends its own state and receives d0's (the old neighbour-only rule gave d1)
    assert replicas == {"d0": ("d1",), "d1": ("d2",), "d2": ("d0",)}
    load = replication_load_s(plan, COSTS, cluster, replicas)
    assert load == pytest.approx({d: 2 * 8 * MIB / 12.5e6 for d in plan.devices})
    placed = with_replicas(plan, COSTS, cluster)
    assert placed.replicas == replicas
    assert placed.predicted is not None and placed.predicted.fits
    state = stage_state_bytes(COSTS, plan, 0)
    assert state == 8 * MIB  # two layers of 4 MiB, SGD keeps no optimizer state
    base = evaluate(plan, COSTS, cluster).peak_memory_bytes
    holders = [h for hs in replicas.values() for h in hs]
    for device in plan.devices:
        assert placed.predicted.peak_memory_bytes[device] == (
            base[device] + holders.count(device) * state)
    assert Plan.from_json(placed.to_json()) == placed


def test_faster_link_wins() -> None:
    plan = _chain()
    cluster = make_cluster([1.0, 1.0, 1.0], memory_mib=1024, bandwidth_mbps=100,
                           links=[("d1", "d2", 1000.0)])
    assert choose_replicas(plan, COSTS, cluster)["d1"] == ("d2",)
    cluster = make_cluster([1.0, 1.0, 1.0], memory_mib=1024, bandwidth_mbps=100,
                           links=[("d0", "d1", 1000.0)])
    assert choose_replicas(plan, COSTS, cluster)["d1"] == ("d0",)


def test_holder_without_room_is_skipped() -> None:
    plan = _chain()
    # d0 has no room for an 8 MiB replica, d2 has room for one, d1 for two
    cluster = _tight(plan, {"d0": 7.0, "d1": 17.0, "d2": 9.0})
    replicas = choose_replicas(plan, COSTS, cluster)
    assert replicas == {"d0": ("d1",), "d1": ("d2",), "d2": ("d1",)}
    assert evaluate(replace(plan, replicas=replicas), COSTS, cluster).fits
    # room for one replica everywhere: the last stage goes to d0, a non-neighbour (the
    # neighbour-only rule left one end stage unprotected here)
    cluster = _tight(plan, {"d0": 9.0, "d1": 9.0, "d2": 9.0})
    replicas = choose_replicas(plan, COSTS, cluster)
    assert evaluate(replace(plan, replicas=replicas), COSTS, cluster).fits
    assert replicas == {"d0": ("d1",), "d1": ("d2",), "d2": ("d0",)}


def test_no_room_gives_empty_entry_or_plan_error(caplog: pytest.LogCaptureFixture) -> None:
    plan = _chain()
    cluster = _tight(plan, {"d0": 1.0, "d1": 1.0, "d2": 1.0})
    with caplog.at_level(logging.WARNING, logger="solver.replicas"):
        replicas = choose_replicas(plan, COSTS, cluster)
    assert replicas == {"d0": (), "d1": (), "d2": ()}
    assert "no other device has room" in caplog.text
    with pytest.raises(PlanError, match=r"stage \d \(layers .* has 0 of 1 replica holder"):
        choose_replicas(plan, COSTS, cluster, strict=True)
    placed = with_replicas(plan, COSTS, cluster)
    assert placed.predicted is not None and placed.predicted.fits


def test_single_device_plan_has_no_holder(caplog: pytest.LogCaptureFixture) -> None:
    plan = Plan(model_hash="h", cluster_hash="c", batch_size=2, micro_batch_size=2,
                num_micro_batches=1, stages=(Stage((0, 5), ("d0",), (2,)),), num_layers=6)
    cluster = make_cluster([1.0, 1.0], memory_mib=1024)  # d1 is not in the plan
    with caplog.at_level(logging.WARNING, logger="solver.replicas"):
        assert choose_replicas(plan, COSTS, cluster) == {"d0": ()}
    assert "0 of 1 replica holder(s): the plan has no other device" in caplog.text
    with pytest.raises(PlanError, match="the plan has no other device"):
        choose_replicas(plan, COSTS, cluster, strict=True)


def test_group_prefers_neighbour_then_ring() -> None:
    plan = Plan(model_hash="h", cluster_hash="c", batch_size=4, micro_batch_size=2,
                num_micro_batches=2,
                stages=(Stage((0, 2), ("d0", "d1"), (1, 1)), Stage((3, 5), ("d2",), (2,))),
                num_layers=6)
    roomy = make_cluster([1.0, 1.0, 1.0], memory_mib=1024)
    replicas = choose_replicas(plan, COSTS, roomy)
    assert replicas["d0"] == replicas["d1"] == ("d2",)
    assert replicas["d2"] in (("d0",), ("d1",))
    # d2 has room for d0's state but not for both members' entries: the group falls back
    # to a ring inside itself (a peer already holds the same weights: no traffic)
    cluster = _tight(plan, {"d0": 13.0, "d1": 13.0, "d2": 13.0})
    replicas = choose_replicas(plan, COSTS, cluster)
    assert replicas["d0"] == ("d1",) and replicas["d1"] == ("d0",)
    assert replicas["d2"] in (("d0",), ("d1",)) or replicas["d2"] == ()
    assert evaluate(replace(plan, replicas=replicas), COSTS, cluster).fits
    times = replication_time_s(replace(plan, replicas=replicas), COSTS, cluster)
    assert times["d0"] == 0.0 and times["d1"] == 0.0


def test_two_copies_are_distinct() -> None:
    plan = _chain(("d0", "d1", "d2"))
    cluster = make_cluster([1.0, 1.0, 1.0], memory_mib=1024)
    replicas = choose_replicas(plan, COSTS, cluster, copies=2)
    assert sorted(replicas["d1"]) == ["d0", "d2"]
    assert sorted(replicas["d0"]) == ["d1", "d2"]  # non-neighbours are candidates too
    assert all(len(set(hs)) == 2 and d not in hs for d, hs in replicas.items())
    with pytest.raises(PlanError, match="copies must be >= 1"):
        choose_replicas(plan, COSTS, cluster, copies=0)


def test_replication_time_is_bytes_over_bandwidth() -> None:
    plan = _chain()
    cluster = make_cluster([1.0, 1.0, 1.0], memory_mib=1024, bandwidth_mbps=80.0)  # 1e7 B/s
    placed = with_replicas(plan, COSTS, cluster)
    times = replication_time_s(placed, COSTS, cluster)
    for device in plan.devices:
        assert times[device] == pytest.approx(8 * MIB / 1e7)
    every4 = replication_time_s(placed, COSTS, cluster, every_k_steps=4)
    assert every4["d0"] == pytest.approx(times["d0"] / 4)
    adam = replace(plan, optimizer_state_factor=2.0)
    assert stage_state_bytes(COSTS, adam, 1) == math.ceil(8 * MIB * 3)
    assert replication_time_s(plan, COSTS, cluster) == {"d0": 0.0, "d1": 0.0, "d2": 0.0}
    with pytest.raises(PlanError, match="every_k_steps must be >= 1"):
        replication_time_s(placed, COSTS, cluster, every_k_steps=0)


def test_plan_that_does_not_fit_is_rejected() -> None:
    plan = _chain()
    cluster = make_cluster([1.0, 1.0, 1.0], memory_mib=4.0)
    with pytest.raises(PlanError, match="does not fit even without replicas"):
        choose_replicas(plan, COSTS, cluster)


# --- idle time, replica load and the idle-time rule -------------------------------------

def _bench(param_mib: float = 1.0, memory_mib: dict[str, float] | None = None,
           reverse: bool = False) -> tuple[Plan, CostTable, Cluster]:
    """The bench_recovery situation by hand: fast (1.0) | slow0 (0.5) | slow1 (0.5) at 1000
    Mbps, 4 micro-batches; slow0 is the bottleneck (idle ~19 %), fast idle ~59 %, slow1
    ~39 %; ``param_mib`` of weights per stage."""
    costs = make_costs([(0.0, 0.01), (0.0, 0.01), (0.0, 0.0075)],
                       [(0.0, 0.02), (0.0, 0.02), (0.0, 0.015)],
                       [int(param_mib * MIB)] * 3, [MIB // 4] * 3, [1024] * 2, name="bench3")
    mem = memory_mib or {}
    devices = tuple(Device(name, "custom", int(mem.get(name, 1024.0) * MIB), speed)
                    for name, speed in (("fast", 1.0), ("slow0", 0.5), ("slow1", 0.5)))
    cluster = Cluster(devices=devices[::-1] if reverse else devices, bandwidth_mbps=1000.0)
    stages = (Stage((0, 0), ("fast",), (2,)), Stage((1, 1), ("slow0",), (2,)),
              Stage((2, 2), ("slow1",), (2,)))
    return Plan("h", "c", 8, 2, 4, stages, num_layers=3), costs, cluster


def test_idle_time_is_round_minus_own_compute() -> None:
    plan, costs, cluster = _bench()
    pred = evaluate(plan, costs, cluster)
    idle = idle_time_s(plan, costs, cluster)
    for stage, terms in zip(plan.stages, pred.stages, strict=True):
        busy = 4 * (terms.compute_f + terms.compute_b) + terms.t_a
        assert idle[stage.devices[0]] == pytest.approx(pred.round_time_s - busy)
    frac = {d: v / pred.round_time_s for d, v in idle.items()}
    assert frac["fast"] == pytest.approx(0.593, abs=0.01)
    assert frac["slow0"] == pytest.approx(0.187, abs=0.01)
    assert frac["slow1"] == pytest.approx(0.390, abs=0.01)
    # replicas in the plan are ignored (evaluated without them)
    held = replace(plan, replicas={"fast": ("slow0",), "slow0": ("fast",), "slow1": ("fast",)})
    assert idle_time_s(held, costs, cluster) == idle


def test_idle_time_of_a_group_follows_the_shares() -> None:
    # one stage on d0 (speed 1, 3 samples) and d1 (speed 2, 1 sample), one micro-batch:
    # d0 is the slowest member, so it has no idle time; d1 finishes early and waits for
    # the all-reduce (T_a counts as busy for both)
    plan = Plan(model_hash="h", cluster_hash="c", batch_size=4, micro_batch_size=4,
                num_micro_batches=1, stages=(Stage((0, 5), ("d0", "d1"), (3, 1)),),
                num_layers=6)
    cluster = make_cluster([1.0, 2.0], memory_mib=1024, bandwidth_mbps=1000)
    pred = evaluate(plan, COSTS, cluster)
    idle = idle_time_s(plan, COSTS, cluster)
    assert idle["d0"] == 0.0
    d1_busy = 6 * (0.01 + 0.02) * 1 / 2.0 + pred.stages[0].t_a
    assert idle["d1"] == pytest.approx(pred.round_time_s - d1_busy)
    assert idle["d1"] > 0.5 * pred.round_time_s


def test_replication_load_counts_sender_and_holder_once_per_stage() -> None:
    plan = Plan(model_hash="h", cluster_hash="c", batch_size=4, micro_batch_size=2,
                num_micro_batches=2,
                stages=(Stage((0, 2), ("d0", "d1"), (1, 1)), Stage((3, 5), ("d2",), (2,))),
                num_layers=6)
    cluster = make_cluster([1.0, 1.0, 1.0], memory_mib=1024, bandwidth_mbps=80.0,  # 1e7 B/s
                           links=[("d1", "d2", 800.0)])
    state = 12 * MIB  # three layers of 4 MiB, SGD
    # both members name d2: the group's first device (d0) sends one copy, over its own link
    load = replication_load_s(plan, COSTS, cluster, {"d0": ("d2",), "d1": ("d2",)})
    assert load == pytest.approx({"d0": state / 1e7, "d1": 0.0, "d2": state / 1e7})
    # a ring inside the group costs nothing; d2's copy goes d2 -> d0
    ring = {"d0": ("d1",), "d1": ("d0",), "d2": ("d0",)}
    load = replication_load_s(replace(plan, replicas=ring), COSTS, cluster)
    assert load == pytest.approx({"d0": state / 1e7, "d1": 0.0, "d2": state / 1e7})
    every3 = replication_load_s(plan, COSTS, cluster, ring, every_k_steps=3)
    assert every3 == pytest.approx({d: v / 3 for d, v in load.items()})
    assert replication_load_s(plan, COSTS, cluster) == {"d0": 0.0, "d1": 0.0, "d2": 0.0}
    with pytest.raises(PlanError, match="every_k_steps must be >= 1, got 0"):
        replication_load_s(plan, COSTS, cluster, ring, every_k_steps=0)


def test_bench_case_goes_to_the_idle_devices() -> None:
    plan, costs, cluster = _bench()
    replicas = choose_replicas(plan, costs, cluster)
    # slow0 (the bottleneck) holds nothing; the neighbour-only rule gave it both others
    assert replicas == {"fast": ("slow1",), "slow0": ("fast",), "slow1": ("fast",)}
    placed = with_replicas(plan, costs, cluster)
    assert placed.replicas == replicas
    assert placed.predicted is not None and placed.predicted.fits
    load = replication_load_s(placed, costs, cluster)
    assert load["slow0"] == pytest.approx(MIB / 125e6)  # it only sends its own state


def test_holder_without_room_is_skipped_for_the_next_idle_device() -> None:
    plan, costs, roomy_cluster = _bench()
    roomy = evaluate(plan, costs, roomy_cluster).peak_memory_bytes
    # fast, the idlest device, has no room for a 1 MiB replica
    memory = {d: b / MIB + (0.5 if d == "fast" else 8.0) for d, b in roomy.items()}
    _, _, cluster = _bench(memory_mib=memory)
    replicas = choose_replicas(plan, costs, cluster)
    assert replicas == {"fast": ("slow1",), "slow0": ("slow1",), "slow1": ("slow0",)}
    assert evaluate(replace(plan, replicas=replicas), costs, cluster).fits


def test_near_ties_fall_through_to_the_neighbour() -> None:
    plan = _chain()
    costs = uniform_costs(6, param_bytes=MIB // 16)  # cheap replicas
    # d2 5 % faster: a little more idle time than d1 (the same 5 % bucket): d0's stage
    # still goes to its neighbour d1
    cluster = make_cluster([1.0, 1.0, 1.05], memory_mib=1024, bandwidth_mbps=1000)
    pred = evaluate(plan, costs, cluster)
    idle = idle_time_s(plan, costs, cluster)
    assert 0 < idle["d2"] - idle["d1"] < IDLE_BUCKET * pred.round_time_s
    assert choose_replicas(plan, costs, cluster)["d0"] == ("d1",)
    # twice as fast: clearly more idle, so the non-neighbour wins
    cluster = make_cluster([1.0, 1.0, 2.0], memory_mib=1024, bandwidth_mbps=1000)
    assert choose_replicas(plan, costs, cluster)["d0"] == ("d2",)


def test_every_k_steps_changes_the_weight_of_the_traffic() -> None:
    # 32 MiB per stage: a copy (0.27 s) is about half a round (0.59 s)
    plan, costs, cluster = _bench(param_mib=32)
    every_step = choose_replicas(plan, costs, cluster)
    # fast already sends its state and receives slow0's: slow1's copy goes to slow0
    assert every_step == {"fast": ("slow1",), "slow0": ("fast",), "slow1": ("slow0",)}
    load = replication_load_s(plan, costs, cluster, every_step)
    assert max(load.values()) == pytest.approx(min(load.values()))  # balanced
    every4 = choose_replicas(plan, costs, cluster, every_k_steps=4)
    assert every4 == {"fast": ("slow1",), "slow0": ("fast",), "slow1": ("fast",)}
    assert with_replicas(plan, costs, cluster, every_k_steps=4).replicas == every4
    with pytest.raises(PlanError, match="every_k_steps must be >= 1, got 0"):
        choose_replicas(plan, costs, cluster, every_k_steps=0)


def test_placement_is_deterministic() -> None:
    plan, costs, cluster = _bench(param_mib=32)
    first = choose_replicas(plan, costs, cluster)
    assert choose_replicas(plan, costs, cluster) == first
    _, _, reordered = _bench(param_mib=32, reverse=True)
    assert choose_replicas(plan, costs, reordered) == first
    # equal devices and stages: only the ordering rules decide, always the same way
    chain = _chain(("d0", "d1", "d2"))
    equal = make_cluster([1.0, 1.0, 1.0], memory_mib=1024)
    assert {str(choose_replicas(chain, COSTS, equal)) for _ in range(3)} == {
        str({"d0": ("d1",), "d1": ("d2",), "d2": ("d0",)})}


def test_auto_replicate_every_fits_the_traffic_in_the_idle_time() -> None:
    plan, costs, cluster = _bench(param_mib=16)
    placed = with_replicas(plan, costs, cluster)
    idle = idle_time_s(placed, costs, cluster)
    load1 = replication_load_s(placed, costs, cluster)
    expected = max(math.ceil(load1[d] / (0.5 * idle[d])) for d in idle)
    k = auto_replicate_every(placed, costs, cluster)
    assert k == expected == 3
    assert all(v <= 0.5 * idle[d]
               for d, v in replication_load_s(placed, costs, cluster, every_k_steps=k).items())
    assert any(v > 0.5 * idle[d] for d, v in
               replication_load_s(placed, costs, cluster, every_k_steps=k - 1).items())
    # a larger budget allows a shorter period; an explicit mapping overrides the plan's
    assert auto_replicate_every(placed, costs, cluster, budget=1.0) < k
    assert auto_replicate_every(plan, costs, cluster, placed.replicas) == k
    # no replicas (or only rings) -> every step
    assert auto_replicate_every(plan, costs, cluster) == 1
    one = Plan(model_hash="h", cluster_hash="c", batch_size=2, micro_batch_size=2,
               num_micro_batches=1, stages=(Stage((0, 5), ("d0",), (2,)),), num_layers=6)
    solo = make_cluster([1.0], memory_mib=1024)
    assert with_replicas(one, COSTS, solo).replicas == {"d0": ()}
    assert idle_time_s(one, COSTS, solo) == {"d0": 0.0}
    assert auto_replicate_every(one, COSTS, solo) == 1


def test_auto_replicate_every_caps_at_max_k(caplog: pytest.LogCaptureFixture) -> None:
    plan, costs, cluster = _bench(param_mib=64)
    placed = with_replicas(plan, costs, cluster)
    with caplog.at_level(logging.WARNING, logger="solver.replicas"):
        assert auto_replicate_every(placed, costs, cluster, max_k=4) == 4
    assert "exceeds 50 % of the idle time even every 4 steps" in caplog.text
    assert auto_replicate_every(placed, costs, cluster, max_k=64) > 4


def test_auto_replicate_every_rejects_bad_budget_and_max_k() -> None:
    plan, costs, cluster = _bench()
    with pytest.raises(PlanError, match=r"budget must be > 0 .* got 0\.0"):
        auto_replicate_every(plan, costs, cluster, budget=0.0)
    with pytest.raises(PlanError, match=r"budget must be > 0 .* got -1"):
        auto_replicate_every(plan, costs, cluster, budget=-1)
    with pytest.raises(PlanError, match="budget must be > 0 .* got nan"):
        auto_replicate_every(plan, costs, cluster, budget=float("nan"))
    with pytest.raises(PlanError, match=r"max_k must be >= 1 .* got 0"):
        auto_replicate_every(plan, costs, cluster, max_k=0)


def test_plan_replication_settles_holders_and_period_together() -> None:
    plan, costs, cluster = _bench(param_mib=16)
    replicas, k = plan_replication(plan, costs, cluster)
    # the period fits the traffic of the placement made for that period
    assert replicas == choose_replicas(plan, costs, cluster, every_k_steps=k)
    assert auto_replicate_every(plan, costs, cluster, replicas) <= k
    idle = idle_time_s(plan, costs, cluster)
    load = replication_load_s(plan, costs, cluster, replicas, every_k_steps=k)
    assert all(load[d] <= 0.5 * idle[d] for d in load)
    assert k == 3 and all(replicas[d] for d in plan.devices)
    # a fixed period is kept as given, with the placement for it
    fixed, one = plan_replication(plan, costs, cluster, every_k_steps=1)
    assert one == 1 and fixed == choose_replicas(plan, costs, cluster)
    # small state: every step
    assert plan_replication(*_bench(param_mib=0.01))[1] == 1
    with pytest.raises(PlanError, match="every_k_steps must be >= 1, got 0"):
        plan_replication(plan, costs, cluster, every_k_steps=0)
