"""Partner links in the class bound: devices whose fastest link goes to one other device."""

from __future__ import annotations

import itertools
import math

import numpy as np

from solver.link_floors import space_links
from solver.space import ClassSpace, SearchSpace

__all__ = ["Partners", "FAST_GROUP_MAX", "FAST_PRICE", "find_partners", "pair_links"]


def pair_links(space: ClassSpace, classes: list[list[int]],
               partners: Partners | None = None) -> dict[
        tuple[int, ...], list[tuple[float, float, tuple[tuple[float, ...], ...], int]]]:
    """Per count vector of two devices of ``classes``, the variants of [Note: pairs of
    devices]: ``(link bandwidth, link latency, per class the links into its members from
    outside the pair, fastest first, members over a partner's link)``, one per distinct
    value over the pairs of devices of those counts. ``partners`` (``find_partners``): a
    member whose partner is outside the pair receives over the partner's link (counted)
    or over the fastest of the rest ([Note: partner links]).

    [Note: pairs of devices]
    A group's members receive their shares from the stage before, a group disjoint from
    theirs, so a link between two members is no link into the group: on a fleet whose
    fast links are wired pairs, a pair that takes a stage together all-reduces over its
    fast link and receives over slow ones, and a pair that receives over two fast links
    all-reduces over a slow one. The bounds of a group of many devices take the fastest
    link into each member and the best link between members of its classes (or the best
    triangle's) apart, which gives a two-device group both; a group of two devices is
    instead taken per pair of devices ``{a, b}``: the all-reduce over the link ``a-b``
    (the faster way and the smaller latency: at most ``allreduce_time``'s numbers), each
    member's share over its fastest link from a device other than the two (inf where
    there is none: no stage can come before a group of the whole cluster). The DP takes
    the smallest over the variants of a count vector, so every stage on any pair has
    bounds at least one variant's. (Groups of three or more already all-reduce over the
    best triangle's slowest link, which on such fleets is a slow one.)"""
    links = space_links(space)
    key = (tuple(tuple(c) for c in classes), None if partners is None else (
        tuple(partners[0]), tuple(partners[1]), partners[2]))
    found = links.pairs.get(key)
    if found is not None:
        return found
    cls = {d: k for k, members in enumerate(classes) for d in members}
    devices = sorted(cls)
    n_classes = len(classes)
    # per device, the devices by their link into it, fastest first (ties by index): the
    # fastest from outside a pair is the first of these not in it
    ranked = {d: [e for e in np.argsort(-links.bw[:, d], kind="stable").tolist()
                  if e != d and e in cls] for d in devices}

    def best_in(d: int, other: int) -> float:
        for e in ranked[d]:
            if e != other:
                return float(links.bw[e, d])
        return math.inf

    out: dict[tuple[int, ...],
              list[tuple[float, float, tuple[tuple[float, ...], ...], int]]] = {}
    for x, a in enumerate(devices):
        for b in devices[x + 1:]:
            link = float(links.sym_bw[a, b])
            lat = float(links.sym_lat[a, b])
            # per member: (class, [(link in from outside the pair, over its partner)])
            options: list[tuple[int, list[tuple[float, int]]]] = []
            for d in (a, b):
                best = best_in(d, b if d == a else a)
                mate = None if partners is None else partners[0][d]
                if mate is None or mate in (a, b) or partners is None:
                    options.append((cls[d], [(best, 0)]))
                else:
                    options.append((cls[d], [(best, 1), (partners[1][d], 0)]))
            for (rate_a, f_a), (rate_b, f_b) in itertools.product(options[0][1],
                                                                 options[1][1]):
                per: list[list[float]] = [[] for _ in range(n_classes)]
                per[options[0][0]].append(rate_a)
                per[options[1][0]].append(rate_b)
                take = tuple(len(p) for p in per)
                value = (link, lat, tuple(tuple(sorted(p, reverse=True)) for p in per),
                         f_a + f_b)
                known = out.setdefault(take, [])
                if value not in known:
                    known.append(value)
    links.pairs[key] = out
    return out


Partners = tuple[list[int | None], list[float], int]
"""``find_partners``' value: per device its partner (None: none), its fastest link in from
any device but its partner, and the most members over partners' links in a plan."""

FAST_GROUP_MAX = 16
"""The priced class bound counts the members over partners' links in groups of at most
this many devices ([Note: partner links]); larger groups take them for free (fewer
groups)."""

FAST_PRICE = 1.0
"""The price of a member over a partner's link in ``relaxed``, in units of the fastest
class's device price ([Note: partner links])."""


def find_partners(space: SearchSpace) -> Partners | None:
    """[Note: partner links]: per device its *partner*, the one device whose link into it
    is faster than every other device's (None where two or more tie, or alone), its
    fastest link in from any other device, and ``K``, the most devices of a plan that
    receive from their partners; None where no two devices are each other's partners
    (then ``K`` is the number of devices with a partner, no limit).

    [Note: partner links]
    Where a device ``e`` has a partner ``p``, a message into ``e`` from any other device
    goes over a link no faster than ``e``'s second-fastest; so ``e`` receives a share over
    its fastest link only where ``p`` is in the stage right before ``e``'s. Two devices
    that are each other's partners (a wired pair on a fleet) cannot both do that: each
    would be in the stage before the other. So a plan has at most ``K`` = (devices with a
    partner) - (such mutual pairs) members that receive over a partner's link. The priced
    class bound (``relaxed``) counts them: a group's variant with ``f`` of them takes the
    ``f`` fastest links in of its classes' members and the fastest second links for the
    others (every group with ``f`` such members receives no faster: the links of each
    kind are at most those, member for member), and pays ``f`` times a Lagrange price
    (``FAST_PRICE`` times the device price, its factor walked after the device prices in
    each bucket) against ``K`` of them, as for the devices of each class: every value is
    still a lower bound. To keep the groups few, ``f`` runs over ``0`` and ``[g, 2g - 1]``
    for ``g = 1, 2, 4, ...``, each range one variant of cost ``g`` at the links of its
    largest ``f`` (no slower than any ``f`` in it, as long as a partner's link is faster
    than the second link it replaces; beyond that more only slow the group down, and the
    last variant covers them), and groups of more than ``FAST_GROUP_MAX`` devices take
    every member's fastest link for free (a relaxation of the count: they pay nothing,
    and the others pay for at most ``K``). Groups of two devices take it per pair of
    devices ([Note: pairs of devices]). Without the count, a fleet's coarse classes let
    every member of a wired pair receive at the pair's speed, in every stage at once
    (ResNet-50 on the 32-device fleet of ``tools/time_planner.py``, micro-batch 8: 1.30 s
    without, 1.66 s with it, against 2.92 s where no member may use a partner's link).
    Counted pools see the classes of the stage before instead and do not use it."""
    n = space.n
    if n < 3:
        return None
    bw = space_links(space).bw
    mate: list[int | None] = []
    second: list[float] = []
    for e in range(n):
        links = sorted(((float(bw[d, e]), d) for d in range(n) if d != e), reverse=True)
        if links[0][0] > links[1][0]:
            mate.append(links[0][1])
            second.append(links[1][0])
        else:
            mate.append(None)
            second.append(links[0][0])
    mutual = 0
    for e, p in enumerate(mate):
        if p is not None and mate[p] == e:
            mutual += 1
    mutual //= 2
    if not mutual:
        return None
    return mate, second, sum(1 for m in mate if m is not None) - mutual
