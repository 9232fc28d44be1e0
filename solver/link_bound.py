"""The link bound: a lower bound on the round time that sees which links a stage must use.

[Note: the link bound]
Every layer ``h`` lies in some stage ``s`` (layers ``f..l``, group ``G``). Whatever the
stages before and after it, ``solver.evaluate``'s round ``R`` of a plan with ``M``
micro-batches satisfies, with ``d`` the dominant stage (largest ``X = E_f + E_b``):

(1) ``R >= M X_d >= M max(X_s, X_{s+1})``: ``T^0 = T_e^0 + T_a^0 >= M X_d``.
(2) for ``s = 0``: ``R >= T^0 >= M X_d + T_a^0``.
(3) for any ``s``: ``R >= T_a^s / 2 + (3M - 1) / 4 X_d``. For ``s <= d``, ``T^s >= M X_d +
    T_a^s`` gives more. For ``s > d``, ``T_w^s + T_e^s = sum_{i<d} E_f^i + M X_d -
    sum_{i=d}^{s-1} E_b^i >= M X_d - X_d - T_tail`` (``T_tail = sum_{i>d} X_i``), and
    ``T^0 >= M X_d + D`` with the drain ``D >= T_tail - (w - 1) min(E_f^d, E_b^d) >=
    T_tail - (M - 1) X_d / 2``, so ``T_tail <= R - M X_d + (M - 1) X_d / 2``; adding,
    ``2R >= (2M - 1 - (M - 1) / 2) X_d + T_a^s``. (Note: ``R >= T_a^s`` alone does not
    hold for every stage: ``T_w^s + T_e^s`` is negative after a dominant stage followed by
    more than ``M`` stages of large ``E_b``.)

Lower bounds of ``X_s``, ``X_{s+1}`` and ``T_a^s`` that need only ``G``, ``f`` and ``l``:

* compute: ``I / u_max + S beta`` as in [Note: the stage bound] (``solver.bounds``);
* the transfer into ``s`` (``f > 0``, ``X_s`` holds it twice): every member ``j``
  receives its share from the devices of the stage before, none of them in ``G``, in at
  least one message: ``lat + b_j c_{f-1} / bw_j``, ``bw_j`` the fastest link into ``j``
  from outside ``G``; the transfer out of ``s`` (``l`` not the last layer, ``X_{s+1}``
  holds it twice): every member sends its share, likewise, to devices outside ``G``.
  ``comm >= max`` over receivers and over senders of their message times;
* ``T_a``: the group's all-reduce over its slowest link and largest latency, plus the
  optimizer step of its slowest member (at least the smallest step of any member).

A one-device stage in the middle (``0 < f``, ``l < L - 1``) receives from the stage before
and sends to the stage after, two disjoint groups: its fastest link in and its fastest
link out cannot go to the same device, so the pair of links is the best pair to two
different devices (on a fleet whose fast links are wired pairs, one side of a middle
stage is slow). Groups are taken in three ways: every device alone (its own links),
every pair of devices (their own links, the all-reduce over the link between them), and
for ``n >= 3`` devices a relaxation over the ``n`` fastest of everything (bound speeds,
links in, links out; the slowest link of a group of three or more is no faster than the
best triangle's, ``solver.link_floors.triangle_links``).

So per candidate stage range ``f..l`` the smallest value over the groups of ``max(M x,
T_a / 2 + (3M - 1) / 4 x)`` (``M x + T_a`` for ``f = 0``), ``x = max(x_s, x_{s+1})``, is a
lower bound on every plan with a stage over exactly ``f..l``; the smallest of those over
the ranges that hold layer ``h`` bounds every plan; and the largest over ``h`` is the
bound. It ignores memory and re-sharding (relaxations), covers the plans on the
candidate ends (``ends``) and every device order, and costs ``O(ranges x (devices +
pairs))`` numpy work per micro-batch size. Where it is strong: a layer whose parameters
forbid a data-parallel group (an all-reduce over a slow link costs more than the round)
and whose neighbouring cuts are large, so that one device must send or receive every
sample's activations over one link: BERT-small's embedding on a 100 Mbps network.
``tests/test_link_bound.py`` checks it against every plan of brute force's wide space.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

from solver.link_floors import min_max_ratio, space_links, triangle_links
from solver.space import SearchSpace
from solver.timing import LayerSums

__all__ = ["link_bound", "structure"]

_SLACK = 1.0 - 1e-9


def _links(space: SearchSpace) -> tuple[np.ndarray, np.ndarray]:
    """``(bw, lat)``: bytes/s and seconds per message from device ``a`` to ``b`` (``bw``
    0 and ``lat`` inf on the diagonal), from the space's link matrices
    (``solver.link_floors.space_links``)."""
    net = space_links(space)
    bw = net.bw.copy()
    np.fill_diagonal(bw, 0.0)
    return bw, net.lat.copy()


def _step_rates(space: SearchSpace) -> np.ndarray:
    """Per device: optimizer step seconds per parameter byte (``round_s`` left out)."""
    timing = space.timing
    out = []
    for name in space.names:
        t = timing.device(name)
        out.append(timing.sources[t.source].update_per_byte / t.divisor)
    return np.asarray(out, dtype=np.float64)


def _profiles(bw: np.ndarray, d: int, outside: Sequence[int]) -> tuple[
        float, float, list[tuple[float, float]]]:
    """``(fastest in, fastest out, middle)`` bytes/s of device ``d``'s links from and to
    ``outside``; ``middle``: pairs ``(in, out)`` of links from and to two different devices
    of ``outside`` such that every such pair of links is no faster, both ways, than one of
    them (0: none)."""
    if not len(outside):
        return 0.0, 0.0, [(0.0, 0.0)]
    rest = np.asarray(outside)
    ins, outs = bw[rest, d], bw[d, rest]
    a, b = int(np.argmax(ins)), int(np.argmax(outs))
    in1, out1 = float(ins[a]), float(outs[b])
    if len(rest) < 2:
        return in1, out1, [(0.0, 0.0)]
    if a != b:
        return in1, out1, [(in1, out1)]
    # the same device is the fastest both ways: one side takes the second best
    in2 = float(np.max(np.delete(ins, a)))
    out2 = float(np.max(np.delete(outs, b)))
    return in1, out1, [(in1, out2), (in2, out1)]


@functools.lru_cache(maxsize=65536)
def _rate_sorted(micro_batch: int, rates: tuple[float, ...]) -> float:
    if any(r <= 0.0 for r in rates):
        return math.inf
    found = min_max_ratio(micro_batch, rates)
    return math.inf if found is None else found


def _rate(micro_batch: int, rates: Sequence[float]) -> float:
    """``min_max_ratio`` with inf for no split or a zero rate (the order of the rates
    does not matter)."""
    return _rate_sorted(micro_batch, tuple(sorted(rates)))


Raw = tuple[float, tuple[float, ...], float, tuple[float, ...], float, tuple[float, ...],
            tuple[float, ...], tuple[float, ...], float, float, float]
"""An option before the micro-batch size is known: ``(inv_u, speeds, lat_in, ins, lat_out,
outs, mid_ins, mid_outs, reduce_a, reduce_b, step)``, the rate lists as tuples."""


def structure(space: SearchSpace) -> list[Raw]:
    """The group options of [Note: the link bound] for every micro-batch size (distinct
    ones only): every device alone, every pair, and ``n >= 3`` devices relaxed."""
    n = space.n
    bw, lat = _links(space)
    u = np.asarray(space.bounds, dtype=np.float64)
    step = _step_rates(space)
    lat_in_all = lat.min(axis=0) if n > 1 else np.full(n, math.inf)
    lat_out_all = lat.min(axis=1) if n > 1 else np.full(n, math.inf)
    found: dict[Raw, None] = {}
    # every device alone: all samples through its own links
    for d in range(n):
        others = [e for e in range(n) if e != d]
        in1, out1, mids = _profiles(bw, d, others)
        for mid_in, mid_out in mids:
            found[(1.0 / u[d], (float(u[d]),), float(lat_in_all[d]), (in1,),
                   float(lat_out_all[d]), (out1,), (mid_in,), (mid_out,), 0.0, 0.0,
                   float(step[d]))] = None
    if n < 2:
        return list(found)
    # every pair: its own links to the others, the all-reduce over the link between them
    for a in range(n):
        for c in range(a + 1, n):
            rest = [e for e in range(n) if e not in (a, c)]
            in_a, out_a, mids_a = _profiles(bw, a, rest)
            in_c, out_c, mids_c = _profiles(bw, c, rest)
            if rest:
                idx = np.asarray(rest)
                lat_in = float(min(lat[idx, a].min(), lat[idx, c].min()))
                lat_out = float(min(lat[a, idx].min(), lat[c, idx].min()))
            else:
                lat_in = lat_out = math.inf
            link = min(float(bw[a, c]), float(bw[c, a]))
            far = max(float(lat[a, c]), float(lat[c, a]))
            pair_speeds = tuple(sorted((float(u[a]), float(u[c]))))
            for ma in mids_a:
                for mc in mids_c:
                    found[(1.0 / max(u[a], u[c]), pair_speeds, lat_in,
                           tuple(sorted((in_a, in_c))), lat_out,
                           tuple(sorted((out_a, out_c))), tuple(sorted((ma[0], mc[0]))),
                           tuple(sorted((ma[1], mc[1]))), 1.0 / link, 2.0 * far,
                           float(min(step[a], step[c])))] = None
    # three or more: the n fastest of everything, the best triangle's links; in the
    # middle, k members with their P1 profile (fastest in) and n - k with P2 (fastest out)
    tri_bw, tri_lat = triangle_links(space)
    lat0 = float(lat.min())
    speeds = sorted(u.tolist(), reverse=True)
    prof = [_profiles(bw, d, [e for e in range(n) if e != d]) for d in range(n)]
    ins = sorted((p[0] for p in prof), reverse=True)
    outs = sorted((p[1] for p in prof), reverse=True)
    # P1: (fastest in, the best out with it); P2: (the best in with the fastest out, it)
    p1_in = sorted((p[2][0][0] for p in prof), reverse=True)
    p1_out = sorted((p[2][0][1] for p in prof), reverse=True)
    p2_in = sorted((p[2][-1][0] for p in prof), reverse=True)
    p2_out = sorted((p[2][-1][1] for p in prof), reverse=True)
    for size in range(3, n + 1):
        for k in range(size + 1):
            if size == n:     # no device outside: no stage before or after
                g_in: tuple[float, ...] = (0.0,)
                g_out: tuple[float, ...] = (0.0,)
                m_in: tuple[float, ...] = (0.0,)
                m_out: tuple[float, ...] = (0.0,)
            else:
                g_in, g_out = tuple(ins[:size]), tuple(outs[:size])
                m_in = tuple(p1_in[:k] + p2_in[:size - k])
                m_out = tuple(p1_out[:k] + p2_out[:size - k])
            found[(1.0 / speeds[0], tuple(speeds[:size]), lat0, g_in, lat0, g_out, m_in,
                   m_out, 2.0 * (size - 1) / (size * tri_bw), 2.0 * (size - 1) * tri_lat,
                   float(step.min()))] = None
            if size == n:
                break
    return list(found)


def _options(raw: Sequence[Raw], micro_batch: int) -> np.ndarray:
    """Per group option of ``structure`` that can take the micro-batch (at least one
    sample per member), a row ``(inv_u, beta, lat_in, gamma_in, lat_out, gamma_out,
    gamma_in_mid, gamma_out_mid, reduce_a, reduce_b, step)`` (``gamma``: the smallest
    ``max_j b_j / bw_j`` over the members' integer shares; ``_mid``: a stage with
    neighbours on both sides)."""
    b = micro_batch
    rows = []
    for inv_u, speeds, lat_in, ins, lat_out, outs, m_in, m_out, red_a, red_b, step in raw:
        if len(speeds) > b:
            continue
        beta = _rate(b, speeds)
        if math.isinf(beta):
            continue
        rows.append((inv_u, beta, lat_in, _rate(b, ins), lat_out, _rate(b, outs),
                     _rate(b, m_in), _rate(b, m_out), red_a, red_b, step))
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), 11)


def link_bound(space: SearchSpace, sums: LayerSums, cut_bytes: Sequence[int],
               ends: Sequence[int], micro_batch: int, num_micro: int,
               raw: Sequence[Raw] | None = None) -> float:
    """A lower bound on the round time of every plan (every device order, any groups) with
    this micro-batch size whose non-final stages end after one of ``ends`` ([Note: the link
    bound]); inf when no plan exists. ``raw``: ``structure(space)``, to share between
    micro-batch sizes."""
    m = num_micro
    num_layers = len(sums.fwd_slope) - 1
    firsts = [0] + [e + 1 for e in ends if e + 1 < num_layers]
    lasts = [e for e in ends if e < num_layers - 1] + [num_layers - 1]
    opts = _options(structure(space) if raw is None else raw, micro_batch)
    if not len(opts):
        return math.inf
    (inv_u, beta, lat_in, g_in, lat_out, g_out, g_in_m, g_out_m, red_a, red_b,
     step) = (col[:, None] for col in opts.T)
    inter = (np.asarray(sums.fwd_intercept, dtype=np.float64)
             + np.asarray(sums.bwd_intercept, dtype=np.float64))
    slope = (np.asarray(sums.fwd_slope, dtype=np.float64)
             + np.asarray(sums.bwd_slope, dtype=np.float64))
    params = np.asarray(sums.param_bytes, dtype=np.float64)
    stop = np.asarray(lasts) + 1
    last_layer = num_layers - 1
    cut_out = np.asarray([cut_bytes[e] if e < last_layer else 0 for e in lasts],
                         dtype=np.float64)
    has_out = cut_out > 0
    big = 0.25 * (3 * m - 1)
    index = {f: i for i, f in enumerate(firsts)}
    nxt = np.asarray([index.get(int(e), len(firsts)) for e in stop])
    # path[i]: the smallest largest stage value over the stage sequences from firsts[i]
    path = np.full(len(firsts) + 1, math.inf)
    path[len(firsts)] = 0.0
    with np.errstate(invalid="ignore"):
        for i in range(len(firsts) - 1, -1, -1):
            first = firsts[i]
            sel = stop > first
            if not sel.any():
                continue
            comp = (inter[stop[sel]] - inter[first]) * inv_u + (
                slope[stop[sel]] - slope[first]) * beta                       # (G, E)
            cut_in = cut_bytes[first - 1] if first > 0 else 0
            out_b, out_ok = cut_out[sel][None], has_out[sel][None]
            middle = out_ok & (cut_in > 0)
            # receiving (X_s: the transfer twice) and sending (X_{s+1}: twice)
            recv = (lat_in + cut_in * np.where(middle, g_in_m, g_in)) if cut_in > 0 \
                else np.zeros_like(comp)
            send = np.where(out_ok, lat_out + out_b * np.where(middle, g_out_m, g_out), 0.0)
            x = np.maximum(comp + 2.0 * recv, 2.0 * send) * _SLACK
            p = params[stop[sel]] - params[first]
            t_a = (np.where(p > 0, p * red_a + red_b, 0.0) + p * step) * _SLACK
            if first == 0:
                v = m * x + t_a
            else:
                v = np.maximum(m * x, 0.5 * t_a + big * x)
            v = np.where(np.isnan(v), math.inf, v).min(axis=0)               # (E,)
            path[i] = float(np.maximum(v, path[nxt[sel]]).min())
    return float(path[0])
