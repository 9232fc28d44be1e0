"""Tests of iterative widening (solver/widening.py): sub-clusters, lifted plans, the incumbent."""

from __future__ import annotations

import math
import random
import time

import pytest

from contracts.cluster import Cluster
from contracts.table import CostTable
from solver.anytime import wide_size
from solver.dp import asteroid_dp
from solver.evaluate import evaluate
from solver.space import sorted_devices
from solver.widening import WIDEN_WIDE_MAX, lift, sub_clusters, units, widen
from tests.solver_cases import make_cluster, random_costs


def fleet_instance(seed: int = 0, devices: int = 12,
                   layers: int = 10) -> tuple[CostTable, Cluster]:
    """A fleet in small: boards of three speeds on 100 Mbps with 2 ms latency, and wired
    1000 Mbps pairs (d0-d4, d1-d5, d2-d6, ...: each pair of two speeds)."""
    costs = random_costs(random.Random(seed), layers)
    speeds = [(2.0, 1.4, 1.0)[i % 3] for i in range(devices)]
    pairs = [(f"d{i}", f"d{i + 4}", 1000.0) for i in range(devices // 4)]
    cluster = make_cluster(speeds, links=pairs, latency_ms=2.0,
                           link_latency=[(a, b, 0.2) for a, b, _ in pairs])
    return costs, cluster.for_costs(costs)


def test_units_keep_the_fast_links_together() -> None:
    costs, cluster = fleet_instance()
    found = units(costs, cluster)
    assert sorted(n for u in found for n in u) == sorted(cluster.names)
    pairs = {frozenset(u) for u in found if len(u) == 2}
    assert pairs == {frozenset(("d0", "d4")), frozenset(("d1", "d5")),
                     frozenset(("d2", "d6"))}
    # the pairs first (two boards each), best first
    assert [len(u) for u in found[:3]] == [2, 2, 2]


def test_sub_clusters_are_units_and_the_most_capable_devices() -> None:
    costs, cluster = fleet_instance()
    order = [d.name for d in sorted_devices(cluster, costs)]
    subs = sub_clusters(costs, cluster, sizes=(4, 8, 12))
    assert len(subs) == len(set(subs))
    assert all(len(s) < len(cluster.names) for s in subs)   # 12: the cluster itself
    # the two fastest pairs: d0-d4 (2.0 + 1.4) and d2-d6 (1.0 + 2.0), not d1-d5 (1.4 + 1.0)
    assert set(subs[0]) == {"d0", "d4", "d2", "d6"}
    assert tuple(order[:4]) in subs and tuple(order[:8]) in subs
    assert all(list(s) == sorted(s, key=order.index) for s in subs)


def test_a_uniform_network_has_one_sub_cluster_per_size() -> None:
    costs = random_costs(random.Random(1), 6)
    cluster = make_cluster([2.0, 1.0, 1.4] * 4, bandwidth_mbps=1000.0).for_costs(costs)
    order = [d.name for d in sorted_devices(cluster, costs)]
    assert sub_clusters(costs, cluster, sizes=(4, 8)) == [tuple(order[:4]), tuple(order[:8])]


def test_the_lifted_round_is_the_whole_clusters_prediction() -> None:
    costs, cluster = fleet_instance()
    found = widen(costs, cluster, 16, deadline=time.perf_counter() + 60.0, sizes=(4, 8))
    assert found.plan is not None and math.isfinite(found.round_time_s)
    assert found.plan.cluster_hash == cluster.cluster_hash
    assert set(found.plan.devices) <= set(found.devices) <= set(cluster.names)
    assert len(found.plan.devices) < len(cluster.names)
    whole = evaluate(found.plan, costs, cluster)
    assert whole.fits and whole.round_time_s == found.round_time_s
    # the same round as on the sub-cluster that planned it
    sub = evaluate(found.plan, costs, cluster.subset(found.devices))
    assert sub.round_time_s == pytest.approx(whole.round_time_s, rel=1e-12)
    again, value = lift(found.plan, costs, cluster)
    assert again == found.plan and value == found.round_time_s


def test_widening_is_no_worse_than_the_exact_plan_of_each_sub_cluster() -> None:
    costs, cluster = fleet_instance(seed=2)
    found = widen(costs, cluster, 16, deadline=time.perf_counter() + 60.0, sizes=(4, 8))
    assert found.searched == tuple(sub_clusters(costs, cluster, sizes=(4, 8)))
    checked = 0
    for names in found.searched:
        sub = cluster.subset(names)
        if wide_size(costs, sub) > WIDEN_WIDE_MAX:
            continue
        exact = asteroid_dp(costs, sub, 16, space="classes")
        assert exact.complete
        assert found.round_time_s <= exact.round_time_s * (1 + 1e-12)
        checked += 1
    assert checked >= 2


def test_only_a_better_plan_than_the_incumbent_is_returned() -> None:
    costs, cluster = fleet_instance()
    first = widen(costs, cluster, 16, deadline=time.perf_counter() + 60.0, sizes=(4,))
    assert first.plan is not None
    again = widen(costs, cluster, 16, deadline=time.perf_counter() + 60.0, sizes=(4,),
                  incumbent=first.round_time_s)
    assert again.plan is None and again.round_time_s == first.round_time_s
    # a deadline already past searches nothing
    late = widen(costs, cluster, 16, deadline=time.perf_counter() - 1.0)
    assert late.plan is None and late.searched == ()
