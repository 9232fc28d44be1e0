"""Tests of the search spaces (solver/space.py): device classes, the capability order, groups."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest

from contracts.cluster import Cluster, Device, Link
from contracts.plan import Plan, Stage
from contracts.table import CostTable
from solver.evaluate import evaluate, pieces_time, transfer_time
from solver.space import (
    EVEN_OFF_CLASS,
    ClassSpace,
    EvenSpace,
    SliceSpace,
    balanced_cuts,
    candidate_cuts,
    device_classes,
    sorted_devices,
)
from tests.solver_cases import (
    make_cluster,
    make_costs,
    random_cluster,
    random_costs,
    scaled_column,
    typed_cluster,
    uniform_costs,
    with_ops,
)


def test_identical_devices_form_one_class() -> None:
    costs = uniform_costs(3)
    assert device_classes(make_cluster([1.0, 1.0, 1.0]), costs) == [["d0", "d1", "d2"]]
    # speed, memory and type each split a class; classes follow the capability order
    assert device_classes(make_cluster([1.0, 2.0, 1.0, 2.0]), costs) == [["d1", "d3"],
                                                                          ["d0", "d2"]]
    assert device_classes(make_cluster([1.0, 1.0], memory_mib=[64, 128]), costs) == [
        ["d1"], ["d0"]]
    typed = typed_cluster(["custom", "local"], [1.0, 1.0])
    assert len(device_classes(typed, costs)) == 2


def test_links_split_classes_into_twins() -> None:
    costs = uniform_costs(3)
    # a fast pair: its two members see everyone else alike (a class of two); the rest
    # see the pair alike too, so they stay one class
    pair = make_cluster([1.0] * 5, links=[("d0", "d1", 1000.0)])
    assert device_classes(pair, costs) == [["d0", "d1"], ["d2", "d3", "d4"]]
    # two disjoint pairs: a member of one pair is not interchangeable with a member of the
    # other (its partner differs), so each pair is its own class
    two = make_cluster([1.0] * 4, links=[("d0", "d1", 1000.0), ("d2", "d3", 1000.0)])
    assert device_classes(two, costs) == [["d0", "d1"], ["d2", "d3"]]
    # a device with a link of its own is alone
    odd = make_cluster([1.0] * 3, links=[("d0", "d2", 50.0)])
    assert device_classes(odd, costs) == [["d0", "d2"], ["d1"]]
    lat = make_cluster([1.0] * 3, link_latency=[("d1", "d2", 5.0)])
    assert device_classes(lat, costs) == [["d0"], ["d1", "d2"]]


def test_classes_are_symmetries_of_the_model() -> None:
    """Swapping two devices of a class changes no predicted number of any plan."""
    rng = random.Random(3)
    checked = 0
    for _ in range(40):
        costs = random_costs(rng, 4)
        speeds = [rng.choice([0.5, 1.0]) for _ in range(5)]
        links = [("d0", "d1", 1000.0)] if rng.random() < 0.5 else []
        cluster = make_cluster(speeds, 512.0, rng.choice([10.0, 100.0]), links,
                               latency_ms=rng.choice([0.0, 2.0]))
        for members in device_classes(cluster, costs):
            for a, b in itertools.combinations(members, 2):
                swap = {a: b, b: a}
                names = list(cluster.names)
                rng.shuffle(names)
                stages = (Stage((0, 1), tuple(names[:2]), (3, 1)),
                          Stage((2, 3), tuple(names[2:4]), (2, 2)))
                plan = Plan("h", cluster.cluster_hash, 8, 4, 2, stages, num_layers=4)
                swapped = replace(plan, stages=tuple(
                    Stage(s.layers, tuple(swap.get(d, d) for d in s.devices), s.shares)
                    for s in stages))
                one, two = evaluate(plan, costs, cluster), evaluate(swapped, costs, cluster)
                assert one.round_time_s == two.round_time_s
                assert one.stages == two.stages
                checked += 1
    assert checked > 20


def test_capability_order_keeps_classes_together() -> None:
    costs = uniform_costs(2)
    # equal speed and memory: d0 and d2 (both linked fast to d3) are one class, d1 another;
    # by name alone d1 would sit between them
    cluster = make_cluster([1.0, 1.0, 1.0, 2.0],
                           links=[("d0", "d3", 1000.0), ("d2", "d3", 1000.0)])
    order = [d.name for d in sorted_devices(cluster, costs)]
    assert order == ["d3", "d0", "d2", "d1"]
    assert device_classes(cluster, costs) == [["d3"], ["d0", "d2"], ["d1"]]


def test_slice_space_offers_consecutive_slices() -> None:
    costs = uniform_costs(2)
    cluster = make_cluster([3.0, 2.0, 1.0])
    space = SliceSpace(costs, cluster, sorted_devices(cluster, costs))
    groups = space.groups(space.root, 2)
    assert [space.group(g).names for g, _ in groups] == [("d0",), ("d0", "d1")]
    assert [space.pool_size(left) for _, left in groups] == [2, 1]
    assert space.pool_speed(space.root) == pytest.approx(6.0)
    assert space.best_speed(space.root, 2) == pytest.approx(5.0)
    assert space.prefix_speed(1) == pytest.approx(3.0)


def test_class_space_offers_every_count_vector() -> None:
    costs = uniform_costs(2)
    cluster = make_cluster([2.0, 2.0, 1.0])
    space = ClassSpace(costs, cluster)
    assert space.counts == (2, 1)
    groups = space.groups(space.root, 3)
    counts = sorted(space.group_counts(g) for g, _ in groups)
    assert counts == [(0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert space.groups(space.root, 1) == [g for g in groups if space.group(g[0]).size == 1]
    # a plan's devices: the first free members of each class, stage after stage
    both = next(g for g, _ in groups if space.group_counts(g) == (1, 1))
    one = next(g for g, _ in groups if space.group_counts(g) == (1, 0))
    assert space.assign([both, one]) == [("d0", "d2"), ("d1",)]
    assert space.best_speed(space.root, 2) == pytest.approx(4.0)


def test_class_space_transfers_equal_evaluate() -> None:
    """Re-sharding between two groups, from class-level links, equals ``transfer_time``
    on the devices a plan would use."""
    rng = random.Random(5)
    for _ in range(30):
        cluster = random_cluster(rng, 5, links=True, latency=True)
        costs = random_costs(rng, 3)
        space = ClassSpace(costs, cluster)
        groups = space.groups(space.root, 3)
        for (g1, _), (g2, _) in itertools.product(groups, repeat=2):
            if any(a + b > n for a, b, n in zip(space.group_counts(g1), space.group_counts(g2),
                                                space.counts, strict=True)):
                continue
            s1 = tuple(rng.randint(1, 3) for _ in range(space.group(g1).size))
            size = space.group(g2).size
            if sum(s1) < size:
                continue
            s2 = (sum(s1) - size + 1,) + (1,) * (size - 1)
            names = space.assign([g1, g2])
            expect = transfer_time(cluster, names[0], s1, names[1], s2, 4096)
            got = pieces_time(space.pieces(g1, s1, g2, s2), len(s1), len(s2), 4096)
            assert got == expect


def test_columns_split_classes_by_time_source() -> None:
    costs = with_ops(uniform_costs(2), ["conv", "matmul"])
    costs = replace(costs, columns=(scaled_column(costs, "jetson-nano",
                                                  {"conv": 2.0, "matmul": 2.0}),))
    # same declared speed, but the nano takes its column: two classes
    cluster = typed_cluster(["jetson-nano", "custom", "jetson-nano"], [0.5, 0.5, 0.5])
    classes = device_classes(cluster, costs)
    assert sorted(map(sorted, classes)) == [["d0", "d2"], ["d1"]]


def test_memory_override_splits_a_type() -> None:
    costs = uniform_costs(2)
    cluster = Cluster(devices=(Device("a", "jetson-nano", 4 << 30, flops=1e9),
                               Device("b", "jetson-nano", 2 << 30, flops=1e9),
                               Device("c", "jetson-nano", 4 << 30, flops=1e9)),
                      bandwidth_mbps=100.0, links=(Link("a", "b", 10.0),))
    assert device_classes(cluster, costs) == [["a"], ["c"], ["b"]]


def _candidate_cuts_loop(costs: CostTable, max_cuts: int) -> list[int]:
    """``candidate_cuts`` as a loop over the boundaries per target (before issue 14's
    fleet work took every target's distances at once)."""
    n = costs.num_layers
    work = [lc.fwd.at(1) + lc.bwd.at(1) for lc in costs.layers]
    total = sum(work) or 1.0
    prefix = [0.0]
    for w in work:
        prefix.append(prefix[-1] + w)
    chosen: set[int] = set()
    step = total / (max_cuts + 1)
    for k in range(1, max_cuts + 1):
        target = k * step
        best = min(range(n - 1), key=lambda c: abs(prefix[c + 1] - target))
        window = [c for c in range(n - 1) if abs(prefix[c + 1] - target) <= step / 2] or [best]
        chosen.add(min(window, key=lambda c: (costs.cut_bytes[c],
                                              abs(prefix[c + 1] - target))))
    return sorted(chosen)


def test_candidate_cuts_equal_the_loop_version() -> None:
    """The same cuts as the loop per target, with ties of cut bytes and of distances
    (equal layers and equal cuts), and with layers of no work."""
    rng = random.Random(15)
    for trial in range(40):
        n = rng.randint(3, 120)
        if trial % 3 == 0:
            costs = uniform_costs(n)
        elif trial % 3 == 1:
            costs = random_costs(rng, n)
        else:
            costs = make_costs([(0.0, float(rng.randint(0, 2))) for _ in range(n)],
                               [(0.0, float(rng.randint(0, 2))) for _ in range(n)],
                               [0] * n, [1024] * n,
                               [rng.choice([1024, 2048]) for _ in range(n - 1)])
        for max_cuts in (1, 2, 5, 12, 30, 96):
            if n - 1 > max_cuts:
                assert candidate_cuts(costs, max_cuts) == _candidate_cuts_loop(costs, max_cuts), \
                    (trial, max_cuts)


def test_listing_the_groups_of_many_classes_stops_at_the_deadline() -> None:
    # 22 devices of 22 classes (each with a link of its own): 2^22 count vectors at the
    # root; a deadline already past stops the listing, which is not kept half done
    import time

    from solver.dp import asteroid_dp
    from solver.space import GroupsTimeout

    n = 22
    costs = uniform_costs(4)
    cluster = make_cluster([1.0 + 0.01 * i for i in range(n)],
                           links=[(f"d{i}", f"d{i + 1}", 1000.0 + i) for i in range(n - 1)])
    space = ClassSpace(costs, cluster)
    assert space.num_classes == n
    with pytest.raises(GroupsTimeout):
        space.groups(space.root, n, deadline=time.perf_counter() - 1.0)
    assert (space.root, n) not in space._groups
    started = time.perf_counter()
    found = asteroid_dp(costs, cluster, 16, space="classes", deadline=started + 0.2)
    assert not found.complete and time.perf_counter() - started < 2.0


def test_balanced_cuts_pick_from_the_allowed_cuts_as_the_candidates_from_all() -> None:
    rng = random.Random(5)
    costs = random_costs(rng, 80)
    every = list(range(79))
    # over every boundary it is the candidate rule itself
    for count in (3, 10, 40):
        assert balanced_cuts(costs, every, count) == candidate_cuts(costs, count)
    allowed = candidate_cuts(costs, 30)
    for count in (1, 5, 12):
        cuts = balanced_cuts(costs, allowed, count)
        assert 1 <= len(cuts) <= count
        assert cuts == sorted(set(cuts)) and set(cuts) <= set(allowed)
    # no more allowed cuts than asked for: all of them
    assert balanced_cuts(costs, allowed[:4], 4) == allowed[:4]
    # the cheapest boundary within half a step of an even split wins over the nearest
    cut_bytes = [1000] * 8
    cut_bytes[2] = 10        # nine equal layers: boundaries 3 and 4 are nearest the half
    cheap = make_costs([(0.0, 0.01)] * 9, [(0.0, 0.02)] * 9, [1024] * 9, [1024] * 9,
                       cut_bytes, name="cheap-cut")
    assert balanced_cuts(cheap, list(range(8)), 1) == [2]
    assert balanced_cuts(uniform_costs(9), list(range(8)), 1) in ([3], [4])


def test_even_space_offers_the_class_groups_of_even_size_nearly_one_class() -> None:
    # [Note: even groups]: for every pool and micro-batch size, the count vectors of the
    # wide space whose size divides the micro-batch with at most EVEN_OFF_CLASS devices
    # outside their largest class, each leaving the same pool
    rng = random.Random(5)
    checked = 0
    for _ in range(30):
        costs = random_costs(rng, 2)
        cluster = random_cluster(rng, rng.randint(1, 7), links=rng.random() < 0.5)
        wide, even = ClassSpace(costs, cluster), EvenSpace(costs, cluster)
        assert even.counts == wide.counts and not even.exhaustive_order
        for counts in itertools.product(*(range(c + 1) for c in wide.counts)):
            for limit in range(1, 9):
                expected = {(wide.group_counts(g), wide.pool_counts(rest))
                            for g, rest in wide.groups(wide.pool_id(counts), limit)
                            if limit % sum(wide.group_counts(g)) == 0
                            and sum(wide.group_counts(g)) - max(wide.group_counts(g))
                            <= EVEN_OFF_CLASS}
                got = [(even.group_counts(g), even.pool_counts(rest))
                       for g, rest in even.groups(even.pool_id(counts), limit)]
                assert len(got) == len(set(got)) and set(got) == expected
                checked += len(got)
    assert checked > 1000


def test_micro_batch_choices_are_the_divisors() -> None:
    from solver.space import divisors, micro_batch_choices

    for n in range(1, 400):
        assert micro_batch_choices(n, None) == [b for b in range(1, n + 1) if n % b == 0]
    # by pairs up to the square root: 10**12 is immediate (the planners counted up to it)
    assert divisors(10**12)[-3:] == [250_000_000_000, 500_000_000_000, 10**12]


def test_a_batch_above_the_planners_largest_is_refused_up_front() -> None:
    from contracts.errors import PlanError
    from solver.space import MAX_BATCH_SIZE, check_batch_size, micro_batch_choices

    check_batch_size(MAX_BATCH_SIZE)
    with pytest.raises(PlanError, match="--batch-size 1000000000 is above 1048576"):
        check_batch_size(10**9, "--batch-size")
    with pytest.raises(PlanError, match="accumulate gradients"):
        micro_batch_choices(MAX_BATCH_SIZE + 2, None)
