"""Tests of the counted pools DP (solver/counted_pools.py) against its reference."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from solver.dp import asteroid_dp
from solver.evaluate import LayerSums
from solver.space import ClassSpace
from tests.solver_cases import patch_class_bound, random_instance


def _counted_cases(seeds: range) -> Any:
    """Per random instance of up to five devices whose pools are counted: the class tables
    of each micro-batch size, its number of micro-batches and the hiding ratio, and a
    target (twice the work bound)."""
    from solver.bound_bisection import work_bound
    from solver.class_tables import build_class_tables, counts_pools
    from solver.summary import hiding_ratio

    for seed in seeds:
        costs, cluster, batch = random_instance(seed, max_layers=6, max_devices=5, links=True,
                                                latency=seed % 2 == 0)
        cluster = cluster.for_costs(costs)
        space = ClassSpace(costs, cluster)
        if not counts_pools(space):
            continue
        rho = hiding_ratio(costs, cluster)
        for mb in (d for d in range(1, batch + 1) if batch % d == 0):
            tables = build_class_tables(space, LayerSums.of(costs), costs.cut_bytes,
                                        list(range(costs.num_layers - 1)), mb)
            if tables is not None and tables.pooled is not None:
                yield tables, batch // mb, rho, 2.0 * work_bound(costs, cluster, batch, mb)


def test_counted_pruning_keeps_the_value() -> None:
    # the pools too slow for the layers from a row on and the stages whose plans reach the
    # limit are left out: the same value as with everything kept, bit for bit
    from solver.counted_pools import counted_run

    compared = finite = 0
    for tables, m, rho, target in _counted_cases(range(0, 40)):
        for low_share, top_share in ((0.0, 1.0), (0.0, 0.5), (0.5, 0.8), (0.8, 1.0)):
            low, top = low_share * target / m, top_share * target / m
            pruned, _ = counted_run(tables, tables.pooled, m, low, top, target, rho)
            full, _ = counted_run(tables, tables.pooled, m, low, top, target, rho,
                                  prune=False)
            # at or above the limit the pruned run may say inf: the bound is capped there
            assert pruned == full or (pruned >= target and full >= target), (pruned, full)
            compared += 1
            finite += math.isfinite(full) and full < target
    assert compared > 500     # measured 564 runs, 361 of them below the limit
    assert finite > 300


def test_counted_run_on_the_suffixes_of_a_lower_bucket() -> None:
    # a bucket split off the top of another reads that one's suffixes after the dominant
    # stage: a lower bound no higher than its own run's, and mostly the same
    from solver.counted_pools import counted_run

    compared = same = 0
    for tables, m, rho, target in _counted_cases(range(0, 40)):
        top = target / m
        for low_share in (0.0, 0.3):
            _, after = counted_run(tables, tables.pooled, m, low_share * top, top, target,
                                   rho)
            for share in (0.5, 0.9):
                low = max(share, low_share) * top
                own, _ = counted_run(tables, tables.pooled, m, low, top, target, rho)
                reused, _ = counted_run(tables, tables.pooled, m, low, top, target, rho,
                                        after=after)
                assert reused <= own or (reused >= target and own >= target), (reused, own)
                compared += 1
                same += reused == own
    assert compared > 500     # measured 564, every one the same
    assert same > 0.9 * compared


def _mlp_case() -> tuple[Any, int, float, float] | None:
    """The 200-layer MLP of issue 14 on eight mixed devices at micro-batch 8 (the counted
    bound's costliest size): its class tables, micro-batches, hiding ratio and round."""
    from solver.class_tables import build_class_tables
    from solver.space import candidate_cuts
    from solver.summary import hiding_ratio
    from tools.time_planner import mixed8, model_costs

    costs, cluster = model_costs("mlp200"), mixed8().for_costs(model_costs("mlp200"))
    space = ClassSpace(costs, cluster)
    tables = build_class_tables(space, LayerSums.of(costs), costs.cut_bytes,
                                candidate_cuts(costs, 96), 8)
    if tables is None or tables.pooled is None:
        return None
    return tables, 8, hiding_ratio(costs, cluster), 0.06268075162732864


@pytest.mark.parametrize("at_once", [True, False])
def test_counted_run_equals_the_reference_bit_for_bit(at_once: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # the faster counted_run (equal positions, one pass per run) gives the value and the
    # suffixes of the reference implementation (main 903aa00), bit for bit, with and
    # without `after`, with the stages' terms computed at once or per row
    from solver.counted_pools import counted_run
    from tests.counted_reference import reference_counted_run

    if not at_once:
        patch_class_bound(monkeypatch, "_TERMS_AT_ONCE", 0)
    cases = list(_counted_cases(range(0, 40)))
    compared = finite = 0
    for tables, m, rho, target in cases:
        for low_share, top_share in ((0.0, 1.0), (0.0, 0.5), (0.5, 0.8), (0.8, 1.0),
                                     (0.3, 0.35)):
            low, top = low_share * target / m, top_share * target / m
            for prune in (True, False):
                ours, made = counted_run(tables, tables.pooled, m, low, top, target, rho,
                                         prune=prune)
                ref, ref_made = reference_counted_run(tables, tables.pooled, m, low, top,
                                                      target, rho, prune=prune)
                assert ours == ref or (math.isnan(ours) and math.isnan(ref)), (ours, ref)
                assert np.array_equal(made[0], ref_made[0])
                assert np.array_equal(made[1], ref_made[1])
                # a bucket split off the top of this one, reading its suffixes
                upper = (low + top) / 2
                ours2, _ = counted_run(tables, tables.pooled, m, upper, top, target, rho,
                                       after=made, prune=prune)
                ref2, _ = reference_counted_run(tables, tables.pooled, m, upper, top, target,
                                                rho, after=ref_made, prune=prune)
                assert ours2 == ref2, (ours2, ref2)
                compared += 1
                finite += math.isfinite(ours) and ours < target
    assert compared > 700
    assert finite > 300


@pytest.mark.parametrize("at_once", [True, False])
def test_counted_run_equals_the_reference_on_the_mlp(at_once: bool,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 14's MLP, where the gates let some stages through at some positions only
    from solver.counted_pools import counted_run
    from tests.counted_reference import reference_counted_run

    if not at_once:
        patch_class_bound(monkeypatch, "_TERMS_AT_ONCE", 0)
    case = _mlp_case()
    assert case is not None
    tables, m, rho, target = case
    top_all = target / m
    for low_share, top_share in ((0.0, 0.87), (0.73, 0.79), (0.76, 0.78), (0.87, 0.93)):
        low, top = low_share * top_all, top_share * top_all
        ours, made = counted_run(tables, tables.pooled, m, low, top, target, rho)
        ref, ref_made = reference_counted_run(tables, tables.pooled, m, low, top, target, rho)
        assert ours == ref
        assert np.array_equal(made[0], ref_made[0]) and np.array_equal(made[1], ref_made[1])


def test_counted_tables_cut_at_the_target_give_the_same_bound() -> None:
    # class_bound without a cache builds counted tables whose rows stop before the first
    # end all of whose stages have x above target / M; with a cache (tables kept for other
    # targets: every end) the bound is the same, bit for bit
    from solver.class_bound import class_bound
    from solver.class_tables import counts_pools
    from solver.space import micro_batch_choices
    from solver.summary import hiding_ratio

    compared = 0
    for seed in range(60, 90):
        costs, cluster, batch = random_instance(seed, max_layers=8, max_devices=5, links=True,
                                                latency=True)
        cluster = cluster.for_costs(costs)
        space = ClassSpace(costs, cluster)
        if not counts_pools(space):
            continue
        sums, rho = LayerSums.of(costs), hiding_ratio(costs, cluster)
        ends = list(range(costs.num_layers - 1))
        best = asteroid_dp(costs, cluster, batch).round_time_s
        if not math.isfinite(best):
            continue
        for mb in micro_batch_choices(batch, None):
            for target in (0.7 * best, best, 1.5 * best):
                cut = class_bound(space, sums, costs.cut_bytes, ends, mb, batch // mb, target,
                                  rho=rho)
                whole = class_bound(space, sums, costs.cut_bytes, ends, mb, batch // mb,
                                    target, rho=rho, cache={})
                assert cut == whole, (seed, mb, target)
                compared += 1
    assert compared > 100
