"""The class bound's stage tables: lower bounds of every stage of every group of counts."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from solver.evaluate import WORKSPACE_FRACTION
from solver.link_floors import (
    ABOVE,
    SLACK,
    in_bandwidth,
    min_latency,
    min_max_ratio,
    min_max_ratios,
    space_links,
    triangle_links,
)
from solver.partners import FAST_GROUP_MAX, find_partners, pair_links
from solver.space import ClassSpace
from solver.timing import LayerSums

__all__ = ["CLASS_GROUPS_MAX", "CLASS_VECTORS_MAX", "CLASS_POOLS_MAX", "ClassTables", "Pooled",
           "Flat", "build_class_tables", "bound_classes", "counts_pools", "Late"]

CLASS_GROUPS_MAX = 1500
"""``class_bound`` uses at most this many groups (count vectors); above, groups with
counts in the same geometric bucket of every class merge into one that is at least as
good as each of them."""

CLASS_VECTORS_MAX = 20_000
"""``class_bound`` counts devices in coarser classes (same compute, links bounded by
their best) on clusters with more count vectors than this (``prod (n_k + 1)`` over the
classes), and gives up (None) where those too have more."""

CLASS_POOLS_MAX = 128
"""``class_bound`` counts the devices of every relaxed plan exactly (no prices) and reads
each transfer at the links of the stage before, where the classes have at most this
many count vectors (``prod (n_k + 1)``): [Note: counted pools]. The 200-layer MLP on
eight mixed devices has 72; BERT-small on the 16-device fleet (252, coarse classes)
was measured slower than its time limit with them, so it keeps the prices."""

_COMPARED_CELLS = 1 << 22
"""``_undominated`` compares a block of groups with every group at once, at most about
this many pairs a block."""


@dataclass(frozen=True)
class ClassTables:
    """Per first layer ``firsts[i]``: ``(x, big, t_a, next, shortest)``: lower bounds of
    the stage's ``X = E_f + E_b`` and ``max(E_f, E_b)`` and its exact ``T_a`` (groups x
    candidate ends), the row of the layer after each end, and the smallest ``x`` over the
    groups per end (non-decreasing); ``counts``: devices per class of each group.
    ``pooled``, where the pools are counted ([Note: counted pools]): per group and sender
    profile the smallest latency and the smallest ``max_e b_e / bw_e`` of a transfer into
    the group from a group of that profile; each group's own profile as a sender; per row
    the work of the layers before it and of the layers from it on, ``sum (intercepts +
    slopes b)`` forward and backward; the pools (count vectors of the classes, in the order
    of ``np.unravel_index`` over ``totals + 1``): ``src[g, q]``, the pool a suffix leaves
    after a stage on group ``g`` when it uses ``q`` (``n_pools``: none), the devices in
    each pool (and 0 for none), the bound speed each pool leaves free and the bound speed
    in it; and per row what ``_counted`` reads: the transfer bounds (groups x profiles),
    ``x`` without them, ``x`` with the smallest, the upper bound of ``_rigid_uppers``
    (groups x ends; inf: none), the compute part of ``max(E_f, E_b)``, ``T_a``, the next
    rows and the non-decreasing smallest ``x`` per end."""

    firsts: tuple[int, ...]
    rows: tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], ...]
    counts: np.ndarray
    totals: np.ndarray
    speeds: np.ndarray
    pooled: Pooled | None = None
    uppers: tuple[np.ndarray, ...] = ()
    fast: np.ndarray | None = None
    """Per group, the members it lets receive over a partner's link (priced tables where
    [Note: partner links] applies; None elsewhere), at most ``fast_total`` in a plan."""
    fast_total: float = 0.0
    work: tuple[np.ndarray, np.ndarray] | None = None
    """Per row the work of the layers before it and of the layers from it on (as in
    ``Pooled``), where every group's ``x`` is at least its work over its bound speed
    (priced tables with no merged groups; None elsewhere): [Note: states by speed]."""
    compiled: dict[str, Any] = field(default_factory=dict, compare=False, init=False)
    """The rows as ``solver.relaxation_compiled.pack`` lays them out, once built (and the
    counted pass's kinds; not an argument: ``dataclasses.replace`` gives the new tables
    an empty one, where a shared one handed tools/bound_bed.py's narrowed rows the packed
    arrays of the rows it replaced)."""


@dataclass(frozen=True)
class Pooled:
    """The parts of ``ClassTables`` that ``_counted`` needs (see there)."""

    latency: np.ndarray
    gamma: np.ndarray
    profile: np.ndarray
    head: np.ndarray
    tail: np.ndarray
    src: np.ndarray
    sizes: np.ndarray
    free_speed: np.ndarray
    speed: np.ndarray
    rows: tuple[tuple[np.ndarray, ...], ...]
    flat: dict[tuple[float, float], Flat] = field(default_factory=dict, compare=False)
    """``flat_stages`` by its caps (``top``, ``T_a`` limit)."""


@dataclass(frozen=True)
class Flat:
    """The stages of every row of a ``Pooled`` whose ``lowest`` and ``T_a`` are below caps,
    one array per field, rows in order (``row``): the group, the row after the stage
    (``nxt``), the smallest ``x`` of its row's ends up to its own (``shortest``: a run
    with ``top`` below it does not take the stage), ``lowest``, ``T_a``, the upper bound
    ``upper``, ``x`` and the bound of ``max(E_f, E_b)`` without the transfers (``x0``,
    ``big0``), and the transfer bounds of every row (rows x groups x sender profiles):
    what ``counted_run`` reads per row, gathered once for every run."""

    row: np.ndarray
    group: np.ndarray
    nxt: np.ndarray
    shortest: np.ndarray
    lowest: np.ndarray
    t_a: np.ndarray
    upper: np.ndarray
    x0: np.ndarray
    big0: np.ndarray
    comm: np.ndarray
    at: np.ndarray
    """Per stage the flat position of the row after it in a (row, pool, profile) table, at
    the stage's own profile: the suffix after the stage in pool ``q`` is at ``at + q
    n_prof``."""
    x: np.ndarray
    """Per stage and sender profile ``x0 + 2 comm`` (its transfers both ways)."""
    big: np.ndarray
    """Per stage and sender profile ``big0 + comm``."""


def _bucket(count: int) -> int:
    """Geometric bucket of a device count: 0, 1, 2, 3, 4-5, 6-7, 8-11, 12-15, ..."""
    if count < 4:
        return count
    top = count.bit_length() - 1
    return 2 * top + (1 if count >= 3 << (top - 1) else 0)


def build_class_tables(space: ClassSpace, sums: LayerSums, cut_bytes: Sequence[int],
                       ends: Sequence[int], micro_batch: int,
                       deadline: float | None = None, pools: bool = True,
                       memory: tuple[float, int] | None = None,
                       partner_links: bool = True,
                       top_cap: float = math.inf) -> ClassTables | None:
    """The per-stage lower bounds of [Note: the class bound] for every group of at most
    ``micro_batch`` devices (merged into buckets above ``CLASS_GROUPS_MAX``); ``Late``
    when the ``time.perf_counter()`` deadline passes first. ``partner_links``: count the
    members over partners' links where the pools are priced ([Note: partner links]; False:
    fewer groups, quicker tables). ``top_cap``: where the pools are counted, each row's
    ends stop before the first whose stages all have ``x`` above it (``shortest``: no
    counted run with a ``top`` at most the cap takes them). ``memory``: the optimizer
    state factor and the micro-batches a round, where known: mixed groups whose shares
    fit get upper bounds of ``X`` too ([Note: rigid groups]; priced tables only)."""
    classes = bound_classes(space)
    if classes is None:
        return None
    n_classes = len(classes)
    counts_all = tuple(len(c) for c in classes)
    bw_in = in_bandwidth(space)
    lat0 = min_latency(space)
    names, timing = space.names, space.timing
    heads = [members[0] for members in classes]
    # per pair of classes: an upper bound on the bandwidth and a lower bound on the latency
    # of a link between two of their members, either way (T_a's slowest link and largest
    # latency, so T_a below is a lower bound of the group's); 0 where no such pair
    net = space_links(space)
    link_bw = [[0.0] * n_classes for _ in range(n_classes)]
    link_lat = [[math.inf] * n_classes for _ in range(n_classes)]
    for k, a_members in enumerate(classes):
        for j, b_members in enumerate(classes):
            # (the diagonal is -inf and inf: no device links to itself)
            block = np.ix_(a_members, b_members)
            link_bw[k][j] = max(0.0, float(net.sym_bw[block].max()))
            link_lat[k][j] = float(net.sym_lat[block].min())
    tri_bw, tri_lat = triangle_links(space)
    # per class: bound speed, fastest links into its members (fastest first), time
    # source and divisor (the same for every member, bound_classes)
    per_class = [(space.bounds[d], sorted((bw_in[e] for e in members), reverse=True),
                  timing.device(names[d]).source, timing.device(names[d]).divisor)
                 for d, members in zip(heads, classes, strict=True)]
    pooled = pools and math.prod(c + 1 for c in counts_all) <= CLASS_POOLS_MAX
    profiles = _sender_profiles(link_bw, link_lat) if pooled else []
    # the one-device upper bounds need the stage bound's compute on the base times exact
    base = timing.base
    exact = all(list(getattr(sums, f)) == list(getattr(base, f))
                for f in ("fwd_intercept", "fwd_slope", "bwd_intercept", "bwd_slope")) \
        and (sums.call_fwd, sums.call_bwd) == (base.call_fwd, base.call_bwd)
    # the runtime's seconds per stage call, in every device's compute (the lower bounds
    # leave it out; the upper bounds of rigid groups add it)
    call = base.call_fwd + base.call_bwd
    uppers = (_rigid_uppers(space, classes, micro_batch) if exact
              else [[math.inf, math.inf]] * n_classes)
    rigid = [_same_memory(space, members) for members in classes]
    mixed = memory is not None and not pooled
    # per group: 1 / its slowest bound speed, whether it is rigid, and the most samples
    # a member of each class takes in Algorithm 1's split without memory caps
    # keyed by (count vector, variant): a count vector of two devices has a variant per
    # pair of devices that differs in its links ([Note: pairs of devices])
    extra: dict[tuple[tuple[int, ...], int], tuple[float, bool, tuple[int, ...]]] = {}
    ratios: dict[tuple[float, ...], float] = {}
    found: dict[tuple[tuple[int, ...], int], list[float]] = {}
    # [Note: partner links]: priced tables count the members that receive over a partner's
    # link (None: no such budget, every group as before)
    partners = None if pooled or not partner_links else find_partners(space)
    duos = pair_links(space, classes, partners)
    fasts: dict[tuple[tuple[int, ...], int], int] = {}
    gammas: dict[tuple[float, ...], float | None] = {}
    if partners is not None:
        second = partners[1]
        # per class, the members' fastest links in from anyone else but their partner
        slow_in = [sorted((second[e] for e in members), reverse=True) for members in classes]
    takes = list(itertools.product(*(range(c + 1) for c in counts_all)))
    # every count vector's beta at once (NaN: none)
    betas = min_max_ratios(micro_batch, [speed for speed, *_ in per_class],
                           np.asarray(takes, dtype=np.int64).reshape(len(takes), n_classes))
    for seen, take in enumerate(takes):
        if deadline is not None and not seen % 256 and time.perf_counter() > deadline:
            raise Late
        size = sum(take)
        if size == 0 or size > micro_batch:
            continue
        beta = float(betas[seen])
        if math.isnan(beta):
            continue
        present = [k for k, t in enumerate(take) if t]
        us = [per_class[k][0] for k in present]
        # per variant: the slowest link and largest latency inside (T_a) and, per class,
        # the links into its members from outside the group (fastest first)
        variants: list[tuple[float, float, tuple[tuple[float, ...], ...], int]] = []
        if size == 2:
            variants = duos.get(take, [])
        else:
            # the members with the fastest links into them: a lower bound for any members
            ins = tuple(tuple(per_class[k][1][:take[k]]) if take[k] else ()
                        for k in range(n_classes))
            if size > 1:
                pairs = [(k, j) for k in present for j in present
                         if j > k or (j == k and take[k] > 1)]
                min_bw = min(link_bw[k][j] for k, j in pairs)
                max_lat = max(link_lat[k][j] for k, j in pairs)
                # the group holds a triangle of devices
                min_bw, max_lat = min(min_bw, tri_bw), max(max_lat, tri_lat)
            else:
                min_bw, max_lat = math.inf, 0.0
            if partners is None or size > FAST_GROUP_MAX:
                # (a larger group receives over every member's fastest link for free: a
                # relaxation of the count, [Note: partner links])
                variants = [(min_bw, max_lat, ins, 0)]
            else:
                # f members over their partners' links (the f fastest such links of the
                # group's classes), the others over the fastest of the rest
                fast_in = sorted((bw for k in present for bw in per_class[k][1][:take[k]]),
                                 reverse=True)
                slow = sorted((bw for k in present for bw in slow_in[k][:take[k]]),
                              reverse=True)
                # the most members over partners' links that still speed the group up
                # (once a partner's link is no faster than the second link it replaces,
                # more of them only slow it down)
                most = 0
                while (most < min(size, int(partners[2]))
                       and fast_in[most] > slow[size - most - 1]):
                    most += 1
                # f = 0 exactly, then f in [g, 2g - 1] (g = 1, 2, 4, ...) as one variant of
                # cost g at the links of min(2g - 1, most) (no slower than any f there),
                # the last up to `most` and beyond (fewer variants, each a relaxation)
                grid = [0] + [1 << j for j in range(most.bit_length())]
                for at, f in enumerate(grid):
                    upto = min(most, 2 * f - 1) if at + 1 < len(grid) else most
                    links = tuple(sorted(fast_in[:upto] + slow[:size - upto], reverse=True))
                    # (priced tables read only the rates: one class holds them all)
                    variants.append((min_bw, max_lat, (links,) + ((),) * (n_classes - 1),
                                     f))
        divisors: dict[int, float] = {}
        for k in present:
            src, div = per_class[k][2], per_class[k][3]
            divisors[src] = min(div, divisors.get(src, math.inf))
        step = max(timing.sources[src].update_per_byte / div for src, div in divisors.items())
        # [Note: rigid groups]: one device, or devices of one class of equal memory; and
        # (priced, with the memory model) any group where its shares fit
        firm = len(present) == 1 and (size == 1 or rigid[present[0]])
        for v, (min_bw, max_lat, ins, f) in enumerate(variants):
            rates = tuple(sorted(bw for row in ins for bw in row))
            if rates not in gammas:     # (the same links recur over many count vectors)
                gammas[rates] = (math.inf if rates[0] <= 0.0
                                 else min_max_ratio(micro_batch, rates))
            gamma = gammas[rates]
            if gamma is None:
                continue
            if size > 1:
                reduce_a = 2.0 * (size - 1) / (size * min_bw)
                reduce_b = 2.0 * (size - 1) * max_lat
            else:
                reduce_a = reduce_b = 0.0
            key = (take, v)
            fasts[key] = f
            found[key] = [1.0 / max(us), beta, gamma, reduce_a, reduce_b, step]
            if pooled:
                found[key] += _profile_terms(take, per_class, profiles, link_bw, link_lat,
                                             micro_batch, ratios, ins)
            found[key] += ([max(uppers[k][0] for k in present),
                            max(uppers[k][1] for k in present)] if firm or mixed
                           else [math.inf, math.inf])
            extra[key] = (1.0 / min(us), firm, tuple(
                min(micro_batch, math.floor(beta * per_class[k][0] * ABOVE)) if t else 0
                for k, t in enumerate(take)))
    if not found:
        return None
    # (a merged group's x may be below its work over the speed of its smaller counts)
    exact_counts = len(found) <= CLASS_GROUPS_MAX
    if not exact_counts:
        # a merged group has the smallest count of each class and the smallest of every
        # constant of its members: every stage of a member costs at least as much
        # (and the fewest members over partners' links)
        merged: dict[tuple[int, ...], tuple[list[int], list[float]]] = {}
        for key, consts in found.items():
            vec = (*key[0], fasts[key])
            where = tuple(_bucket(c) for c in vec)
            old = merged.get(where)
            if old is None:
                merged[where] = (list(vec), list(consts))
            else:
                old[0][:] = [min(a, b) for a, b in zip(old[0], vec, strict=True)]
                old[1][:] = [min(a, b) for a, b in zip(old[1], consts, strict=True)]
        # a merged group has no upper bound (its compute is no member's)
        found = {(tuple(c[:-1]), c[-1]): k[:-2] + [math.inf, math.inf]
                 for c, k in merged.values()}
        fasts = {key: key[1] for key in found}
        extra = {c: (0.0, False, (0,) * n_classes) for c in found}
    keys = list(found)
    table = np.asarray([found[k] for k in keys], dtype=np.float64)
    counts = np.asarray([k[0] for k in keys], dtype=np.float64).reshape(len(keys), n_classes)
    fast_g = np.asarray([fasts[k] for k in keys], dtype=np.float64)
    # (a group dominates another only with no more members over partners' links too)
    counted_f = np.concatenate([counts, fast_g[:, None]], axis=1)
    inv_min = np.asarray([extra[k][0] for k in keys])
    firm_g = np.asarray([extra[k][1] for k in keys], dtype=bool)
    shares_g = np.asarray([extra[k][2] for k in keys], dtype=np.float64).reshape(
        len(keys), n_classes)
    # the upper bounds' constants: 1 / slowest speed, largest share per speed, latency and
    # gamma of the messages in, whether no memory check is needed, the shares to check
    ups = np.concatenate([inv_min[:, None], table[:, 1:2], table[:, -2:]], axis=1)
    if mixed:
        # [Note: rigid groups]: dominance on the lower bounds alone; a kept group takes
        # the largest upper constants, the largest shares and the memory check of the
        # groups it drops (an upper bound may always be raised, and where it holds it is
        # above theirs, so a plan of a dropped group as the dominant stage has one of the
        # kept group)
        kept = _undominated(counted_f, table[:, :-2])
        lower = np.concatenate([counted_f, table[:, :-2]], axis=1)
        dropped = np.setdiff1d(np.arange(len(keys)), kept)
        # per dropped group, the first kept group no larger (a column at a time, as in
        # _undominated); then every kept group takes the maxima of its dropped ones
        keeper = np.empty(len(dropped), dtype=np.intp)
        span = max(1, _COMPARED_CELLS // max(1, len(kept)))
        kept_columns = lower[kept].T
        for lo in range(0, len(dropped), span):
            drop = dropped[lo:lo + span]
            under = np.ones((len(drop), len(kept)), dtype=bool)
            for column, of_kept in zip(lower.T, kept_columns, strict=True):
                under &= of_kept[None] <= column[drop][:, None]
            keeper[lo:lo + span] = kept[np.argmax(under, axis=1)]
        np.maximum.at(ups, keeper, ups[dropped])
        np.logical_and.at(firm_g, keeper, firm_g[dropped])
        np.maximum.at(shares_g, keeper, shares_g[dropped])
    else:
        # a group with an upper bound may be kept from being the dominant stage where a
        # group with a larger one (or none) is not: a group dominates only where its upper
        # bound is no smaller on every layer range
        has_up = np.isfinite(table[:, -2])
        kept = _undominated(counted_f, np.concatenate(
            [table[:, :-2], np.where(has_up[:, None], -ups, -math.inf)], axis=1),
            firm_g | ~has_up)
    counts, table, fast_g = counts[kept], table[kept], fast_g[kept]
    ups, firm_g, shares_g = ups[kept], firm_g[kept], shares_g[kept]
    # (each a contiguous array: the compiled rows read them)
    inv_u, beta, gamma, red_a, red_b, step = np.ascontiguousarray(table[:, :6].T)
    num_layers = len(sums.fwd_slope) - 1
    firsts = [0] + [e + 1 for e in ends if e + 1 < num_layers]
    lasts = [e for e in ends if e < num_layers - 1] + [num_layers - 1]
    fi, fs = (np.asarray(sums.fwd_intercept, dtype=np.float64),
              np.asarray(sums.fwd_slope, dtype=np.float64))
    bi, bs = (np.asarray(sums.bwd_intercept, dtype=np.float64),
              np.asarray(sums.bwd_slope, dtype=np.float64))
    params = np.asarray(sums.param_bytes, dtype=np.float64)
    rows = []
    compute = []
    # per row, the upper bounds of X of [Note: rigid groups] (inf: none)
    up_inv, up_beta, up_lat, up_gamma = np.ascontiguousarray(ups.T)
    no_comm = np.where(np.isfinite(up_lat), 0.0, math.inf)
    tops = []
    fits = _fits(space, classes, base, memory, shares_g) if mixed and memory is not None \
        else None
    before: list[float] = []
    after: list[float] = []
    stops = np.asarray(lasts) + 1
    row_of = np.full(num_layers + 1, len(firsts))     # the row of each first layer
    row_of[firsts] = np.arange(len(firsts))
    # priced tables: each row's x, max(E_f, E_b), T_a and upper bounds written into one
    # flat array per field, as solver.relaxation_compiled.pack lays them out (concatenating
    # the rows afterwards cost 30-40 ms a table of ResNet-50 x 32 Jetsons); the rows are
    # views of them
    groups = len(counts)
    widths = [0] if pooled else [groups * int((stops > first).sum()) for first in firsts]
    offsets = np.concatenate([[0], np.cumsum(widths)])
    laid = np.empty((4, int(offsets[-1])))
    # [Note: the compiled rows]: a priced row in one compiled pass where the class bound's
    # passes run compiled (the same floats)
    from solver.relaxation import compiled_rows, give_up_compiled  # (imports this module)

    fill = None if pooled else compiled_rows(deadline)

    def stage_parts(first: int, stop: np.ndarray, comm: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per group and end, the compute forward and backward of layers ``first`` up to
        each ``stop``, and the lower bounds of ``E_f`` and ``E_b`` with ``comm``."""
        c_f = ((fi[stop] - fi[first])[None] * inv_u[:, None]
               + (fs[stop] - fs[first])[None] * beta[:, None])
        c_b = ((bi[stop] - bi[first])[None] * inv_u[:, None]
               + (bs[stop] - bs[first])[None] * beta[:, None])
        return c_f, c_b, (c_f + comm[:, None]) * SLACK, (c_b + comm[:, None]) * SLACK

    for i, first in enumerate(firsts):
        if deadline is not None and time.perf_counter() > deadline:
            raise Late
        stop = stops[stops > first]
        cut = cut_bytes[first - 1] if first > 0 else 0
        comm = (lat0 + cut * gamma) if cut > 0 else np.zeros_like(gamma)
        before.append(float(fi[first] + bi[first] + micro_batch * (fs[first] + bs[first])))
        after.append(float((fi[-1] - fi[first]) + (bi[-1] - bi[first])
                           + micro_batch * ((fs[-1] - fs[first]) + (bs[-1] - bs[first]))))
        p = (params[stop] - params[first])[None]
        nxt = row_of[stop]
        if not pooled:
            x, big, t_a, top = (part.reshape(groups, len(stop))
                                for part in laid[:, offsets[i]:offsets[i + 1]])
            up_c = up_lat + cut * up_gamma if cut > 0 else no_comm
            has_top = np.isfinite(up_lat)[:, None]
            if fits is not None:
                has_top = has_top & (firm_g[:, None] | fits(first, stop - 1))
            # the slowest member's intercepts and the slopes, for the upper bounds
            a_up = fi[stop] - fi[first] + bi[stop] - bi[first] + call
            s_up = fs[stop] - fs[first] + bs[stop] - bs[first]
            lowest = None
            if fill is not None:
                try:
                    lowest = fill(
                        fi[stop] - fi[first], fs[stop] - fs[first], bi[stop] - bi[first],
                        bs[stop] - bs[first], a_up, s_up, p[0], inv_u, beta, comm,
                        up_inv, up_beta, up_c,
                        np.ascontiguousarray(np.broadcast_to(has_top, x.shape)), red_a, red_b,
                        step, SLACK, ABOVE, x, big, t_a, top)
                except Exception as exc:    # noqa: BLE001 - numpy from now on, the same
                    give_up_compiled(exc)
                    fill = None
            if lowest is None:
                _, _, e_f, e_b = stage_parts(first, stop, comm)
                np.add(e_f, e_b, out=x)
                np.maximum(e_f, e_b, out=big)
                np.multiply(np.where(p > 0, p * red_a[:, None] + red_b[:, None], 0.0)
                            + p * step[:, None], SLACK, out=t_a)
                # (per slowest member's speed, the largest share per bound speed)
                top_x = (a_up[None] * up_inv[:, None] + s_up[None] * up_beta[:, None]
                         + 2.0 * up_c[:, None]) * ABOVE
                top.fill(math.inf)
                np.copyto(top, top_x, where=has_top)
                lowest = x.min(axis=0)
            tops.append(top)
            # the smallest x over the groups per end (non-decreasing: see relaxed)
            rows.append((x, big, t_a, nxt, np.maximum.accumulate(lowest)))
            continue
        # counted pools (their upper bounds below)
        c_f, c_b, e_f, e_b = stage_parts(first, stop, comm)
        x = e_f + e_b
        shortest = np.maximum.accumulate(x.min(axis=0))
        if top_cap < math.inf:
            # the ends up to the first whose stages all have x above the cap
            k = int(np.searchsorted(shortest, top_cap, side="right"))
            if k < len(stop):
                stop, shortest, x, p = stop[:k], shortest[:k], x[:, :k], p[:, :k]
                c_f, c_b, e_f, e_b = c_f[:, :k], c_b[:, :k], e_f[:, :k], e_b[:, :k]
                nxt = row_of[stop]
        compute.append((c_f * SLACK, c_b * SLACK, float(cut)))
        t_a = (np.where(p > 0, p * red_a[:, None] + red_b[:, None], 0.0)
               + p * step[:, None]) * SLACK
        rows.append((x, np.maximum(e_f, e_b), t_a, nxt, shortest))
    speeds = np.asarray([space.bounds[members[0]] for members in classes])
    totals = np.asarray(counts_all, dtype=np.float64)
    if not pooled:
        priced = ClassTables(tuple(firsts), tuple(rows), counts, totals, speeds,
                             uppers=tuple(tops),
                             fast=None if partners is None else fast_g,
                             fast_total=0.0 if partners is None else partners[2],
                             work=(np.asarray(before), np.asarray(after)) if exact_counts
                             else None)
        priced.compiled["laid"] = laid
        return priced
    n_prof = len(profiles)
    lat_prof, gamma_prof = table[:, 6:6 + n_prof], table[:, 6 + n_prof:6 + 2 * n_prof]
    own = [profiles.index(_profile_of(
        [k for k in range(n_classes) if c[k] > 0], link_bw, link_lat)) for c in counts]
    lat_prof, gamma_prof = lat_prof * SLACK, gamma_prof * SLACK
    uppers = table[:, -2:] * ABOVE
    shape = [c + 1 for c in counts_all]
    n_pools = math.prod(shape)
    vecs = np.asarray(np.unravel_index(np.arange(n_pools), shape)).T
    diff = vecs[None] - counts.astype(np.int64)[:, None]
    leaves = np.where((diff >= 0).all(axis=2),
                      np.ravel_multi_index(tuple(np.clip(diff, 0, None).transpose(2, 0, 1)),
                                           shape), n_pools)
    cached = []
    for (c_f, c_b, cut_b), (_, _, t_a, nxt, shortest), row0 in zip(compute, rows, firsts,
                                                                    strict=True):
        if row0 == 0:
            comm, up = np.zeros_like(gamma_prof), np.where(np.isfinite(uppers[:, 0]), 0.0,
                                                           math.inf)
        elif cut_b > 0:
            comm, up = lat_prof + cut_b * gamma_prof, uppers[:, 0] + cut_b * uppers[:, 1]
        else:
            comm = np.where(np.isfinite(gamma_prof), 0.0, math.inf)
            up = np.where(np.isfinite(uppers[:, 0]), 0.0, math.inf)
        x0 = c_f + c_b
        cached.append((comm, x0, x0 + 2.0 * comm.min(axis=1)[:, None],
                       (x0 / SLACK + (call * inv_u)[:, None]) * ABOVE + 2.0 * up[:, None],
                       np.maximum(c_f, c_b),
                       t_a, nxt, shortest))
    return ClassTables(tuple(firsts), tuple(rows), counts, totals, speeds,
                       Pooled(lat_prof, gamma_prof, np.asarray(own, dtype=np.intp),
                               np.asarray(before), np.asarray(after), leaves,
                               np.append(vecs.sum(axis=1), 0), (totals[None] - vecs) @ speeds,
                               vecs @ speeds, tuple(cached)))


def _rigid_uppers(space: ClassSpace, classes: list[list[int]],
                  micro_batch: int) -> list[list[float]]:
    """Per class, for a stage on a rigid group of its devices ([Note: rigid groups]):
    ``[lat, gamma]`` with ``X <= compute + 2 (lat + cut gamma)``, where the stage bound's
    compute is exact (base times, bound speed = the speed); ``[inf, inf]`` elsewhere.

    [Note: rigid groups]
    A group is *rigid* when its shares, and so its compute, are known exactly: one device
    (it takes the whole micro-batch ``b``), or ``k`` devices of one class of the same speed
    and the same usable memory (``_same_memory``): Algorithm 1 (``solver.split``) gives
    them ``ceil(b / k)`` at most, since with equal speeds and equal caps the caps either
    hold that split or hold no split (``k c < b``, no plan). Its compute is then the
    class bound's lower bound ``I / u + S beta`` exactly, plus the runtime's seconds per
    stage call over ``u`` (which the lower bounds leave out). Its transfer is at most
    ``lat + cut gamma`` each way: a receiver gets its share from at most ``min(b, n -
    1)`` senders and a sender sends at most ``b`` samples to at most ``min(b, n - 1)``
    receivers, each message of at most the largest latency into the class and the samples
    at the slowest link into it. A stage whose upper bound is at most the bucket's ``low``
    cannot be the dominant one (``X_d > low``); without this the relaxation names a small
    stage dominant and hides ``a min(E_f, E_b)`` behind it at ``X_d = low``. Only a group
    with an upper bound no smaller on every layer range may dominate another in
    ``_undominated``.

    With the memory model (the optimizer state factor and ``M``; the priced tables only)
    any group of exact classes has one too, on the layer ranges where its free split
    (Algorithm 1 without caps) provably fits every member (``_fits``): ``split_stage``
    then keeps that split, so the compute is at most the slowest member's intercepts over
    its speed plus ``S beta``, and the transfer as above with the largest latency and
    gamma of its classes. There dominance looks at the lower bounds alone, and a kept
    group takes the largest upper constants, shares and memory checks of the groups it
    drops: raised, its upper bound still holds, and where it is finite it is above
    theirs. ``tests/test_class_tables.py`` checks every upper bound against every stage of brute
    force's plans (runtime overhead, optimizer state, tight memory)."""
    cluster, names, timing = space.cluster, space.names, space.timing
    out = []
    for members in classes:
        t = timing.device(names[members[0]])
        if t.source != 0 or space.bounds[members[0]] != t.divisor or space.n < 2:
            out.append([math.inf, math.inf])
            continue
        bw = min(cluster.bandwidth_bytes_s(names[a], names[e]) for e in members
                 for a in range(space.n) if a != e)
        lat = max(cluster.latency_s(names[a], names[e]) for e in members
                  for a in range(space.n) if a != e)
        out.append([min(micro_batch, space.n - 1) * lat, micro_batch / bw])
    return out


def _fits(space: ClassSpace, classes: list[list[int]], sums: LayerSums,
          memory: tuple[float, int], shares: np.ndarray) -> Any:
    """``check(first, lasts)``: per group (rows of ``shares``: the most samples a member of
    each class takes) and last layer, True where every member's share fits its device
    for layers ``first..last`` with any in-flight count, by ``solver.evaluate``'s memory
    model over-counted: the weights and optimizer state, the buffers, a gradient of the
    stage's size besides ``.grad`` (the transient is at most that), and per sample the
    activations of ``M`` micro-batches with ``2 M`` wire buffers at the input cut and ``M
    + 1`` at the output (``wire_counts`` with ``F <= M``), plus the workspace fraction and
    a byte of rounding. Where it fits, Algorithm 1 keeps the free split (``split_stage``)
    ([Note: rigid groups])."""
    factor, m = memory
    usable = np.asarray([min(space.cluster.usable_bytes(space.names[d]) for d in members)
                         for members in classes], dtype=np.float64)
    params = np.asarray(sums.param_bytes, dtype=np.float64)
    buffers = np.asarray(sums.buffer_bytes, dtype=np.float64)
    acts = np.asarray(sums.activation_bytes, dtype=np.float64)
    edges = np.asarray(sums.boundary_bytes, dtype=np.float64) if sums.boundary_bytes else None
    # each class's shares take few values (at most the micro-batch): the need is computed
    # once per value and end, and each group reads its values' rows
    values = [np.unique(shares[:, k]) for k in range(shares.shape[1])]
    where = [np.searchsorted(v, shares[:, k]) for k, v in enumerate(values)]

    def check(first: int, lasts: np.ndarray) -> np.ndarray:
        p = params[lasts + 1] - params[first]
        fixed = p * (3.0 + factor) + (buffers[lasts + 1] - buffers[first]) + 1.0
        per = (acts[lasts + 1] - acts[first]) * m
        if edges is not None:
            per = per + 2 * m * edges[first] + (m + 1) * edges[lasts + 1]
        ok = np.ones((len(shares), len(lasts)), dtype=bool)
        for k, (v, at) in enumerate(zip(values, where, strict=True)):
            need = (fixed[None] + v[:, None] * per[None] * (1.0 + WORKSPACE_FRACTION)
                    + 1.0) * ABOVE                                   # (values, ends)
            # (a class the group has none of fits)
            ok &= ((v <= 0)[:, None] | (need <= usable[k]))[at]
        return ok

    return check


def _same_memory(space: ClassSpace, members: list[int]) -> bool:
    """True when every device of the class has the same usable memory (its groups of one
    class are rigid: [Note: rigid groups])."""
    usable = {space.cluster.usable_bytes(space.names[d]) for d in members}
    return len(usable) == 1


def _profile_of(senders: list[int], link_bw: list[list[float]],
                link_lat: list[list[float]]) -> tuple[float, ...]:
    """What a group holding devices of the classes ``senders`` offers a receiver of each
    class: the fastest link (bytes/s; 0: none) and the smallest latency (inf: none)."""
    n_classes = len(link_bw)
    return (tuple(max((link_bw[k][j] for j in senders), default=0.0) for k in range(n_classes))
            + tuple(min((link_lat[k][j] for j in senders), default=math.inf)
                    for k in range(n_classes)))


def _sender_profiles(link_bw: list[list[float]],
                     link_lat: list[list[float]]) -> list[tuple[float, ...]]:
    """The distinct ``_profile_of`` of every non-empty set of classes."""
    n_classes = len(link_bw)
    found: list[tuple[float, ...]] = []
    for pattern in range(1, 1 << n_classes):
        key = _profile_of([j for j in range(n_classes) if pattern >> j & 1], link_bw, link_lat)
        if key not in found:
            found.append(key)
    return found


def _profile_terms(take: tuple[int, ...], per_class: list[tuple[Any, ...]],
                   profiles: list[tuple[float, ...]], link_bw: list[list[float]],
                   link_lat: list[list[float]], micro_batch: int,
                   ratios: dict[tuple[float, ...], float],
                   ins: Sequence[Sequence[float]] | None = None) -> list[float]:
    """Constants of the group ``take`` for ``_counted`` ([Note: counted pools]): per sender
    profile the smallest latency and the smallest ``max_e b_e / bw_e`` over integer shares
    of a transfer into the group (inf where no member can receive), then its own profile
    as a sender in a form where smaller is better (minus each bandwidth, each latency).
    ``ratios`` caches ``min_max_ratio`` by its rates; ``ins``: per class, upper bounds of
    the links into the group's members from outside it (default: the class's fastest)."""
    n_classes = len(take)
    present = [k for k, t in enumerate(take) if t]
    member_ins = ins if ins is not None else [per_class[k][1][:take[k]]
                                              for k in range(n_classes)]
    lats, gammas = [], []
    for profile in profiles:
        bw_in, lat_in = profile[:n_classes], profile[n_classes:]
        lat = min(lat_in[k] for k in present)
        rates = [min(bw, bw_in[k]) for k in present for bw in member_ins[k]]
        if min(rates) <= 0.0 or math.isinf(lat):
            lats.append(math.inf)
            gammas.append(math.inf)
            continue
        key = tuple(rates)
        if key not in ratios:
            found = min_max_ratio(micro_batch, rates)
            ratios[key] = math.inf if found is None else found
        lats.append(lat)
        gammas.append(ratios[key])
    # the links this group offers the next stage, best when smallest (for _undominated)
    own = _profile_of(present, link_bw, link_lat)
    return lats + gammas + [-v for v in own[:n_classes]] + list(own[n_classes:])


def _undominated(counts: np.ndarray, consts: np.ndarray,
                 can_dominate: np.ndarray | None = None) -> np.ndarray:
    """Indices of the groups that no other group dominates: one with no more devices of
    any class and no larger constant (``1 / u_max``, ``beta``, ``gamma``, the all-reduce
    terms, the step) has stage bounds ``x``, ``max(E_f, E_b)`` and ``T_a`` no larger on
    every layer range (each is a sum of non-negative layer terms times the constants) and
    costs no more at any prices >= 0, so ``relaxed`` never needs the dominated one (of
    equal groups, the first is kept)."""
    columns = np.ascontiguousarray(np.concatenate([counts, consts], axis=1).T)
    n = columns.shape[1]
    order = np.arange(n)
    dominated = np.zeros(n, dtype=bool)
    # groups g a block at a time against every group h, a column at a time ((block, n)
    # booleans; a comparison of whole rows reduced over their few columns was 3-4 times
    # slower)
    block = max(1, _COMPARED_CELLS // max(1, n))
    for start in range(0, n, block):
        rows = columns[:, start:start + block, None]
        below = columns[0][None] <= rows[0]
        equal = columns[0][None] == rows[0]
        for column, row in zip(columns[1:], rows[1:], strict=True):
            below &= column[None] <= row
            equal &= column[None] == row
        if can_dominate is not None:
            below &= can_dominate[None]
        # an equal group dominates only when it comes first (g itself never)
        below &= ~equal | (order[None] < order[start:start + block, None])
        dominated[start:start + block] = below.any(axis=1)
    return np.flatnonzero(~dominated).astype(np.intp)


def bound_classes(space: ClassSpace) -> list[list[int]] | None:
    """The classes ``class_bound`` counts devices in: the space's classes of interchangeable
    devices where they have at most ``CLASS_VECTORS_MAX`` count vectors that merge into at
    most ``CLASS_GROUPS_MAX`` groups (``_bucket``), else the coarser classes of devices
    with the same compute (bound speed, time source and divisor), whose links
    ``build_class_tables`` bounds by the best of their members' (a relaxation); None where
    those have more than ``CLASS_VECTORS_MAX`` count vectors (``class_bound`` gives up)."""
    def buckets(count: int) -> int:
        return _bucket(count) + 1

    if (math.prod(c + 1 for c in space.counts) <= CLASS_VECTORS_MAX
            and math.prod(buckets(c) for c in space.counts) <= CLASS_GROUPS_MAX):
        return [list(members) for members in space.classes]
    coarse = _coarse_classes(space)
    if math.prod(len(c) + 1 for c in coarse) > CLASS_VECTORS_MAX:
        return None
    return coarse


def counts_pools(space: ClassSpace) -> bool:
    """True when ``class_bound`` counts the devices of each class exactly on this space
    ([Note: counted pools]): its classes have at most ``CLASS_POOLS_MAX`` count vectors."""
    classes = bound_classes(space)
    return classes is not None and math.prod(len(c) + 1 for c in classes) <= CLASS_POOLS_MAX


def _coarse_classes(space: ClassSpace) -> list[list[int]]:
    """Devices of the space with the same compute (bound speed, time source, divisor)."""
    timing, names = space.timing, space.names
    coarse: dict[tuple[float, int, float], list[int]] = {}
    for d in range(space.n):
        t = timing.device(names[d])
        coarse.setdefault((space.bounds[d], t.source, t.divisor), []).append(d)
    return list(coarse.values())


class Late(Exception):
    """The deadline of ``class_bound`` passed."""
