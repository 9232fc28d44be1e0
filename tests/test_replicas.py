"""Tests of replica placement (solver/replicas.py) on hand-written plans and clusters."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import pytest

from asteroid_fx.errors import PlanError
from solver.cluster import Cluster
from solver.evaluate import evaluate
from solver.plan import Plan, Stage
from solver.replicas import (
    choose_replicas,
    replication_time_s,
    stage_state_bytes,
    with_replicas,
)
from tests.solver_cases import MIB, make_cluster, uniform_costs

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


def test_holders_are_neighbours_and_memory_fits() -> None:
    plan = _chain()
    cluster = make_cluster([1.0, 1.0, 1.0], memory_mib=1024)
    replicas = choose_replicas(plan, COSTS, cluster)
    assert replicas["d0"] == ("d1",)  # the first stage has one neighbour
    assert replicas["d2"] == ("d1",)  # so does the last
    assert replicas["d1"] in (("d0",), ("d2",))
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
    # with room for only one replica on d1, one end stage stays unprotected
    cluster = _tight(plan, {"d0": 9.0, "d1": 9.0, "d2": 9.0})
    replicas = choose_replicas(plan, COSTS, cluster)
    assert evaluate(replace(plan, replicas=replicas), COSTS, cluster).fits
    assert sorted(len(replicas[d]) for d in ("d0", "d2")) == [0, 1]
    assert len(replicas["d1"]) == 1


def test_no_room_gives_empty_entry_or_plan_error(caplog: pytest.LogCaptureFixture) -> None:
    plan = _chain()
    cluster = _tight(plan, {"d0": 1.0, "d1": 1.0, "d2": 1.0})
    with caplog.at_level(logging.WARNING, logger="solver.replicas"):
        replicas = choose_replicas(plan, COSTS, cluster)
    assert replicas == {"d0": (), "d1": (), "d2": ()}
    assert "no neighbouring device has room" in caplog.text
    with pytest.raises(PlanError, match=r"stage \d \(layers .* has 0 of 1 replica holder"):
        choose_replicas(plan, COSTS, cluster, strict=True)
    placed = with_replicas(plan, COSTS, cluster)
    assert placed.predicted is not None and placed.predicted.fits


def test_single_device_plan_has_no_holder() -> None:
    plan = Plan(model_hash="h", cluster_hash="c", batch_size=2, micro_batch_size=2,
                num_micro_batches=1, stages=(Stage((0, 5), ("d0",), (2,)),), num_layers=6)
    cluster = make_cluster([1.0, 1.0], memory_mib=1024)
    assert choose_replicas(plan, COSTS, cluster) == {"d0": ()}


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
    assert replicas["d0"] == ("d1",)  # only one neighbour exists
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
