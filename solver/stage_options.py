"""The DP's stage options: every group's compute, all-reduce and memory for each run of layers."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from contracts.cluster import Cluster
from contracts.plan import SMALL_BUCKET_BYTES
from contracts.table import CostTable
from solver.evaluate import (
    WORKSPACE_FRACTION,
    LayerSums,
    Pieces,
    accumulates,
    pieces_time,
    transient_gradient_bytes,
)
from solver.space import (
    SearchSpace,
)
from solver.split import split_shares, split_stage
from solver.summary import hiding_ratio
from solver.timing import wire_counts

__all__ = ["Option", "SearchContext", "StageOptions"]

_NUMPY_LASTS = 16
"""Stage options use numpy for more candidate ``last`` layers than this."""

_KIND_TABLE_AFTER = 4
"""A group kind whose stage bases were built for this many first layers gets its
``_KindTable`` ([Note: kind tables])."""

_KIND_TABLES_MAX = 400
"""At most this many ``_KindTable`` per search (three floats per first and last layer
each: about 90 MB at the default 96 cuts); later kinds build their bases one by one."""

# A group kind's compute and T_a of every stage of one search: arrays over (first
# layer's row, candidate last's column) of ``StageOptions._grid``.
_KindTable = tuple[np.ndarray, np.ndarray, np.ndarray]


def _np_stage_times(terms: dict[int, tuple[np.ndarray, ...]], deciders: Sequence[Any],
                    params: np.ndarray, info: Any) -> _KindTable:
    """``(compute_f, compute_b, T_a)`` of stages on a group, element by element over
    arrays of any shape (``_base``'s candidate lasts, or a kind table's whole grid): the
    slowest decider's compute, and T_a = the all-reduce (``allreduce_from``) plus the
    optimizer step on the slowest device (``Timing.group_update_time``), in the same float
    operations as ``evaluate``."""
    b, v, src = deciders[0]
    f_int, f_slope, b_int, b_slope = terms[src]
    cf = (f_int + f_slope * b) / v
    cb = (b_int + b_slope * b) / v
    for b, v, src in deciders[1:]:
        f_int, f_slope, b_int, b_slope = terms[src]
        cf = np.maximum(cf, (f_int + f_slope * b) / v)
        cb = np.maximum(cb, (b_int + b_slope * b) / v)
    size = info.size
    if size > 1:
        reduce = np.where(params > 0, 2.0 * (size - 1) * params.astype(np.float64)
                          / (size * info.min_bw) + 2.0 * (size - 1) * info.max_lat, 0.0)
    else:
        reduce = np.zeros(params.shape)
    pairs = info.update_pairs
    upb, div, fixed_s = pairs[0]
    step = (params * upb + fixed_s) / div
    for upb, div, fixed_s in pairs[1:]:
        step = np.maximum(step, (params * upb + fixed_s) / div)
    return cf, cb, reduce + step


class _Grid(NamedTuple):
    """``_layer_terms`` of every first layer at once ([Note: kind tables]): arrays over
    (first layer's row, candidate last's column), in the float operations of its numpy
    branch (cells of a ``last`` before ``first`` hold values never read)."""

    at: dict[int, tuple[int, int]]      # per first layer: its row and its first column
    lasts: list[int]                    # the candidate last layers, by column
    slopes: np.ndarray                  # slope sums (forward and backward)
    inters: np.ndarray                  # intercept sums
    terms: dict[int, tuple[np.ndarray, ...]]   # per time source: (fi, fs, bi, bs) with calls
    params: np.ndarray                  # parameter bytes (int64)
    fixed: np.ndarray                   # fixed bytes on one device
    fixed_dp: np.ndarray                # fixed bytes in a data-parallel group
    acts: np.ndarray                    # activation bytes per sample (int64)
    edges: list[int]                    # per column: the cut after the stage, per sample

# The options of one group kind: (shares, lasts, compute_f, compute_b, t_a).
Option = tuple[tuple[int, ...], list[int], list[float], list[float], list[float]]

# The share-independent part of a group kind's options: (free shares, lasts, compute_f,
# compute_b, t_a, keep, fixed bytes, per sample the activations and the cut after the
# stage), lists over ``lasts``.
_Base = tuple[tuple[int, ...], list[int], list[float], list[float], list[float],
              int, list[float], list[tuple[int, int]]]

def _deciders(pairs: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The ``(share, speed)`` pairs whose ``(intercept + slope * share) / speed`` can be the
    group maximum: drop a pair with at most the share and at least the speed of another
    (ties: keep one)."""
    kept: list[tuple[int, float]] = []
    for k, (b, v) in enumerate(pairs):
        if any(b2 >= b and v2 <= v and ((b2, -v2) != (b, -v) or k2 < k)
               for k2, (b2, v2) in enumerate(pairs) if k2 != k):
            continue
        kept.append((b, v))
    return kept


def _source_deciders(triples: list[tuple[int, float, int]]) -> list[tuple[int, float, int]]:
    """``_deciders`` for ``(share, divisor, time source)``: only devices of one source
    share a time function, so each source keeps its own deciders ([Note: cost columns])."""
    sources = sorted({src for _, _, src in triples})
    out: list[tuple[int, float, int]] = []
    for src in sources:
        out.extend((b, v, src) for b, v in _deciders([(b, v) for b, v, k in triples
                                                       if k == src]))
    return out


class SearchContext:
    """What the searches of one ``asteroid_dp`` call share: prefix sums as arrays, the
    space, interned interfaces and their re-sharding times, and per micro-batch size the
    bound tables and Algorithm-1 shares of every group."""

    def __init__(self, costs: CostTable, cluster: Cluster, space: SearchSpace,
                 sums: LayerSums) -> None:
        self.costs, self.cluster, self.sums, self.space = costs, cluster, sums, space
        timing = self.timing = space.timing
        self.np_src = [tuple(np.asarray(values, dtype=np.float64)
                             for values in (src.fwd_intercept, src.fwd_slope,
                                            src.bwd_intercept, src.bwd_slope))
                       for src in timing.sources]
        self.np_params = np.asarray(sums.param_bytes, dtype=np.int64)
        self.np_buffers = np.asarray(sums.buffer_bytes, dtype=np.int64)
        self.np_acts = np.asarray(sums.activation_bytes, dtype=np.int64)
        self.np_edges = np.asarray(sums.boundary_bytes or [0] * len(sums.activation_bytes),
                                   dtype=np.int64)   # LayerSums.in_flight_bytes
        self.np_layer_params = np.diff(self.np_params)   # LayerSums.largest_params
        # the base sums of the stage filter in StageOptions._layer_terms
        self.np_sums = tuple(np.asarray(values, dtype=np.float64)
                             for values in (sums.fwd_slope, sums.bwd_slope,
                                            sums.fwd_intercept, sums.bwd_intercept))
        self.rho = hiding_ratio(costs, cluster)
        # (group, shares) and (what the next stage receives from it, pool left) as small
        # integers; an interface keeps the first (group, shares) of its signature
        self.gs_ids: dict[tuple[int, tuple[int, ...]], int] = {}
        self.gs: list[tuple[int, tuple[int, ...]]] = []
        self.gs_sig: list[Any] = []
        self.iface_ids: dict[tuple[Any, int], int] = {}
        self.iface_gs: list[int] = []
        self.iface_pool: list[int] = []
        self.comm: dict[tuple[int, int, int], float] = {}
        self.pieces: dict[tuple[int, int], tuple[Pieces, int, int]] = {}
        self._per_mb: dict[int, tuple[list[float], list[float], list[float], list[float]]] = {}
        self._group_mb: dict[int, dict[int, Any]] = {}

    def gs_id(self, gid: int, shares: tuple[int, ...]) -> int:
        key = (gid, shares)
        found = self.gs_ids.get(key)
        if found is None:
            found = self.gs_ids[key] = len(self.gs)
            self.gs.append(key)
            self.gs_sig.append(self.space.signature(gid, shares))
        return found

    def iface(self, gs: int, pool: int) -> int:
        """The interface of a stage on ``gs`` that leaves ``pool``: stages whose groups
        send the same way (``SearchSpace.signature``) share it ([Note: DP cells])."""
        key = (self.gs_sig[gs], pool)
        found = self.iface_ids.get(key)
        if found is None:
            found = self.iface_ids[key] = len(self.iface_gs)
            self.iface_gs.append(gs)
            self.iface_pool.append(pool)
        return found

    def transfer(self, prev_gs: int, cur_gs: int, first: int) -> float:
        """Re-sharding time of the cut before layer ``first`` between two (group, shares)."""
        key = (prev_gs, cur_gs, first)
        value = self.comm.get(key)
        if value is None:
            pair = (prev_gs, cur_gs)
            found = self.pieces.get(pair)
            if found is None:
                pg, pshares = self.gs[prev_gs]
                cg, shares = self.gs[cur_gs]
                found = self.pieces[pair] = (self.space.pieces(pg, pshares, cg, shares),
                                             len(pshares), len(shares))
            value = self.comm[key] = pieces_time(found[0], found[1], found[2],
                                                 self.costs.cut_bytes[first - 1])
        return value

    def for_micro_batch(self, mb: int) -> tuple[list[float], list[float], list[float],
                                                 list[float]]:
        """``(work, work_i, head_f, head_x)`` for micro-batches of ``mb`` samples: compute
        of layers ``l..`` for one micro-batch at speed 1, per sample (``work``) and with the
        intercepts (``work_i``); ``head_f`` / ``head_x``: the same of layers ``< l``,
        forward only / forward and backward, with the intercepts."""
        found = self._per_mb.get(mb)
        if found is not None:
            return found
        sums = self.sums
        layers = range(sums.num_layers + 1)
        work = [(sums.fwd_slope[-1] - sums.fwd_slope[first]
                 + sums.bwd_slope[-1] - sums.bwd_slope[first]) * mb for first in layers]
        work_i = [work[first] + (sums.fwd_intercept[-1] - sums.fwd_intercept[first]
                                 + sums.bwd_intercept[-1] - sums.bwd_intercept[first])
                  for first in layers]
        head_f = [sums.fwd_intercept[first] + sums.fwd_slope[first] * mb for first in layers]
        head_x = [head_f[first] + sums.bwd_intercept[first] + sums.bwd_slope[first] * mb
                  for first in layers]
        found = self._per_mb[mb] = (work, work_i, head_f, head_x)
        return found

    def group_mb(self, mb: int, kind: int) -> Any:
        """``(free shares, compute deciders, memory holders (share, bytes))`` of the groups
        of ``kind`` for micro-batches of ``mb`` samples, or None when they have more
        devices than samples. A device with at most the share of another and at least its
        speed (memory) never decides (the float operations are monotone, so dropping it
        changes no bit)."""
        table = self._group_mb.setdefault(mb, {})
        if kind in table:
            return table[kind]
        space = self.space
        info = space.group(space.kind_group[kind])
        shares = split_shares(mb, info.speeds)
        if shares is None:
            table[kind] = None
            return None
        members = list(zip(shares, info.members, strict=True))
        deciders = _source_deciders([(share, space.divs[d], space.srcs[d])
                                     for share, d in members])
        caps = space.caps
        holders = [(share, caps[d]) for share, d in members
                   if not any((s2 >= share and caps[d2] <= caps[d])
                              and (s2, -caps[d2], d2) > (share, -caps[d], d)
                              for s2, d2 in members)]
        found = table[kind] = (shares, deciders, holders)
        return found


class StageOptions:
    """The stages one search of ``solver.dp`` may prepend: per first layer, group kind,
    in-flight count and whether the stage is the last, the candidate last layers with the
    stage's compute and ``T_a`` ([Note: DP cells], [Note: candidate windows] and [Note:
    cost of the search] in ``solver.dp``), built once and kept."""

    def __init__(self, ctx: SearchContext, ends: list[int], micro_batch: int, num_micro: int,
                 osf: float, incumbent: float = math.inf) -> None:
        self.ctx = ctx
        self.space = ctx.space
        self.costs, self.sums, self.timing = ctx.costs, ctx.sums, ctx.timing
        self.osf = osf
        self.mb, self.m = micro_batch, num_micro
        self.n = ctx.space.n
        self.work, self.work_i, self.head_f, self.head_x = ctx.for_micro_batch(micro_batch)
        self.num_layers = ctx.costs.num_layers
        self.ends = ends  # candidate last layers of a non-final stage
        self.incumbent = incumbent   # the search's incumbent; the search lowers it
        self.rho = ctx.rho
        self._layers: dict[tuple[int, bool], tuple[Any, ...]] = {}
        self._bases: dict[tuple[int, int, bool], _Base | None] = {}
        # [Note: kind tables]: bases built per (kind, final), the tables, the grids
        self._kind_misses: dict[tuple[int, bool], int] = {}
        self._kind_tables: dict[tuple[int, bool], _KindTable] = {}
        self._grids: dict[bool, _Grid] = {}
        self._options: dict[tuple[int, int, int, bool, float], list[Option]] = {}
        # wire_counts by (in flight, final)
        self._wires: dict[tuple[int, bool], tuple[int, int]] = {}
        self._top_speed = ctx.space.best_speed(ctx.space.root, micro_batch)

    # -- stage costs --------------------------------------------------------------------
    def _layer_terms(self, first: int, final: bool) -> tuple[Any, ...]:
        """Per candidate ``last`` (up to where even the fastest group of the cluster costs
        ``M X >= incumbent``): the stage's slope and intercept sums, per time source its
        (fwd intercepts, fwd slopes, bwd intercepts, bwd slopes), params, and the memory
        parts (fixed bytes; per sample the activations and the cut after the stage), as
        numpy arrays for long lists and Python lists for short ones, in the float
        operations of ``LayerSums``,
        ``allreduce_from`` and ``stage_memory_parts``."""
        key = (first, final)
        found = self._layers.get(key)
        if found is not None:
            return found
        sums = self.sums
        m, inc, mb = self.m, self.incumbent, self.mb
        inc_hi = inc * (1.0 + 1e-9)
        speed = self._top_speed
        grid = self._grid(final)
        spot = grid.at.get(first)
        if spot is not None:
            # the row of the grid ([Note: kind tables]): the same numbers
            row, col = spot
            slope_r, inter_r = grid.slopes[row, col:], grid.inters[row, col:]
            over = (m * slope_r * mb / speed >= inc) | (m * (inter_r + slope_r * mb) / speed
                                                        >= inc_hi)
            cut = int(np.argmax(over)) if over.any() else len(over)
            end = col + cut
            use_np = cut > _NUMPY_LASTS
            spans = {src: tuple(t[row, col:end] for t in ts) for src, ts in grid.terms.items()}
            params_r = grid.params[row, col:end]
            found = (grid.lasts[col:end], slope_r[:cut].tolist(), inter_r[:cut].tolist(),
                     spans if use_np else {src: list(zip(*(t.tolist() for t in ts),
                                                         strict=True))
                                           for src, ts in spans.items()},
                     params_r if use_np else params_r.tolist(),
                     grid.fixed[row, col:end].tolist(), grid.fixed_dp[row, col:end].tolist(),
                     list(zip(grid.acts[row, col:end].tolist(), grid.edges[col:end],
                              strict=True)), use_np)
            self._layers[key] = found
            return found
        candidates = [self.num_layers - 1] if final else [e for e in self.ends if e >= first]
        lasts: list[int] = []
        slopes: list[float] = []
        inters: list[float] = []
        if len(candidates) > _NUMPY_LASTS:
            # the loop below over every candidate at once, in the same float operations
            stop = np.asarray(candidates) + 1
            f_s, b_s, f_i, b_i = self.ctx.np_sums
            slope_a = f_s[stop] - f_s[first] + b_s[stop] - b_s[first]
            inter_a = f_i[stop] - f_i[first] + b_i[stop] - b_i[first]
            over = (m * slope_a * mb / speed >= inc) | (m * (inter_a + slope_a * mb) / speed
                                                         >= inc_hi)
            cut = int(np.argmax(over)) if over.any() else len(candidates)
            lasts = candidates[:cut]
            slopes = slope_a[:cut].tolist()
            inters = inter_a[:cut].tolist()
            candidates = []
        for last in candidates:
            slope = (sums.fwd_slope[last + 1] - sums.fwd_slope[first]
                     + sums.bwd_slope[last + 1] - sums.bwd_slope[first])
            if m * slope * mb / speed >= inc:
                break
            inter = (sums.fwd_intercept[last + 1] - sums.fwd_intercept[first]
                     + sums.bwd_intercept[last + 1] - sums.bwd_intercept[first])
            if m * (inter + slope * mb) / speed >= inc_hi:
                break
            lasts.append(last)
            slopes.append(slope)
            inters.append(inter)
        use_np = len(lasts) > _NUMPY_LASTS
        sources = self.timing.sources
        used = sorted(set(self.space.srcs))
        if not lasts:
            found = (lasts, slopes, inters, {}, [], [], [], [], use_np)
        elif use_np:
            stop = np.asarray(lasts) + 1
            terms: dict[int, Any] = {}
            for src in used:
                f_i, f_s, b_i, b_s = (a[stop] - a[first] for a in self.ctx.np_src[src])
                # LayerSums.fwd_time's float operations: (sum + call) + slope * share
                terms[src] = (f_i + sources[src].call_fwd, f_s, b_i + sources[src].call_bwd,
                              b_s)
            params = self.ctx.np_params[stop] - self.ctx.np_params[first]
            largest = np.maximum.accumulate(self.ctx.np_layer_params[first:])[stop - 1 - first]
            # stage_memory_parts over all `last` at once (exact while bytes stay below 2**53),
            # for one device and for a data-parallel group (transient_gradient_bytes)
            held = (np.ceil(params * (2.0 + self.osf))
                    + (self.ctx.np_buffers[stop] - self.ctx.np_buffers[first]))
            bucket = np.minimum(params, np.maximum(largest, SMALL_BUCKET_BYTES))
            fixed_dp = (held + bucket).tolist()
            fixed = (held + largest).tolist() if accumulates(self.m, self.osf) \
                else held.tolist()
            # LayerSums.flight_bytes' parts: activations, and the cut after the stage
            acts = list(zip((self.ctx.np_acts[stop] - self.ctx.np_acts[first]).tolist(),
                            self.ctx.np_edges[stop].tolist(), strict=True))
            found = (lasts, slopes, inters, terms, params, fixed, fixed_dp, acts, use_np)
        else:
            pb, bb = sums.param_bytes, sums.buffer_bytes
            factor = 2.0 + self.osf
            params_l = [pb[last + 1] - pb[first] for last in lasts]
            grows = accumulates(self.m, self.osf)
            held_l = [math.ceil(p * factor) + (bb[last + 1] - bb[first])
                      for p, last in zip(params_l, lasts, strict=True)]
            fixed = [float(h + transient_gradient_bytes(sums, first, last, 1, grows))
                     for h, last in zip(held_l, lasts, strict=True)]
            fixed_dp = [float(h + transient_gradient_bytes(sums, first, last, 2))
                        for h, last in zip(held_l, lasts, strict=True)]
            edges = sums.boundary_bytes
            acts = [(sums.activations(first, last), edges[last + 1] if edges else 0)
                    for last in lasts]
            terms = {}
            for src in used:
                t = sources[src]
                fi, fs, bi, bs = t.fwd_intercept, t.fwd_slope, t.bwd_intercept, t.bwd_slope
                cf_t, cb_t = t.call_fwd, t.call_bwd
                terms[src] = [(fi[last + 1] - fi[first] + cf_t, fs[last + 1] - fs[first],
                               bi[last + 1] - bi[first] + cb_t, bs[last + 1] - bs[first])
                              for last in lasts]
            found = (lasts, slopes, inters, terms, params_l, fixed, fixed_dp, acts, use_np)
        self._layers[key] = found
        return found

    def _base(self, first: int, kind: int, final: bool) -> _Base | None:
        """The flight-independent part of ``options``: the group's free shares (Algorithm 1
        without a memory cap), the candidate ``last`` layers and their compute times, T_a
        and memory parts. Candidates stop once even a perfectly balanced split over the
        group costs ``M X >= incumbent`` (compute only grows with ``last``). Times are
        bit-identical to ``evaluate``'s."""
        key = (first, kind, final)
        if key in self._bases:
            return self._bases[key]
        self._bases[key] = None
        per = self.ctx.group_mb(self.mb, kind)
        if per is None:
            return None
        free, deciders, _ = per
        info = self.space.group(self.space.kind_group[kind])
        lasts_all, slopes, inters, terms, params, fixed, fixed_dp, acts, use_np = \
            self._layer_terms(first, final)
        m, inc, mb = self.m, self.incumbent, self.mb
        inc_hi = inc * (1.0 + 1e-9)
        speed = info.bound_speed
        # the stages that even a perfectly balanced split cannot keep below the incumbent
        # (slopes and intercepts only grow with `last`): bisect the first of them
        count, hi_k = 0, len(slopes)
        while count < hi_k:
            mid = (count + hi_k) // 2
            if (m * slopes[mid] * mb / speed >= inc
                    or m * (inters[mid] + slopes[mid] * mb) / speed >= inc_hi):
                hi_k = mid
            else:
                count = mid + 1
        if not count:
            return None
        lasts = lasts_all[:count]
        size = info.size
        pairs = info.update_pairs
        table = self._kind_table(kind, final, first)
        if table is not None:
            # [Note: kind tables]: the row of the kind's table, the same float operations
            row, col = self._grid(final).at[first]
            cf_a, cb_a, ta_a = table
            cf_l = cf_a[row, col:col + count].tolist()
            cb_l = cb_a[row, col:col + count].tolist()
            ta = ta_a[row, col:col + count].tolist()
            # compute grows with `last`: stages from `keep` on cost M X >= incumbent
            keep, hi_k = 0, count
            while keep < hi_k:
                mid = (keep + hi_k) // 2
                if m * (cf_l[mid] + cb_l[mid]) >= inc:
                    hi_k = mid
                else:
                    keep = mid + 1
        elif use_np:
            cf, cb, ta_np = _np_stage_times(
                {src: tuple(a[:count] for a in terms[src]) for _b, _v, src in deciders},
                deciders, params[:count], info)
            ta = ta_np.tolist()
            # compute grows with `last`: stages past `keep` cost M X >= incumbent
            keep = int(np.count_nonzero(m * (cf + cb) < inc))
            cf_l, cb_l = cf.tolist(), cb.tolist()
        else:
            cf_l, cb_l = [], []
            if len(info.sources) == 1:
                for f_i, f_s, b_i, b_s in terms[info.sources[0]][:count]:
                    cf_l.append(max((f_i + f_s * b) / v for b, v, _ in deciders))
                    cb_l.append(max((b_i + b_s * b) / v for b, v, _ in deciders))
            else:
                for k in range(count):
                    cf_l.append(max((terms[src][k][0] + terms[src][k][1] * b) / v
                                    for b, v, src in deciders))
                    cb_l.append(max((terms[src][k][2] + terms[src][k][3] * b) / v
                                    for b, v, src in deciders))
            min_bw, lat = info.min_bw, info.max_lat
            upb, slowest, fixed_s = pairs[0]
            if len(pairs) == 1:
                steps = [(p * upb + fixed_s) / slowest for p in params[:count]]
            else:
                steps = [max((p * u + r) / d for u, d, r in pairs) for p in params[:count]]
            ta = [(2.0 * (size - 1) * p / (size * min_bw) + 2.0 * (size - 1) * lat
                   if size > 1 and p > 0 else 0.0)
                  + step for p, step in zip(params[:count], steps, strict=True)]
            keep = 0
            for x_f, x_b in zip(cf_l, cb_l, strict=True):
                if m * (x_f + x_b) >= inc:
                    break
                keep += 1
        held = fixed if size == 1 else fixed_dp     # a group's all-reduce bucket copy
        found = (free, lasts, cf_l, cb_l, ta, keep, held[:count], acts[:count])
        self._bases[key] = found
        return found

    def _grid(self, final: bool) -> _Grid:
        """The ``_Grid`` of the final stage or of the others ([Note: kind tables]): rows
        for the first layers (0 and after each candidate end), columns for the candidate
        last layers."""
        found = self._grids.get(final)
        if found is not None:
            return found
        ctx = self.ctx
        lasts = [self.num_layers - 1] if final else list(self.ends)
        firsts = [0, *(e + 1 for e in self.ends if e + 1 < self.num_layers)]
        at = {f: (k, 0 if final else bisect_left(lasts, f)) for k, f in enumerate(firsts)}
        stop = np.asarray(lasts, dtype=np.intp) + 1
        rows = np.asarray(firsts, dtype=np.intp)

        def span(a: np.ndarray) -> np.ndarray:
            """``a[stop] - a[first]`` over (row, column)."""
            out: np.ndarray = a[stop][None, :] - a[rows][:, None]
            return out

        f_s, b_s, f_i, b_i = ctx.np_sums
        slopes = span(f_s) + b_s[stop][None, :] - b_s[rows][:, None]
        inters = span(f_i) + b_i[stop][None, :] - b_i[rows][:, None]
        sources = self.timing.sources
        terms: dict[int, tuple[np.ndarray, ...]] = {}
        for src in sorted(set(self.space.srcs)):
            s_fi, s_fs, s_bi, s_bs = (span(a) for a in ctx.np_src[src])
            terms[src] = (s_fi + sources[src].call_fwd, s_fs, s_bi + sources[src].call_bwd,
                          s_bs)
        params = span(ctx.np_params)
        # the largest layer's params from `first` to `last` (LayerSums.largest_params)
        largest = np.zeros_like(params)
        for k, first in enumerate(firsts):
            ahead = stop > first
            if ahead.any():
                largest[k, ahead] = np.maximum.accumulate(
                    ctx.np_layer_params[first:])[stop[ahead] - 1 - first]
        # stage_memory_parts (exact while bytes stay below 2**53), for one device and for
        # a data-parallel group (transient_gradient_bytes)
        held = np.ceil(params * (2.0 + self.osf)) + span(ctx.np_buffers)
        bucket = np.minimum(params, np.maximum(largest, SMALL_BUCKET_BYTES))
        fixed = held + largest if accumulates(self.m, self.osf) else held
        found = self._grids[final] = _Grid(at, lasts, slopes, inters, terms, params, fixed,
                                           held + bucket, span(ctx.np_acts),
                                           ctx.np_edges[stop].tolist())
        return found

    def _kind_table(self, kind: int, final: bool, first: int) -> _KindTable | None:
        """``(compute_f, compute_b, t_a)`` of every stage of the grid on a group of
        ``kind`` ([Note: kind tables]), built once the kind's bases were built for
        ``_KIND_TABLE_AFTER`` first layers; None before that or where ``first`` is not on
        the grid.

        [Note: kind tables]
        A group kind's bases are asked for at nearly every first layer in the order's
        space (every slice of the order at every candidate cut), and building each from
        its own short lists costs more in Python and small numpy calls than the arithmetic
        itself. So once a kind has been asked for a few first layers, its compute times
        and ``T_a`` are computed for every (first, last) of the grid at once, in the float
        operations of ``_base``'s numpy branch element by element (``_base``'s Python
        branch gives the same bits), and each later base reads its row. The incumbent's
        cut-offs still come from ``_layer_terms`` and the count bisection; ``keep`` is
        bisected on the row (compute grows with ``last``). ``tests/test_dp.py`` checks the
        tables against the bases built without them."""
        key = (kind, final)
        table = self._kind_tables.get(key)
        if table is not None:
            return table if first in self._grid(final).at else None
        misses = self._kind_misses[key] = self._kind_misses.get(key, 0) + 1
        if misses <= _KIND_TABLE_AFTER or len(self._kind_tables) >= _KIND_TABLES_MAX:
            return None
        grid = self._grid(final)
        if first not in grid.at:
            return None
        deciders = self.ctx.group_mb(self.mb, kind)[1]
        info = self.space.group(self.space.kind_group[kind])
        table = self._kind_tables[key] = _np_stage_times(grid.terms, deciders, grid.params,
                                                         info)
        return table

    def options(self, first: int, kind: int, flight: int, final: bool,
                rest: float) -> list[Option]:
        """Stages starting at layer ``first`` on a group of ``kind`` with ``flight``
        micro-batches in flight (``final``: the last stage, else one that ends before the
        last layer and leaves devices of at most ``rest`` bound speed for the tail), as
        ``(shares, lasts, compute_f, compute_b, t_a)``: one stage per ``last``
        (ascending).

        The free shares (Algorithm 1 without a memory cap) have compute times
        non-decreasing in ``last``; memory-capped stages come one per entry, in the order
        of their ``last``. The free entry stops where its own compute reaches ``M X >=
        incumbent`` (the recursion would drop those, and the incumbent only decreases) and
        where a device runs out of memory (memory only grows with ``last``); then
        Algorithm 1 caps the shares until the group cannot hold the stage at all."""
        key = (first, kind, flight, final, rest)
        found = self._options.get(key)
        if found is not None:
            return found
        out: list[Option] = []
        self._options[key] = out
        base = self._base(first, kind, final)
        if base is None:
            return out
        free, sel, cf, cb, ta, keep, fixed, acts = base
        m, inc = self.m, self.incumbent
        holders = self.ctx.group_mb(self.mb, kind)[2]
        frac = WORKSPACE_FRACTION
        # LayerSums.flight_bytes: activations of `flight` micro-batches and wire buffers
        edges = self.sums.boundary_bytes
        wires = self._wires.get((flight, final))
        if wires is None:
            wires = self._wires[(flight, final)] = wire_counts(flight, m, final)
        ins, outs = wires
        wire_in = ins * (edges[first] if edges else 0)

        def fit(k: int) -> bool:
            act, c_out = acts[k]
            per = act * flight + wire_in + outs * c_out
            for b, cap in holders:  # memory_from_parts, in the same float operations
                a = per * b
                if fixed[k] + a + math.ceil(a * frac) > cap:
                    return False
            return True

        fits = len(sel)
        if not fit(fits - 1):  # memory grows with `last`: bisect the first misfit
            lo_k, hi_k = 0, fits - 1
            while lo_k < hi_k:
                mid = (lo_k + hi_k) // 2
                if fit(mid):
                    lo_k = mid + 1
                else:
                    hi_k = mid
            fits = lo_k
        # where the devices left cannot take the tail below the incumbent ([Note:
        # candidate windows]), the window starts later
        start = 0
        if not final:
            limit = self.incumbent * (1.0 + 1e-9) / m
            work = self.work_i
            if rest <= 0.0 or work[sel[-1] + 1] / rest >= limit:
                return out
            hi_k = len(sel) - 1
            while start < hi_k:
                mid = (start + hi_k) // 2
                if work[sel[mid] + 1] / rest >= limit:
                    start = mid + 1
                else:
                    hi_k = mid
        n_free = min(fits, keep)
        if n_free > start:
            if start:
                out.append((free, sel[start:n_free], cf[start:n_free], cb[start:n_free],
                            ta[start:n_free]))
            elif n_free < len(sel):
                out.append((free, sel[:n_free], cf[:n_free], cb[:n_free], ta[:n_free]))
            else:   # the base's own lists (nothing writes to them)
                out.append((free, sel, cf, cb, ta))
        if fits == len(sel):    # no stage of the group is memory-capped
            return out
        info = self.space.group(self.space.kind_group[kind])
        for k in range(max(fits, start), len(sel)):
            last = sel[k]
            shares = split_stage(self.sums, first, last, info.speeds, info.caps, self.mb,
                                 flight, self.osf, free, num_micro_batches=m)
            if shares is None:  # longer stages need even more memory
                break
            cfs, cbs = self.timing.compute(first, last, info.names, shares)
            if m * (cfs + cbs) >= inc:
                continue
            out.append((shares, [last], [cfs], [cbs], [ta[k]]))
        return out

    def _usable(self, first: int, groups: list[tuple[int, int]], flight: int,
                final: bool, need: int) -> list[tuple[int, int, list[Option]]]:
        """``(group, pool left, options)`` of the groups of a pool that have options and
        leave at least ``need`` devices."""
        out = []
        space = self.space
        kinds_of, options, sizes = space.group_kind, self._options, space.pool_sizes
        for gid, left in groups:
            if sizes[left] < need:
                continue
            kind = kinds_of[gid]
            rest = 0.0 if final else space.rest_speed(gid, left)
            opts = options.get((first, kind, flight, final, rest))
            if opts is None:
                opts = self.options(first, kind, flight, final, rest)
            if opts:
                out.append((gid, left, opts))
        return out
