"""Tests of the class bound's tables (solver/class_tables.py): dominated groups and the
upper bounds of rigid groups."""

from __future__ import annotations

import math

import numpy as np
import pytest

import solver.class_bound
import solver.class_tables
import solver.counted_pools
import solver.relaxation
from solver.brute import enumerate_plans
from solver.evaluate import LayerSums, evaluate
from solver.space import ClassSpace
from tests.class_bound_cases import rigid_instance
from tests.solver_cases import patch_class_bound, random_instance


def test_dominated_groups_do_not_change_the_class_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # dropping groups that another one dominates (no more devices, no larger constants)
    # is exact: the same bound with every group kept

    from solver.class_bound import class_bound
    from solver.space import ClassSpace

    dropped = 0
    for seed in range(700, 725):
        costs, cluster, batch = random_instance(seed, max_layers=5, max_devices=5, links=True,
                                                latency=True)
        cluster = cluster.for_costs(costs)
        space = ClassSpace(costs, cluster)
        sums = LayerSums.of(costs)
        ends = list(range(costs.num_layers - 1))
        for mb in (1, 2, batch):
            if batch % mb:
                continue
            pruned = class_bound(space, sums, costs.cut_bytes, ends, mb, batch // mb, 1.0)
            tables = solver.class_tables.build_class_tables(space, sums, costs.cut_bytes, ends, mb)
            with monkeypatch.context() as patch:
                patch_class_bound(patch, "_undominated",
                                  lambda counts, consts, *_: np.arange(len(counts)))
                full = class_bound(space, sums, costs.cut_bytes, ends, mb, batch // mb, 1.0)
                every = solver.class_tables.build_class_tables(space, sums, costs.cut_bytes,
                                                               ends, mb)
            assert pruned == full, (seed, mb)
            if tables is not None and every is not None:
                dropped += len(every.counts) - len(tables.counts)
    assert dropped > 0


@pytest.mark.parametrize(("pools", "mixed"), [(False, False), (True, False), (False, True)])
def test_rigid_upper_bounds_hold_every_stage_of_every_plan(pools: bool, mixed: bool) -> None:
    # [Note: rigid groups]: the upper bound of X the class tables keep for a rigid group
    # (and, with the memory model, a mixed group whose shares fit) and a layer range is at
    # least X of every stage of brute force's plans on that group and range (runtime
    # overhead per call, memory caps, optimizer state, links and latency included)
    import random

    from solver.class_tables import bound_classes, build_class_tables

    seen = 0
    for seed in range(1000, 1040):
        costs, cluster, batch = rigid_instance(seed, max_layers=4, max_devices=4)
        if mixed and seed % 2:
            costs, cluster, batch = random_instance(seed, max_layers=4, max_devices=4,
                                                    links=True, latency=True)
        factor = random.Random(seed).choice([0.0, 1.0, 2.0]) if mixed else 0.0
        cluster = cluster.for_costs(costs)
        space = ClassSpace(costs, cluster)
        classes = bound_classes(space)
        assert classes is not None
        of = {space.names[d]: k for k, members in enumerate(classes) for d in members}
        ends = list(range(costs.num_layers - 1))
        for mb in sorted({plan.micro_batch_size
                          for plan in enumerate_plans(costs, cluster, batch, wide=True,
                                                      optimizer_state_factor=factor)}):
            tables = build_class_tables(space, LayerSums.of(costs), costs.cut_bytes, ends, mb,
                                        None, pools, (factor, batch // mb) if mixed else None)
            assert tables is not None
            groups = {tuple(int(c) for c in row): g for g, row in enumerate(tables.counts)}
            for plan in enumerate_plans(costs, cluster, batch, wide=True,
                                        micro_batch_sizes=[mb],
                                        optimizer_state_factor=factor):
                stages = evaluate(plan, costs, cluster).stages
                for stage, pred in zip(plan.stages, stages, strict=True):
                    vec = [0] * len(classes)
                    for name in stage.devices:
                        vec[of[name]] += 1
                    g = groups.get(tuple(vec))
                    if g is None:
                        continue
                    i = tables.firsts.index(stage.first)
                    e = stage.last - stage.first     # every boundary is a candidate end
                    upper = (tables.pooled.rows[i][3][g, e] if tables.pooled is not None
                             else tables.uppers[i][g, e])
                    if math.isfinite(upper):
                        seen += 1
                        assert pred.e_f + pred.e_b <= upper, (seed, mb, stage, upper)
    assert seen > 500


def test_undominated_keeps_the_groups_no_other_group_dominates(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the blocked comparison keeps exactly the groups that a pairwise reading of the rule
    # keeps: h drops g where h is no larger everywhere and may dominate, and of equal
    # groups only the first is kept (ties, infinities and blocks of a few groups)
    from solver.class_tables import _undominated

    def plain(both: np.ndarray, can: np.ndarray | None) -> list[int]:
        keep = []
        for g in range(len(both)):
            if not any(h != g and (can is None or can[h])
                       and all(both[h] <= both[g])
                       and (not all(both[h] == both[g]) or h < g)
                       for h in range(len(both))):
                keep.append(g)
        return keep

    rng = np.random.default_rng(5)
    for trial in range(60):
        monkeypatch.setattr(solver.class_tables, "_COMPARED_CELLS", [1, 7, 1 << 22][trial % 3])
        n = int(rng.integers(1, 60))
        counts = rng.integers(0, 3, (n, int(rng.integers(1, 4)))).astype(np.float64)
        consts = rng.integers(0, 3, (n, int(rng.integers(1, 5)))).astype(np.float64)
        consts[rng.random(consts.shape) < 0.1] = math.inf
        consts[rng.random(consts.shape) < 0.05] = -math.inf
        can = None if trial % 2 else rng.random(n) < 0.7
        kept = _undominated(counts, consts, can)
        assert kept.dtype == np.intp
        assert kept.tolist() == plain(np.concatenate([counts, consts], axis=1), can), trial


def test_the_memory_check_is_the_memory_model_per_group_and_end() -> None:
    # _fits reads each class's need per share value; every (group, end) answer is the one
    # the formula gives for that group's shares directly
    from solver.class_tables import ABOVE, WORKSPACE_FRACTION, _fits, bound_classes

    seen = {True: 0, False: 0}
    for seed in range(40):
        costs, cluster, _ = random_instance(seed, max_layers=6, max_devices=5,
                                            tight_memory=True)
        cluster = cluster.for_costs(costs)
        space = ClassSpace(costs, cluster)
        classes = bound_classes(space)
        assert classes is not None
        sums = LayerSums.of(costs)
        rng = np.random.default_rng(seed)
        shares = rng.integers(0, 5, (30, len(classes))).astype(np.float64)
        factor, m = float(rng.choice([0.0, 1.0, 2.0])), int(rng.integers(1, 5))
        check = _fits(space, classes, sums, (factor, m), shares)
        usable = [min(cluster.usable_bytes(space.names[d]) for d in members)
                  for members in classes]
        edges = sums.boundary_bytes
        for first in range(costs.num_layers):
            lasts = np.arange(first, costs.num_layers)
            ok = check(first, lasts)
            for e, last in enumerate(lasts):
                fixed = ((sums.param_bytes[last + 1] - sums.param_bytes[first]) * (3.0 + factor)
                         + (sums.buffer_bytes[last + 1] - sums.buffer_bytes[first]) + 1.0)
                per = float(sums.activation_bytes[last + 1] - sums.activation_bytes[first]) * m
                if edges:
                    per = per + 2 * m * edges[first] + (m + 1) * edges[last + 1]
                for g, row in enumerate(shares):
                    fit = all(b <= 0 or (fixed + b * per * (1.0 + WORKSPACE_FRACTION) + 1.0)
                              * ABOVE <= usable[k] for k, b in enumerate(row))
                    assert bool(ok[g, e]) == fit, (seed, first, last, g)
                    seen[fit] += 1
    # (both answers, many times)
    assert min(seen.values()) > 1000, seen
