"""Tests of partner links in the class bound (solver/partners.py)."""

from __future__ import annotations

import itertools
import math
from typing import Any

from solver.space import ClassSpace
from tests.solver_cases import random_instance


def test_pair_links_see_a_wired_pair_from_outside() -> None:
    # a wired pair of two boards of a kind: as a group of two, its all-reduce goes over the
    # fast link and both members receive over the slow network; a pair of one of them and
    # another board receives the first one's share over the fast link
    from solver.partners import find_partners, pair_links
    from solver.space import ClassSpace
    from tests.solver_cases import make_cluster, uniform_costs

    costs = uniform_costs(3)
    cluster = make_cluster([1.0, 1.0, 1.0, 1.0], bandwidth_mbps=100.0,
                           links=[("d0", "d1", 1000.0)]).for_costs(costs)
    space = ClassSpace(costs, cluster)
    classes = [list(members) for members in space.classes]
    assert sorted(len(c) for c in classes) == [2, 2]
    fast, slow = 1000e6 / 8, 100e6 / 8
    wired = next(k for k, members in enumerate(classes)
                 if {space.names[d] for d in members} == {"d0", "d1"})
    variants = pair_links(space, classes)
    both = tuple(2 if k == wired else 0 for k in range(2))
    assert variants[both] == [(fast, 0.0, tuple((slow, slow) if k == wired else ()
                                                for k in range(2)), 0)]
    mixed = (1, 1)
    assert sorted(v[0] for v in variants[mixed]) == [slow]
    ins = variants[mixed][0][2]
    assert ins[wired] == (fast,) and ins[1 - wired] == (slow,)
    # [Note: partner links]: d0 and d1 are each other's partners, one of them at most
    # receives over the wired link; the pair of a wired board and another has a variant
    # over it (one member counted) and one without
    partners = find_partners(space)
    assert partners is not None
    mate, second, most = partners
    names = space.names
    assert {names[mate[names.index("d0")]], names[mate[names.index("d1")]]} == {"d0", "d1"}
    assert mate[names.index("d2")] is None and most == 1
    assert second[names.index("d0")] == slow
    counted = pair_links(space, classes, partners)
    assert counted[both] == variants[both]
    assert sorted((v[2][wired], v[3]) for v in counted[mixed]) == [((slow,), 0),
                                                                  ((fast,), 1)]


def test_partners_need_a_mutual_pair() -> None:
    # a hub whose fast links go out to every other device: each of those has the hub as
    # its partner, the hub has none (a tie), and nothing limits them (None)
    from solver.partners import find_partners
    from solver.space import ClassSpace
    from tests.solver_cases import make_cluster, uniform_costs

    costs = uniform_costs(3)
    hub = make_cluster([1.0] * 4, bandwidth_mbps=100.0,
                       links=[("d0", f"d{k}", 1000.0) for k in (1, 2, 3)]).for_costs(costs)
    assert find_partners(ClassSpace(costs, hub)) is None


def _pair_links_by_lookup(space: ClassSpace, classes: list[list[int]],
                          partners: Any) -> dict[tuple[int, ...], list[Any]]:
    """``pair_links`` as it was before the link matrices: every link asked of the
    cluster (the reference)."""
    cluster, names = space.cluster, space.names
    cls = {d: k for k, members in enumerate(classes) for d in members}
    devices = sorted(cls)
    out: dict[tuple[int, ...], list[Any]] = {}

    def bw(a: int, b: int) -> float:
        return cluster.bandwidth_bytes_s(names[a], names[b])

    for x, a in enumerate(devices):
        for b in devices[x + 1:]:
            link = max(bw(a, b), bw(b, a))
            lat = min(cluster.latency_s(names[a], names[b]), cluster.latency_s(names[b], names[a]))
            options = []
            for d in (a, b):
                rest = [bw(e, d) for e in devices if e not in (a, b)]
                best = max(rest) if rest else math.inf
                mate = None if partners is None else partners[0][d]
                if mate is None or mate in (a, b):
                    options.append((cls[d], [(best, 0)]))
                else:
                    options.append((cls[d], [(best, 1), (partners[1][d], 0)]))
            for (rate_a, f_a), (rate_b, f_b) in itertools.product(options[0][1], options[1][1]):
                per: list[list[float]] = [[] for _ in classes]
                per[options[0][0]].append(rate_a)
                per[options[1][0]].append(rate_b)
                value = (link, lat, tuple(tuple(sorted(p, reverse=True)) for p in per), f_a + f_b)
                known = out.setdefault(tuple(len(p) for p in per), [])
                if value not in known:
                    known.append(value)
    return out


def test_link_matrices_give_what_the_cluster_says() -> None:
    """The helpers read every link once per space (``space_links``) and give what asking the
    cluster for each pair gives: the fastest link into each device, the smallest latency,
    and per pair of devices its variants, with and without partners (fleets of wired
    pairs); the pairs are computed once per space and classes."""
    from solver.link_floors import in_bandwidth, min_latency
    from solver.partners import find_partners, pair_links

    checked = 0
    for seed in range(40):
        costs, cluster, _ = random_instance(seed, max_devices=7, links=True, latency=True)
        space = ClassSpace(costs, cluster.for_costs(costs))
        names, c = space.names, space.cluster
        for d, got in enumerate(in_bandwidth(space)):
            ins = [c.bandwidth_bytes_s(e, names[d]) for e in names if e != names[d]]
            assert got == (max(ins) if ins else math.inf)
        lats = [c.latency_s(a, b) for a in names for b in names if a != b]
        assert min_latency(space) == (min(lats) if lats else 0.0)
        classes = [list(m) for m in space.classes]
        mates = find_partners(space)
        for partners in [None] if mates is None else [None, mates]:
            found = pair_links(space, classes, partners)
            assert found == _pair_links_by_lookup(space, classes, partners)
            assert pair_links(space, classes, partners) is found
            checked += 1
    assert checked >= 40
