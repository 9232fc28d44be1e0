"""The class bound's relaxation on a few count vectors against their exact optimum there.

Where the bound is loose, and the relaxed plan that makes it so: a workbench for issue 14's
remaining gaps (docs/planner-history.md, twenty-fifth session). Given an instance, a micro-batch
size and a few count vectors of the device classes (by default those of the plan
``solver.api.plan`` returns), it gives

* the exact optimum over plans whose every stage takes one of those vectors, in every device
  order (the classes DP of ``solver.dp`` with its groups narrowed to them), and
* per bucket ``(low, top]`` of the dominant stage's ``X``, the smallest value of bound (A) of
  [Note: the class bound] in ``solver.class_bound`` over relaxed plans on the same vectors, with
  the devices counted exactly, and the relaxed plan behind the smallest.

``relaxed_plan`` is a second, plain implementation of ``solver.relaxation.relaxed_many`` (every
class counted, one state per use count of each vector instead of per device count vector),
written to be read and to trace its plan back: the same stages, gates and value (the tests
compare them). ``--priced`` runs ``priced_plan`` instead: every group of the tables, the
devices priced at the prices ``class_bound`` found best in the bucket that sets its bound
(``weakest_prices``), the plan behind that bucket and the devices it takes. Where the
relaxed plan is a real plan whose round is the optimum's or more, the bound lacks an
inequality that the plan breaks; the entry in docs/planner-history.md names them.

    python tools/bound_bed.py --devices 64 --micro-batch 8           # the planner's vectors
    python tools/bound_bed.py --devices 64 --micro-batch 8 --vectors 8-0-0,0-8-0,0-0-8
    python tools/bound_bed.py --devices 64 --micro-batch 16 --target 0.57 --priced
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contracts.cluster import Cluster
from contracts.errors import PlanError
from contracts.plan import Plan, Stage
from contracts.table import CostTable
from solver.class_bound import class_bound
from solver.class_tables import ClassTables, bound_classes
from solver.dp import DPResult, asteroid_dp
from solver.evaluate import LayerSums
from solver.link_floors import SLACK
from solver.relaxation import (
    _AFTER_LEVELS,
    _PRICED_AFTER_LEVELS,
    _late_gate,
    gate_levels,
    rest_gate_at,
)
from solver.space import ClassSpace, EvenSpace, candidate_cuts, device_classes
from solver.split import resplit
from solver.summary import hiding_ratio

__all__ = ["RelaxedStage", "Relaxed", "Bed", "bed", "narrow", "relaxed_plan", "bucket_scan",
           "narrowed_optimum", "plan_vectors", "realize", "priced_plan", "weakest_prices"]

Vector = tuple[int, ...]


@dataclass(frozen=True)
class RelaxedStage:
    """One stage of a relaxed plan: ``role`` ``before``, ``dominant`` (with ``a`` stages
    after it in (A)) or ``after`` (at ``level``: position ``level + 1`` after the dominant
    stage, gated as there; the last level, ``_AFTER_LEVELS``: any position),
    its count vector, layers and the tables' ``x``, ``max(E_f, E_b)`` and ``T_a``."""

    role: str
    vector: Vector
    first: int
    last: int
    x: float
    big: float
    t_a: float
    a: int = 0
    level: int = 0


@dataclass(frozen=True)
class Relaxed:
    """The smallest value of (A) over the relaxed plans of one bucket (inf: none), the plan
    and how often it uses each vector."""

    value: float
    stages: tuple[RelaxedStage, ...]
    usage: Vector


@dataclass(frozen=True)
class Bed:
    """An instance's class-bound tables at one micro-batch size, narrowed to ``groups``
    (indices into them) with their count vectors ``vectors``."""

    tables: ClassTables
    vectors: tuple[Vector, ...]
    groups: tuple[int, ...]
    num_micro: int
    rho: float
    num_layers: int


def plan_vectors(plan: Plan, costs: CostTable, cluster: Cluster) -> tuple[Vector, ...]:
    """The count vectors (over ``device_classes``) of ``plan``'s stages, each once."""
    classes = device_classes(cluster, costs)
    index = {name: k for k, members in enumerate(classes) for name in members}
    out: list[Vector] = []
    for stage in plan.stages:
        vec = [0] * len(classes)
        for name in stage.devices:
            vec[index[name]] += 1
        if tuple(vec) not in out:
            out.append(tuple(vec))
    return tuple(out)


def _bound_tables(costs: CostTable, cluster: Cluster, batch_size: int, micro_batch: int,
                  target: float, max_cuts: int | None, **options: Any
                  ) -> tuple[float | None, ClassTables | None, float]:
    """``class_bound``'s value and tables (priced, no partner links, no optimizer state)
    for ``micro_batch`` at ``target`` with ``options``, and the hiding ratio it used."""
    cluster = cluster.for_costs(costs)
    rho = hiding_ratio(costs, cluster)
    cache: dict[Any, Any] = {}
    value = class_bound(ClassSpace(costs, cluster), LayerSums.of(costs), costs.cut_bytes,
                        candidate_cuts(costs, max_cuts), micro_batch,
                        batch_size // micro_batch, target, rho=rho, cache=cache,
                        count=False, pools=False, partner_links=False,
                        optimizer_state_factor=0.0, **options)
    return value, next(iter(cache.values()), None), rho


def bed(costs: CostTable, cluster: Cluster, batch_size: int, micro_batch: int,
        vectors: Sequence[Vector], target: float, max_cuts: int | None = 96) -> Bed:
    """The tables ``class_bound`` builds (priced, no partner links) for ``micro_batch``,
    narrowed to ``vectors`` (``ValueError`` where the bound's classes are not the cluster's
    own, or a vector is not one of its groups)."""
    space = ClassSpace(costs, cluster.for_costs(costs))
    classes = bound_classes(space)
    if classes is None or classes != space.classes:
        raise ValueError("the class bound counts coarser classes here: the bed needs the "
                         "cluster's own classes")
    _, tables, rho = _bound_tables(costs, cluster, batch_size, micro_batch, target, max_cuts,
                                   max_evals=1, buckets=1)
    if tables is None:
        raise ValueError(f"no group takes a micro-batch of {micro_batch}")
    narrowed, groups, per_group = narrow(tables, vectors)
    return Bed(narrowed, per_group, groups, batch_size // micro_batch, rho, costs.num_layers)


def narrow(tables: ClassTables, vectors: Sequence[Vector]
           ) -> tuple[ClassTables, tuple[int, ...], tuple[Vector, ...]]:
    """``tables`` with every group left out (``x`` at inf) but those on ``vectors`` (a count
    vector of two devices may have a group per pair of links: [Note: pairs of devices] in
    ``solver.partners``), the kept groups and their vectors."""
    counts = [tuple(int(c) for c in row) for row in tables.counts]
    wanted = {tuple(v) for v in vectors}
    if any(len(v) != tables.counts.shape[1] for v in wanted):
        raise ValueError(f"count vectors {sorted(wanted)} need {tables.counts.shape[1]} numbers "
                         "each, one per class")
    missing = wanted - set(counts)
    if missing:
        raise ValueError(f"count vectors {sorted(missing)} are not groups of the tables "
                         "(merged or dominated away, or larger than the micro-batch)")
    groups = tuple(g for g, c in enumerate(counts) if c in wanted)
    out = np.ones(len(counts), dtype=bool)
    out[list(groups)] = False
    rows = []
    for x, big, t_a, nxt, _ in tables.rows:
        kept = np.where(out[:, None], math.inf, x)
        rows.append((kept, big, t_a, nxt, np.maximum.accumulate(kept.min(axis=0))))
    uppers = tuple(np.where(out[:, None], math.inf, u) for u in tables.uppers)
    return (replace(tables, rows=tuple(rows), uppers=uppers, work=None), groups,
            tuple(counts[g] for g in groups))


def _traced(b: Bed, kind: str, vector: Vector, row: int, group: int, end: int, a: int,
            level: int) -> RelaxedStage:
    """The stage of a traced relaxed plan on ``group`` from ``row`` to its ``end``."""
    x, big, t_a, nxt, _ = b.tables.rows[row]
    n = int(nxt[end])
    last = (b.tables.firsts[n] if n < len(b.tables.firsts) else b.num_layers) - 1
    return RelaxedStage(kind, vector, b.tables.firsts[row], last, float(x[group, end]),
                        float(big[group, end]), float(t_a[group, end]),
                        a if kind == "dominant" else 0, level if kind == "after" else 0)


def relaxed_plan(b: Bed, low: float, top: float, limit: float) -> Relaxed:
    """The smallest (A) over relaxed plans on ``b``'s groups (within the cluster's device
    counts: one state per use count of each group) with ``X_d`` in ``(low, top]`` below
    ``limit``, as ``solver.relaxation.relaxed_many`` computes it with every class counted
    (exactly where ``M <= _CHORD_POINTS`` or each count vector has one group; elsewhere its
    chords may give less), and its plan."""
    tables, m, rho = b.tables, b.num_micro, b.rho
    totals = tables.totals.astype(int)
    caps = [min(int(totals[k]) // v[k] for k in range(len(v)) if v[k]) for v in b.vectors]
    states = [u for u in itertools.product(*(range(c + 1) for c in caps))
              if all(sum(u[q] * b.vectors[q][k] for q in range(len(u))) <= totals[k]
                     for k in range(len(totals)))]
    index = {u: s for s, u in enumerate(states)}
    minus = np.full((len(b.vectors), len(states)), -1)
    for s, u in enumerate(states):
        for q in range(len(u)):
            if u[q]:
                minus[q, s] = index[u[:q] + (u[q] - 1,) + u[q + 1:]]
    n_u, rows, n_a = len(states), len(tables.firsts), m
    gates, levels = gate_levels(m, rho, low, _AFTER_LEVELS)
    late, late_ta = _late_gate(m, rho, low)
    rest = rest_gate_at(m, int(tables.totals.sum()), rho, low, top)
    inf = math.inf
    # placed[level, row, state, a]: suffixes after the dominant stage whose first stage is
    # at position level + 1 (the last level: any position); with_d[row, state]: suffixes
    # whose first stage is the dominant one or before it
    placed = np.full((levels + 1, rows + 1, n_u, n_a), inf)
    placed[:, rows, 0, 0] = 0.0
    with_d = np.full((rows + 1, n_u), inf)
    # traceback: (vector, end, level read, a read) and (role, vector, end, a)
    took = np.full((levels + 1, rows, n_u, n_a, 4), -1)
    chose = np.full((rows, n_u, 4), -1)
    reads_a = np.tile(np.arange(n_a) - 1, (n_u, 1))    # the a each shifted a reads
    for i in range(rows - 1, -1, -1):
        x, big, t_a, nxt, _ = tables.rows[i]
        up = tables.uppers[i] if tables.uppers else np.full_like(x, inf)
        first = tables.firsts[i] == 0
        for q, g in enumerate(b.groups):
            src = np.maximum(minus[q], 0)
            ok = minus[q] >= 0
            for e in range(x.shape[1]):
                xv, tv, n = float(x[g, e]), float(t_a[g, e]), int(nxt[e])
                if not xv <= top:
                    continue
                if late + tv * late_ta < limit:
                    for lv in range(levels + 1):
                        passes = rest + tv < limit if lv == levels else gates[lv] + tv < limit
                        if not passes:
                            continue
                        reads = min(lv + 1, levels)
                        val = np.where(ok[:, None], xv + placed[reads, n][src], inf)  # (U, A)
                        # one more stage after the dominant one: a + 1, at most A - 1
                        shifted = np.full_like(val, inf)
                        shifted[:, 1:] = val[:, :-1]
                        from_a = reads_a.copy()
                        last = val[:, -1] < shifted[:, -1]
                        shifted[:, -1] = np.where(last, val[:, -1], shifted[:, -1])
                        from_a[:, -1] = np.where(last, n_a - 1, n_a - 2)
                        better = shifted < placed[lv, i]
                        placed[lv, i] = np.where(better, shifted, placed[lv, i])
                        took[lv, i][better] = np.stack(
                            [np.full(n_u * n_a, q), np.full(n_u * n_a, e),
                             np.full(n_u * n_a, reads), from_a.ravel()], axis=1
                        ).reshape(n_u, n_a, 4)[better]
                x_d = max(xv, low)
                hide = max(xv, low) - max(float(big[g, e]), low / 2)
                total = m * x_d + tv
                if total < limit and up[g, e] > low:
                    base = total if first else m * x_d
                    val = np.where(ok[:, None], base - np.arange(n_a)[None] * hide
                                   + placed[0, n][src], inf)
                    best_a = val.argmin(axis=1)
                    value = val[np.arange(n_u), best_a]
                    better = value < with_d[i]
                    with_d[i] = np.where(better, value, with_d[i])
                    chose[i][better] = np.stack([np.full(n_u, 2), np.full(n_u, q), np.full(n_u, e),
                                                 best_a], axis=1)[better]
                if m * low + xv + tv < limit:
                    value = np.where(ok, (xv + tv if first else xv) + with_d[n][src], inf)
                    better = value < with_d[i]
                    with_d[i] = np.where(better, value, with_d[i])
                    chose[i][better] = np.stack([np.full(n_u, 1), np.full(n_u, q), np.full(n_u, e),
                                                 np.zeros(n_u, dtype=int)], axis=1)[better]
    s = int(with_d[0].argmin())
    value = float(with_d[0, s])
    if not math.isfinite(value):
        return Relaxed(value, (), ())
    usage = states[s]
    stages: list[RelaxedStage] = []
    i, level, a = 0, -1, 0          # level -1: before or at the dominant stage
    while i < rows:
        nxt = tables.rows[i][3]
        if level < 0:
            role, q, e, a_d = (int(v) for v in chose[i, s])
            kind = "dominant" if role == 2 else "before"
            a = a_d
            if role == 2:
                level = 0
        else:
            q, e, reads, a_read = (int(v) for v in took[level, i, s, a])
            kind = "after"
        g, n = b.groups[q], int(nxt[e])
        stages.append(_traced(b, kind, b.vectors[q], i, g, e, a, level))
        if kind == "after":
            level, a = reads, a_read
        s, i = int(minus[q, s]), n
    return Relaxed(value, tuple(stages), usage)


def priced_plan(b: Bed, low: float, top: float, limit: float,
                prices: np.ndarray) -> Relaxed:
    """``relaxed_plan`` with the devices priced (``prices`` per device of each class, as
    ``solver.relaxation.relaxed_many`` takes them) instead of counted, on every group of the
    bed at once: the value ``L - prices . n`` (``relaxed_many``'s at one price vector, or
    above it where its chords give less: ``M > _CHORD_POINTS``), its plan, and in
    ``usage`` the devices of each class the plan takes (it may take more than the cluster
    has: what the prices leave open)."""
    tables, m, rho = b.tables, b.num_micro, b.rho
    gates, levels = gate_levels(m, rho, low, _PRICED_AFTER_LEVELS)
    late, late_ta = _late_gate(m, rho, low)
    rest = rest_gate_at(m, int(tables.totals.sum()), rho, low, top)
    rows, n_a = len(tables.firsts), m
    cost = tables.counts @ prices                                           # (G,)
    inf = math.inf
    placed = np.full((levels + 1, rows + 1, n_a), inf)
    placed[:, rows, 0] = 0.0
    with_d = np.full(rows + 1, inf)
    took: dict[tuple[int, int, int], tuple[int, int, int, int]] = {}
    chose: dict[int, tuple[int, int, int, int]] = {}
    for i in range(rows - 1, -1, -1):
        x, big, t_a, nxt, _ = tables.rows[i]
        up = tables.uppers[i] if tables.uppers else np.full_like(x, inf)
        first = tables.firsts[i] == 0
        capped = np.where(x <= top, x, inf)
        priced = capped + cost[:, None]
        later = np.where(late + t_a * late_ta < limit, priced, inf)
        ends = x.shape[1]
        for lv in range(levels + 1):
            passes = (rest + t_a < limit) if lv == levels else (gates[lv] + t_a < limit)
            reads = min(lv + 1, levels)
            val = (np.where(passes, later, inf)[:, :, None]
                   + placed[reads][nxt][None]).reshape(-1, n_a)             # (G x E, A)
            best = val.argmin(axis=0)
            for a_read in range(n_a):
                a_new = min(a_read + 1, n_a - 1)
                if val[best[a_read], a_read] < placed[lv, i, a_new]:
                    placed[lv, i, a_new] = val[best[a_read], a_read]
                    g, e = divmod(int(best[a_read]), ends)
                    took[(lv, i, a_new)] = (g, e, reads, a_read)
        x_d = np.maximum(capped, low)
        hide = np.maximum(x, low) - np.maximum(big, low / 2)
        total = m * x_d + t_a
        base = np.where((total < limit) & (up > low),
                        (total if first else m * x_d) + cost[:, None], inf)
        val = (base[:, :, None] - np.arange(n_a)[None, None] * hide[:, :, None]
               + placed[0][nxt][None])
        j = int(np.argmin(val))
        if val.flat[j] < with_d[i]:
            with_d[i] = val.flat[j]
            at = np.unravel_index(j, val.shape)
            chose[i] = (2, int(at[0]), int(at[1]), int(at[2]))
        if m * low + t_a.min() < limit:
            val = np.where(m * low + capped + t_a < limit, priced + t_a if first else priced,
                           inf) + with_d[nxt][None]
            j = int(np.argmin(val))
            if val.flat[j] < with_d[i]:
                with_d[i] = val.flat[j]
                g, e = divmod(j, ends)
                chose[i] = (1, g, e, 0)
    value = float(with_d[0] - prices @ tables.totals)
    if not math.isfinite(value):
        return Relaxed(value, (), ())
    stages: list[RelaxedStage] = []
    used = np.zeros(len(tables.totals), dtype=int)
    i, level, a = 0, -1, 0
    while i < rows:
        nxt = tables.rows[i][3]
        if level < 0:
            role, g, e, a = chose[i]
            kind = "dominant" if role == 2 else "before"
            if role == 2:
                level = 0
        else:
            g, e, reads, a_read = took[(level, i, a)]
            kind = "after"
        n = int(nxt[e])
        used += tables.counts[g].astype(int)
        stages.append(_traced(b, kind, tuple(int(c) for c in tables.counts[g]), i, g, e, a,
                              level))
        if kind == "after":
            level, a = reads, a_read
        i = n
    return Relaxed(value, tuple(stages), tuple(int(u) for u in used))


def weakest_prices(costs: CostTable, cluster: Cluster, batch_size: int, micro_batch: int,
                   target: float, max_cuts: int | None = 96
                   ) -> tuple[Bed, float, float, np.ndarray, float]:
    """``class_bound`` with prices (no classes counted, no partner links) for
    ``micro_batch`` at ``target``: a bed on every group of its tables, the narrowest bucket
    ``(low, top]`` whose best dual value sets its bound, the prices of that value (per
    device of each class, as ``relaxed_many`` takes them) and the bound."""
    import solver.class_bound

    m = batch_size // micro_batch
    seen: dict[tuple[float, float], tuple[float, np.ndarray]] = {}
    original = solver.class_bound.relaxed_many

    def record(tables: ClassTables, m_: int, low: float, top: float, limit: float,
               prices: np.ndarray, *rest: Any) -> np.ndarray:
        found = original(tables, m_, low, top, limit, prices, *rest)
        k = int(np.argmax(found))
        if (low, top) not in seen or found[k] > seen[(low, top)][0]:
            seen[(low, top)] = (float(found[k]), np.array(prices[k]))
        return found

    solver.class_bound.relaxed_many = record     # type: ignore[assignment]
    try:
        value, tables, rho = _bound_tables(costs, cluster, batch_size, micro_batch, target,
                                           max_cuts)
    finally:
        solver.class_bound.relaxed_many = original
    if value is None or tables is None or not seen:
        raise ValueError(f"no class bound at micro-batch {micro_batch} (no group takes it, "
                         "or too many classes)")
    # (the bucket whose bound is the returned one: class_bound returns it times SLACK)
    (low, top), (_, prices) = min(seen.items(), key=lambda kv: (
        round(abs(max(kv[1][0], m * kv[0][0]) * SLACK - value) / value, 6),
        kv[0][1] - kv[0][0]))
    vectors = tuple(tuple(int(c) for c in row) for row in tables.counts)
    b = Bed(replace(tables, work=None), vectors, tuple(range(len(vectors))), m, rho,
            costs.num_layers)
    return b, low, top, prices, value


def realize(relaxed: Relaxed, costs: CostTable, cluster: Cluster, batch_size: int,
            micro_batch: int) -> Plan:
    """``relaxed``'s stages as a plan of ``cluster`` (each class's devices taken in turn,
    shares by Algorithm 1: ``solver.split.resplit``), with its prediction: where the
    relaxation is loose, which term of the round it leaves out (``PlanError`` where a
    stage does not fit its devices' memory, which the relaxation also ignores)."""
    classes = device_classes(cluster, costs)
    need = np.sum([st.vector for st in relaxed.stages], axis=0)
    short = [k for k, members in enumerate(classes) if need[k] > len(members)]
    if short:
        raise PlanError(f"the relaxed plan takes {need.tolist()} devices per class, the "
                        f"cluster has {[len(c) for c in classes]}")
    taken = [0] * len(classes)
    stages = []
    for st in relaxed.stages:
        names: list[str] = []
        for k, count in enumerate(st.vector):
            names += classes[k][taken[k]:taken[k] + count]
            taken[k] += count
        even = [micro_batch // len(names)] * len(names)     # (resplit splits it again)
        even[0] += micro_batch - sum(even)
        stages.append(Stage((st.first, st.last), tuple(names), tuple(even)))
    draft = Plan(model_hash=costs.model_hash, cluster_hash=cluster.cluster_hash,
                 batch_size=batch_size, micro_batch_size=micro_batch,
                 num_micro_batches=batch_size // micro_batch, stages=tuple(stages),
                 num_layers=costs.num_layers)
    return resplit(draft, costs, cluster, micro_batch)


def bucket_scan(b: Bed, limit: float, ratio: float = 0.99, lowest: float = 0.5
                ) -> Iterator[tuple[float, float, Relaxed]]:
    """``(low, top, relaxed_plan)`` for buckets of ``X_d`` from ``limit / M`` down by
    ``ratio`` to ``lowest`` times that, each bucket's bound ``max(M low, value)``."""
    top = limit / b.num_micro
    while top > lowest * limit / b.num_micro:
        low = top * ratio
        yield low, top, relaxed_plan(b, low, top, limit)
        top = low


class _Narrowed(EvenSpace):
    """``ClassSpace`` whose groups are the given count vectors only."""

    exhaustive_order = False

    def __init__(self, costs: CostTable, cluster: Cluster, vectors: Sequence[Vector]) -> None:
        super().__init__(costs, cluster)
        self._vectors = sorted(tuple(v) for v in vectors)

    def _takes(self, counts: tuple[int, ...], limit: int,
               deadline: float | None) -> Iterator[tuple[int, ...]]:
        for v in self._vectors:
            if sum(v) <= limit and all(t <= c for t, c in zip(v, counts, strict=True)):
                yield v


def narrowed_optimum(costs: CostTable, cluster: Cluster, batch_size: int, micro_batch: int,
                     vectors: Sequence[Vector], max_cuts: int | None = 96,
                     seconds: float = 600.0) -> DPResult:
    """The best plan whose stages all take one of ``vectors``, in every order, with
    ``micro_batch`` (the classes DP narrowed to them; ``complete`` once proven)."""
    narrowed = _Narrowed(costs, cluster.for_costs(costs), vectors)
    return asteroid_dp(costs, cluster, batch_size, optimizer_state_factor=0.0,
                       micro_batch_sizes=[micro_batch], max_cuts=max_cuts, space=narrowed,
                       deadline=time.perf_counter() + seconds)


def _parse_vectors(text: str) -> tuple[Vector, ...]:
    try:
        return tuple(tuple(int(c) for c in part.split("-")) for part in text.split(","))
    except ValueError:
        raise SystemExit(f"--vectors {text!r}: write count vectors as 8-0-0,0-8-0") from None


def main(argv: Sequence[str] | None = None) -> int:
    from tools.time_planner import jetson_mix, model_costs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=64, help="Jetsons (NX/TX2/Nano, 1 Gbps)")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--vectors", help="count vectors NX-TX2-Nano, e.g. 8-0-0,0-8-0 "
                        "(default: those of the plan solver.api.plan returns in --plan-s)")
    parser.add_argument("--plan-s", type=float, default=30.0)
    parser.add_argument("--target", type=float, help="the limit of the relaxed DP "
                        "(default: the narrowed optimum)")
    parser.add_argument("--ratio", type=float, default=0.99, help="bucket width")
    parser.add_argument("--priced", action="store_true", help="the class bound with prices "
                        "on every group instead: the relaxed plan of its weakest bucket at "
                        "its best prices")
    args = parser.parse_args(argv)
    costs, cluster = model_costs("resnet50_imagenet"), jetson_mix(args.devices)
    batch = 64
    if args.vectors:
        vectors = _parse_vectors(args.vectors)
    else:
        from solver.api import plan

        planned = plan(costs, cluster, batch, time_limit=args.plan_s)
        if planned.micro_batch_size != args.micro_batch:
            print(f"the plan's micro-batch is {planned.micro_batch_size}, not "
                  f"{args.micro_batch}: pass --micro-batch {planned.micro_batch_size}")
        vectors = plan_vectors(planned, costs, cluster)
    classes = len(device_classes(cluster, costs))
    if any(len(v) != classes or min(v) < 0 or not sum(v) for v in vectors):
        print(f"bound_bed: --vectors needs {classes} numbers >= 0 per vector (one per class: "
              "NX-TX2-Nano), not all 0", file=sys.stderr)
        return 2
    print(f"ResNet-50 on {args.devices} Jetsons, micro-batch {args.micro_batch}, count vectors "
          + ", ".join("-".join(map(str, v)) for v in vectors), flush=True)
    started = time.perf_counter()
    best = narrowed_optimum(costs, cluster, batch, args.micro_batch, vectors)
    print(f"exact optimum over them in every order: {best.round_time_s:.5f} s "
          f"({'proven' if best.complete else 'not finished'}, "
          f"{time.perf_counter() - started:.1f} s)", flush=True)
    if best.plan is None and args.target is None:
        print("bound_bed: no plan takes only these count vectors (more devices than the "
              "cluster has, or than the micro-batch has samples?); pass others or --target",
              file=sys.stderr)
        return 2
    target = args.target or best.round_time_s
    try:
        if args.priced:
            b, low, top, prices, value = weakest_prices(costs, cluster, batch, args.micro_batch,
                                                        target)
            relaxed = priced_plan(b, low, top, target, prices)
            print(f"class bound with prices on every group ({len(b.groups)}) below "
                  f"{target:.5f} s: {value:.5f} s, set in the bucket X_d in ({low:.5f}, "
                  f"{top:.5f}] (its dual there {relaxed.value:.5f} s at prices "
                  f"{np.round(prices, 6).tolist()}); its relaxed plan takes "
                  f"{list(relaxed.usage)} devices per class, the cluster has "
                  f"{[int(t) for t in b.tables.totals]}:")
        else:
            b = bed(costs, cluster, batch, args.micro_batch, vectors, target)
    except ValueError as exc:
        print(f"bound_bed: {exc}", file=sys.stderr)
        return 2
    if not args.priced:
        worst: tuple[float, float, float, Relaxed] | None = None
        for low, top, found in bucket_scan(b, target, args.ratio):
            value = max(b.num_micro * low, found.value)
            if worst is None or value < worst[0]:
                worst = (value, low, top, found)
        if worst is None or not math.isfinite(worst[0]):
            print(f"no relaxed plan below {target:.5f} s: the bound proves it")
            return 0
        value, low, top, relaxed = worst
        print(f"relaxation below {target:.5f} s: {value:.5f} s "
              f"({100 * (target / value - 1):.2f} % below), in the bucket X_d in ({low:.5f}, "
              f"{top:.5f}]; its relaxed plan (uses "
              + ", ".join(f"{'-'.join(map(str, v))} x{n}" for v, n in
                          zip(b.vectors, relaxed.usage, strict=True) if n) + "):")
    for st in relaxed.stages:
        extra = f" a={st.a}" if st.role == "dominant" else \
            (f" #{st.level + 1}" if st.level < _AFTER_LEVELS else f" #{_AFTER_LEVELS + 1}+") \
            if st.role == "after" else ""
        print(f"  {st.role + extra:18s} {'-'.join(map(str, st.vector)):8s} layers "
              f"{st.first:3d}-{st.last:3d}  x {st.x:.5f}  max(E) {st.big:.5f}  T_a {st.t_a:.4f}")
    try:
        real = realize(relaxed, costs, cluster, batch, args.micro_batch)
    except PlanError as exc:
        print(f"as a plan of the cluster it does not fit: {exc}")
        return 0
    if real.predicted is None:      # (resplit returns it evaluated)
        return 0
    print(f"as a plan of the cluster its round is {real.predicted.round_time_s:.5f} s "
          f"(dominant stage {real.predicted.dominant_stage}); per stage X, T_w + T_e + T_a:")
    for k, sp in enumerate(real.predicted.stages):
        print(f"  stage {k}: X {sp.e_f + sp.e_b:.5f}  E_b {sp.e_b:.5f}  "
              f"{sp.t_w:.4f} + {sp.t_e:.4f} + {sp.t_a:.4f} = {sp.total:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
