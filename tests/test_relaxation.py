"""Tests of the class bound's relaxed DP (solver/relaxation.py): prices, counted classes,
states by speed, kinds at once, floors and the late gate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from solver.space import ClassSpace
from tests.class_bound_cases import random_relaxed
from tests.solver_cases import patch_class_bound


def test_relaxed_at_many_prices_is_relaxed_at_each() -> None:
    # [Note: prices per class]: one pass of relaxed_many at K prices gives each price's
    # value of relaxed, partner-link prices included
    from solver.relaxation import relaxed, relaxed_many

    compared = 0
    for seed, tables, m, low, top, prices, fast, rho in random_relaxed(range(40), 5):
        many = relaxed_many(tables, m, low, top, 1e9, prices, rho, None, fast)
        for k in range(5):
            one = relaxed(tables, m, low, top, 1e9, prices[k], rho, None, fast[k])
            assert many[k] == pytest.approx(one, rel=1e-12, abs=1e-12), (seed, k)
            compared += math.isfinite(one)
    assert compared > 80


def test_counting_classes_is_never_below_pricing_them() -> None:
    # [Note: counted classes]: a class counted exactly relaxes less than any price on it:
    # at the same prices of the others (and partner links), counting one class or all of
    # them is never below the priced value beyond rounding, and above it on most of these
    # random prices
    from solver.relaxation import relaxed_many

    compared = higher = 0
    for seed, tables, m, low, top, prices, fast, rho in random_relaxed(range(40), 4):
        priced = relaxed_many(tables, m, low, top, 1e9, prices, rho, None, fast)
        classes = len(tables.totals)
        for counted in [(c,) for c in range(classes)] + [tuple(range(classes))]:
            found = relaxed_many(tables, m, low, top, 1e9, prices, rho, None, fast, counted)
            for k in range(len(prices)):
                if math.isinf(priced[k]):
                    assert found[k] == math.inf, (seed, counted, k)
                    continue
                # (counted: single precision, its rounding taken off the value)
                slack = 1e-5 * (1.0 + abs(priced[k]))
                assert found[k] >= priced[k] - slack, (seed, counted, k)
                compared += 1
                higher += found[k] > priced[k] + slack
    assert compared > 250
    assert higher > 200


def test_counted_classes_in_single_precision_stay_below_double(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # [Note: counted classes]: the counted tables are single precision, and the rounding
    # taken off keeps the value at most the same DP's in double precision, and close to it
    from solver.relaxation import relaxed_many

    compared = 0
    for seed, tables, m, low, top, prices, _, rho in random_relaxed(range(120), 1):
        every = tuple(range(len(tables.totals)))
        single = relaxed_many(tables, m, low, top, 1e9, prices, rho, None, None, every)
        with monkeypatch.context() as patch:
            patch_class_bound(patch, "_COUNTED_DTYPE", np.float64)
            double = relaxed_many(tables, m, low, top, 1e9, prices, rho, None, None, every)
        if math.isinf(double[0]):
            assert single[0] == math.inf
            continue
        assert double[0] * (1 - 1e-4) <= single[0] <= double[0], seed
        compared += 1
    assert compared > 30


def test_counted_classes_are_the_slowest_that_fit_the_states(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # [Note: counted classes]: the slowest classes first, while prod (n_k + 1) stays within
    # CLASS_COUNTED_STATES; none where the pools are counted already
    import random

    from solver.class_tables import bound_classes
    from solver.relaxation import CLASS_COUNTED_STATES, counted_classes
    from tests.solver_cases import make_cluster, random_costs

    costs = random_costs(random.Random(3), 6)

    def chosen(speeds: list[float]) -> list[float]:
        space = ClassSpace(costs, make_cluster(speeds).for_costs(costs))
        classes = bound_classes(space)
        assert classes is not None
        return sorted(space.bounds[classes[c][0]] for c in counted_classes(space))

    eleven, twenty = [1.7, 1.0, 0.4] * 11, [1.7, 1.0, 0.4] * 20
    assert 12 ** 3 <= CLASS_COUNTED_STATES < 21 ** 3
    every = chosen(eleven)
    assert len(every) == 3
    assert chosen(twenty) == every[:2]          # (sorted: the two slowest)
    assert chosen([1.7, 1.0, 0.4]) == []        # pools counted: nothing more to count
    patch_class_bound(monkeypatch, "CLASS_COUNTED_STATES", 1)
    assert chosen(eleven) == []


def test_late_gate_holds_for_every_stage_after_the_dominant_one() -> None:
    # (L) of solver.relaxation._late_gate: round >= g X_d + T_a^s / (2 - rho) for every stage
    # after the dominant one, at any position, on random pipelines of solver.evaluate's
    # round formula whose stages have min(E_f, E_b) >= rho X (docs/planner.md's example
    # of a late all-reduce above the round included)
    import random

    from solver.evaluate import round_terms
    from solver.relaxation import _late_gate

    def check(e_f: list[float], e_b: list[float], t_a: list[float], m: int,
              rho: float) -> bool:
        t_w, t_e, d = round_terms(e_f, e_b, m)
        round_s = max(w + e + a for w, e, a in zip(t_w, t_e, t_a, strict=True))
        x_d = e_f[d] + e_b[d]
        gate, scale = _late_gate(m, rho, x_d)
        tight = False
        for s in range(d + 1, len(e_f)):
            assert gate + t_a[s] * scale <= round_s * (1 + 1e-12), (e_f, e_b, t_a, m, rho)
            tight |= gate + t_a[s] * scale >= round_s * 0.7
        return tight

    assert check([1.1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 9], 1, 1 / 2.1)   # 7.28 <= 8.1
    rng = random.Random(5)
    tight = 0
    for _ in range(20000):
        rho = rng.choice([0.0, 0.2, 1 / 3, 0.45, 0.5])
        e_f, e_b = [], []
        for _ in range(rng.randint(2, 12)):
            x = rng.choice([rng.uniform(0.1, 1.0), 1.0])
            share = rng.uniform(rho, 1 - rho)
            e_f.append(x * share)
            e_b.append(x - x * share)
        t_a = [rng.choice([0.0, rng.uniform(0, 5), rng.uniform(0, 50)]) for _ in e_f]
        tight += check(e_f, e_b, t_a, rng.randint(1, 16), rho)
    assert tight > 300      # measured: at most 92 % of the round, 70 % or more on 661


def test_states_by_speed_map_each_state_to_its_suffix() -> None:
    # [Note: states by speed]: the count vectors in order of their bound speed (none used
    # first), and a kind's stage puts its suffix at u where the suffix after it has u - v
    import dataclasses

    from solver.relaxation import _CountStates

    checked = 0
    for _, tables, _, _, top, _, _, _ in random_relaxed(range(20), 1):
        every = tuple(range(len(tables.totals)))
        states = _CountStates(dataclasses.replace(tables, work=None), every, top)
        assert (np.diff(states.speed) >= 0).all() and not states.vecs[0].any()
        assert states.size == math.prod(int(n) + 1 for n in tables.totals)
        used = tables.counts.astype(int)
        for members, into, src in states.kinds(used, 0):
            kind = used[members]
            assert (kind == kind[0]).all()
            assert (states.vecs[into] - kind[0] == states.vecs[src]).all()
            # (every state that holds the kind's devices: none left out without the work)
            assert len(into) == int(((states.vecs >= kind[0]).all(axis=1)).sum())
            checked += 1
    assert checked > 40


def _random_kinds(rng: np.random.Generator, groups: int,
                  states: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Kinds as ``_CountStates.kinds`` gives them: the groups split into kinds, each with
    states (``into``, some shared with other kinds) and the states read (``src``)."""
    labels = rng.integers(0, max(1, groups // 2), groups)
    out = []
    for label in np.unique(labels):
        into = np.sort(rng.choice(states, rng.integers(1, states + 1), replace=False))
        out.append((np.nonzero(labels == label)[0], into, rng.integers(0, states, len(into))))
    return out


def test_batch_reads_every_kind_at_its_own_ends() -> None:
    # [Note: kinds at once]: the kinds that reach the same ends are read together, every
    # pair (kind, state) once, at exactly its kind's ends; the smallest over each kind's
    # groups and a kind's values at its pairs are those of a loop over the kinds
    from solver.relaxation import _Batch

    rng = np.random.default_rng(24)
    for _ in range(200):
        groups, states, ends = int(rng.integers(1, 9)), int(rng.integers(1, 7)), int(
            rng.integers(1, 12))
        kinds = _random_kinds(rng, groups, states)
        batch = _Batch(kinds, groups, states)
        reach = rng.random((len(kinds), ends)) < rng.uniform(0.0, 1.0)
        reach[rng.random(len(kinds)) < 0.3] = reach[0]          # (kinds with the same ends)
        seen = []
        for pairs, at in batch.reads(reach):
            for pair in pairs:
                assert list(np.nonzero(reach[batch.kind[pair]])[0]) == list(at)
            seen.extend(pairs.tolist())
        wanted = [p for p in range(len(batch.kind)) if reach[batch.kind[p]].any()]
        assert sorted(seen) == wanted
        values = rng.random((2, groups, ends))
        values[values < 0.2] = math.inf
        smallest = batch.per_kind(values, 1)
        for k, (members, into, src) in enumerate(kinds):
            assert np.array_equal(smallest[:, k], values[:, members].min(axis=1))
            pairs = np.nonzero(batch.kind == k)[0]
            assert np.array_equal(batch.src[pairs], src)
            assert np.array_equal(batch.into[pairs], into)
            picked = batch.at(smallest, 1, pairs, np.arange(ends), np.float32)
            assert picked.shape == (2, ends, len(pairs)) and picked.dtype == np.float32
            assert np.array_equal(picked, np.repeat(
                smallest[:, k, :, None].astype(np.float32), len(pairs), axis=2))


def test_batch_lowers_a_state_to_the_smallest_of_the_kinds_that_share_it() -> None:
    # [Note: kinds at once]: pairs of different kinds that put a suffix into the same
    # state: the state keeps the smallest value, on a whole table (one flat
    # np.minimum.at) and on a view of one (a row of with_d), along any axis
    from solver.relaxation import _Batch

    rng = np.random.default_rng(2024)
    for _ in range(200):
        states = int(rng.integers(1, 7))
        kinds = _random_kinds(rng, int(rng.integers(2, 9)), states)
        batch = _Batch(kinds, 9, states)
        pairs = np.nonzero(rng.random(len(batch.kind)) < 0.7)[0]
        for shape, axis in (((2, states, 3), 1), ((2, 4, states, 3), 2), ((2, states), 1)):
            table = rng.random(shape)
            values = rng.random(shape[:axis] + (len(pairs),) + shape[axis + 1:])
            wanted = table.copy()
            for n, pair in enumerate(pairs):
                at = (slice(None),) * axis + (batch.into[pair],)
                got = (slice(None),) * axis + (n,)
                wanted[at] = np.minimum(wanted[at], values[got])
            whole = table.copy()
            batch.min_into(whole, axis, pairs, values)
            assert np.array_equal(whole, wanted)
            wider = np.stack([table, table], axis=1)           # (a row of it: a view)
            batch.min_into(wider[:, 1], axis, pairs, values)
            assert np.array_equal(wider[:, 1], wanted) and np.array_equal(wider[:, 0], table)


def test_states_by_speed_only_raise_the_counted_value() -> None:
    # [Note: states by speed]: leaving out the suffixes whose devices cannot hold the
    # layers before them (or after) leaves every plan in: the counted value is never below
    # the one over every state (the same where every class is counted: the counts rule
    # those out already), and above it where the priced classes' devices would be needed
    # beyond their number (the value is a bound: class_bound's brute-force tests count)
    import dataclasses

    from solver.relaxation import relaxed_many

    compared = higher = 0
    for seed, tables, m, _, _, prices, fast, rho in random_relaxed(range(60), 2):
        assert tables.work is not None
        classes = len(tables.totals)
        # (a bucket near the round's fill: each stage at most a little above the model's
        # work over the cluster's speed)
        top = float(tables.work[1][0] / (tables.totals @ tables.speeds)) * (1.0 + seed / 60)
        for counted in [(0,), tuple(range(classes))]:
            kept = relaxed_many(tables, m, 0.0, top, 1e9, prices, rho, None, fast, counted)
            whole = relaxed_many(dataclasses.replace(tables, work=None), m, 0.0, top, 1e9,
                                 prices, rho, None, fast, counted)
            for k in range(len(prices)):
                if len(counted) == classes:
                    assert kept[k] == whole[k], (seed, k)
                assert kept[k] >= whole[k], (seed, counted, k)
                compared += math.isfinite(whole[k])
                higher += kept[k] > whole[k] * (1 + 1e-6)
    assert compared > 50
    assert higher > 0, compared


def test_floors_leave_every_value_below_the_limit() -> None:
    # [Note: floors of the counted tables]: the stages left out lead only to plans at the
    # limit or above, so every value below it is the same as without the floors (and the
    # states by speed: the same value where every class is counted); the others stay at
    # the limit or above
    import dataclasses

    from solver.relaxation import relaxed_many

    compared = cut = 0
    for seed, tables, m, low, top, prices, fast, rho in random_relaxed(range(60), 2):
        every = tuple(range(len(tables.totals)))
        plain = dataclasses.replace(tables, work=None)
        free = relaxed_many(tables, m, low, top, 1e9, prices, rho, None, fast, every)
        for k in range(len(prices)):
            if not math.isfinite(free[k]):
                continue
            for limit in (free[k] * 0.98, free[k] * 1.02 + 1e-3):
                args = (m, low, top, limit, prices[k:k + 1], rho, None, fast[k:k + 1], every)
                found = relaxed_many(tables, *args)[0]
                whole = relaxed_many(plain, *args)[0]
                if whole < limit:
                    assert found == whole, (seed, k, limit)
                    compared += 1
                else:
                    assert found >= limit * (1 - 1e-6), (seed, k, limit)
                    cut += 1
    assert compared > 20 and cut > 20
