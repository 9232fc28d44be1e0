"""Tests of solver/relaxation_compiled.py: the compiled priced and counted passes are
relaxed_many's numpy passes, value for value, keep the deadline and are not built inside
one."""

from __future__ import annotations

import dataclasses
import itertools
import math
import time

import numpy as np
import pytest

import solver.relaxation
import solver.relaxation_compiled
from solver.class_tables import Late
from solver.relaxation import relaxed_many
from solver.relaxation_compiled import build, built, pack
from tests.class_bound_cases import random_relaxed


def _both(monkeypatch: pytest.MonkeyPatch, *args: object) -> tuple[np.ndarray, np.ndarray]:
    """``relaxed_many(*args)`` compiled, then in numpy."""
    compiled = relaxed_many(*args)  # type: ignore[arg-type]
    with monkeypatch.context() as patch:
        patch.setattr(solver.relaxation, "COMPILED", False)
        reference = relaxed_many(*args)  # type: ignore[arg-type]
    return compiled, reference


def _break(patch: pytest.MonkeyPatch, kernel: str, why: str) -> list[int]:
    """``kernel`` of ``solver.relaxation_compiled`` replaced by one that raises ``why``
    (a numba that cannot build it), the compiled passes on (both restored after); each
    call appends to the list returned."""
    calls: list[int] = []

    def broken(*_: object) -> None:
        calls.append(1)
        raise RuntimeError(why)

    patch.setattr(solver.relaxation_compiled, kernel, broken)
    patch.setattr(solver.relaxation, "COMPILED", True)
    return calls


def test_the_compiled_priced_pass_is_the_numpy_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    # [Note: the compiled priced pass]: random instances with links and latency, random
    # buckets and prices (partner links included), limits from none to ones that gate
    # most stages after the dominant one (the levels, the late and rest gates) and stages
    # before it; every M of these instances (1 to 8: one to eight chord points)
    compared = exact = finite = 0
    ms = set()
    for seed, tables, m, low, top, prices, fast, rho in random_relaxed(range(60), 4):
        ms.add(m)
        for limit in (1e9, m * top * 1.5, m * top * 1.05, m * max(low, top / 2) * 1.02):
            for fast_prices in (fast, None):
                compiled, reference = _both(monkeypatch, tables, m, low, top, limit, prices,
                                            rho, None, fast_prices)
                assert compiled.shape == reference.shape == (len(prices),)
                same_inf = np.isinf(compiled) == np.isinf(reference)
                assert same_inf.all(), (seed, limit, compiled, reference)
                on = np.isfinite(reference)
                np.testing.assert_allclose(compiled[on], reference[on], rtol=1e-12,
                                           atol=1e-12, err_msg=f"seed {seed}, limit {limit}")
                compared += len(prices)
                finite += int(on.sum())
                exact += int((compiled == reference).sum())
    assert len(ms) >= 4
    assert finite > 600 and compared - finite > 50    # (values and empty buckets both)
    assert exact == compared        # (measured: the same float values, not only close)


def test_many_prices_at_once_are_the_numpy_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    # [Note: many prices at once]: a pass of PRICES_INNER prices or more runs the kernel
    # whose tables keep every price along their last axis: the same values as numpy's
    # pass, and as the kernel of one price at a time on the same arguments
    from solver.relaxation_compiled import PRICES_INNER

    many, one = solver.relaxation_compiled._pass_many, solver.relaxation_compiled._pass
    runs = [0]

    def both_kernels(*args: object) -> object:
        found, late = many(*args)
        again, _ = one(*args)
        assert np.array_equal(found, again, equal_nan=True)
        runs[0] += 1
        return found, late

    compared = finite = 0
    for seed, tables, m, low, top, prices, fast, rho in random_relaxed(range(30),
                                                                     PRICES_INNER + 4):
        for limit in (1e9, m * top * 1.05, m * max(low, top / 2) * 1.02):
            with monkeypatch.context() as patch:
                patch.setattr(solver.relaxation_compiled, "_pass_many", both_kernels)
                compiled, reference = _both(monkeypatch, tables, m, low, top, limit, prices,
                                            rho, None, fast)
            same = (compiled == reference) | (np.isinf(compiled) & np.isinf(reference))
            assert same.all(), (seed, limit, compiled, reference)
            compared += len(prices)
            finite += int(np.isfinite(reference).sum())
    assert runs[0] >= 30 and finite > 300 and compared - finite > 50


def test_the_compiled_counted_pass_is_the_numpy_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    # [Note: the compiled counted pass]: every set of counted classes (up to 3000
    # states), with the floors of [Note: floors of the counted tables] on (the tables
    # know their work) at the limits that prune, and the states by speed, and off;
    # single precision both ways
    compared = exact = finite = 0
    sets = set()
    for seed, tables, m, low, top, prices, fast, rho in random_relaxed(range(40), 2):
        assert tables.work is not None      # (the floors and the states' speed ranges)
        classes = range(len(tables.totals))
        for counted in itertools.chain.from_iterable(
                itertools.combinations(classes, r) for r in range(1, len(classes) + 1)):
            if np.prod([tables.totals[c] + 1 for c in counted]) > 3000:
                continue
            sets.add(len(counted))
            # (and without the work: no floors, every state kept; an infinite limit: no
            # floors either)
            for limit, held in ((1e9, tables), (m * top * 1.5, tables),
                                (m * top * 1.05, tables),
                                (m * max(low, top / 2) * 1.02, tables),
                                (m * top * 1.05, dataclasses.replace(tables, work=None)),
                                (math.inf, tables)):
                compiled, reference = _both(monkeypatch, held, m, low, top, limit, prices,
                                            rho, None, fast, counted)
                assert compiled.shape == reference.shape == (len(prices),)
                same = (compiled == reference) | (np.isinf(compiled) & np.isinf(reference))
                assert same.all(), (seed, counted, limit, compiled, reference)
                compared += len(prices)
                exact += int(same.sum())
                finite += int(np.isfinite(reference).sum())
    assert sets >= {1, 2, 3}
    assert finite > 200 and compared - finite > 200 and exact == compared


def test_one_price_is_relaxed() -> None:
    # `relaxed` (one price) runs the compiled pass too; a bucket below every stage's x
    # holds no relaxed plan: inf
    for seed, tables, m, low, top, prices, fast, rho in random_relaxed(range(8), 1):
        one = solver.relaxation.relaxed(tables, m, low, top, 1e9, prices[0], rho, None,
                                        float(fast[0]))
        many = relaxed_many(tables, m, low, top, 1e9, prices, rho, None, fast)
        assert one == many[0], seed
        below = min(float(r[0].min()) for r in tables.rows) / 2
        assert np.isinf(relaxed_many(tables, m, 0.0, below, 1e9, prices, rho)).all(), seed


def test_a_passed_deadline_is_late_and_the_rows_are_packed_once() -> None:
    seed, tables, m, low, top, prices, fast, rho = next(iter(random_relaxed(range(5), 2)))
    with pytest.raises(Late):
        relaxed_many(tables, m, low, top, 1e9, prices, rho, time.perf_counter() - 1.0, fast)
    assert pack(tables) is pack(tables)
    x, big, t_a, up, starts, ends, end_starts, nxt, shortest, first = pack(tables)
    groups = tables.rows[0][0].shape[0]
    assert len(x) == groups * int(ends.sum()) and len(nxt) == len(shortest) == ends.sum()
    for i, row in enumerate(tables.rows):     # each row's arrays, laid end to end
        assert ends[i] == row[0].shape[1]
        at = slice(starts[i], starts[i] + groups * ends[i])
        for flat, whole in ((x, row[0]), (big, row[1]), (t_a, row[2])):
            assert np.array_equal(flat[at].reshape(groups, -1), whole)
        assert np.array_equal(nxt[end_starts[i]:end_starts[i] + ends[i]], row[3])
        assert np.array_equal(shortest[end_starts[i]:end_starts[i] + ends[i]], row[4])
        assert first[i] == (tables.firsts[i] == 0)
        assert (np.array_equal(up[at].reshape(groups, -1), tables.uppers[i])
                if tables.uppers else np.isinf(up[at]).all())


def test_without_numba_the_numpy_pass_runs_and_says_so(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    import sys

    seed, tables, m, low, top, prices, fast, rho = next(iter(random_relaxed(range(5), 2)))
    compiled = relaxed_many(tables, m, low, top, 1e9, prices, rho, None, fast)
    solver.relaxation._compiled_passes.cache_clear()
    monkeypatch.setitem(sys.modules, "solver.relaxation_compiled", None)  # (ImportError)
    try:
        with caplog.at_level("WARNING", logger="solver.relaxation"):
            fallback = relaxed_many(tables, m, low, top, 1e9, prices, rho, None, fast)
            relaxed_many(tables, m, low, top, 1e9, prices, rho, None, fast)
    finally:
        solver.relaxation._compiled_passes.cache_clear()
    assert np.array_equal(fallback, compiled)
    warned = [r.getMessage() for r in caplog.records if "compiled pass" in r.getMessage()]
    assert len(warned) == 1 and "pip install numba" in warned[0]


def test_a_compiled_pass_that_fails_leaves_the_numpy_pass(monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    # a numba that cannot build the pass (a typing error, say) costs the speed only
    import solver.relaxation_compiled

    seed, tables, m, low, top, prices, fast, rho = next(iter(random_relaxed(range(5), 2)))
    compiled = relaxed_many(tables, m, low, top, 1e9, prices, rho, None, fast)
    calls = _break(monkeypatch, "_pass", "cannot build the pass")
    with caplog.at_level("WARNING", logger="solver.relaxation"):
        first = relaxed_many(tables, m, low, top, 1e9, prices, rho, None, fast)
        again = relaxed_many(tables, m, low, top, 1e9, prices, rho, None, fast)
    assert np.array_equal(first, compiled) and np.array_equal(again, compiled)
    assert len(calls) == 1      # (not tried again in this process)
    assert solver.relaxation.COMPILED is False
    warned = [r.getMessage() for r in caplog.records if "compiled pass failed" in
              r.getMessage()]
    assert len(warned) == 1 and "cannot build the pass" in warned[0]


def test_within_a_deadline_a_pass_not_built_runs_in_numpy(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # [Note: building the compiled passes]: a build takes seconds; inside a deadline the
    # numpy pass runs instead (said once), without one the compiled pass runs
    seed, tables, m, low, top, prices, fast, rho = next(iter(random_relaxed(range(5), 2)))
    assert build() > 0.0 and built(False) and built(True)
    expected = relaxed_many(tables, m, low, top, 1e9, prices, rho, None, fast, (0,))
    calls: list[int] = []

    def counted_kernel(*args: object) -> None:
        calls.append(1)
        raise AssertionError("not to be called inside a deadline")

    monkeypatch.setattr(solver.relaxation_compiled, "built", lambda counted: False)
    monkeypatch.setattr(solver.relaxation_compiled, "_counted", counted_kernel)
    monkeypatch.setattr(solver.relaxation, "_UNBUILT_SAID", [])
    later = time.perf_counter() + 600.0
    with caplog.at_level("INFO", logger="solver.relaxation"):
        for _ in range(2):
            found = relaxed_many(tables, m, low, top, 1e9, prices, rho, later, fast, (0,))
            assert np.array_equal(found, expected)
    assert not calls and solver.relaxation.COMPILED
    said = [r.getMessage() for r in caplog.records if "not built yet" in r.getMessage()]
    assert len(said) == 1 and "python -m solver.relaxation_compiled" in said[0]
    # (without a deadline it is built: here the stand-in, which fails: numpy from then on)
    monkeypatch.setattr(solver.relaxation, "COMPILED", True)
    assert np.array_equal(relaxed_many(tables, m, low, top, 1e9, prices, rho, None, fast,
                                       (0,)), expected)
    assert calls == [1] and not solver.relaxation.COMPILED


def test_the_passes_load_ahead_only_where_built(monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    # [Note: the bound's process from the start]: load_compiled loads the built passes
    # (build, which only loads once they are built), builds nothing that is not built,
    # and a load that fails is said, not raised (the passes' first call deals with it)
    loads: list[int] = []

    def load() -> float:
        loads.append(1)
        return 0.0

    monkeypatch.setattr(solver.relaxation_compiled, "build", load)
    monkeypatch.setattr(solver.relaxation_compiled, "built", lambda counted: True)
    solver.relaxation.load_compiled()
    assert loads == [1]
    monkeypatch.setattr(solver.relaxation_compiled, "built", lambda counted: counted)
    solver.relaxation.load_compiled()
    assert loads == [1]                 # (the priced passes not built: nothing loaded)

    def broken() -> float:
        raise OSError("cache unreadable")

    monkeypatch.setattr(solver.relaxation_compiled, "built", lambda counted: True)
    monkeypatch.setattr(solver.relaxation_compiled, "build", broken)
    with caplog.at_level("INFO", logger="solver.relaxation"):
        solver.relaxation.load_compiled()
    assert "did not load ahead: cache unreadable" in caplog.text
    assert solver.relaxation.COMPILED


def test_tables_replaced_are_packed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # tables made from others by dataclasses.replace (tools/bound_bed.py narrows the rows
    # so) get their own packed rows and kinds, not those of the tables they came from
    seed, tables, m, low, top, prices, fast, rho = next(iter(random_relaxed(range(5), 2)))
    relaxed_many(tables, m, low, top, 1e9, prices, rho, None, fast, (0,))
    assert "packed" in tables.compiled
    rows = tuple((x * 1.5, big, t_a, nxt, shortest * 1.5)
                 for x, big, t_a, nxt, shortest in tables.rows)
    slower = dataclasses.replace(tables, rows=rows)
    assert slower.compiled == {}
    assert np.array_equal(pack(slower)[0], np.concatenate([r[0].reshape(-1) for r in rows]))
    for counted in ((), (0,)):
        compiled, reference = _both(monkeypatch, slower, m, low, top, 1e9, prices, rho, None,
                                    fast, counted)
        assert np.array_equal(compiled, reference), counted


def test_a_compiled_pass_stops_at_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    # the kernels read the clock every 8 rows (object mode), as the numpy pass does: a
    # deadline that passes during a pass is Late, not a pass that overruns it
    seed, tables, m, low, top, prices, fast, rho = next(iter(random_relaxed(range(5), 2)))
    seen: dict[str, tuple[object, ...]] = {}
    for name in ("priced_pass", "counted_pass"):
        plain = getattr(solver.relaxation_compiled, name)

        def recorded(*args: object, plain: object = plain, name: str = name) -> object:
            seen[name] = args
            return plain(*args)  # type: ignore[operator]

        monkeypatch.setattr(solver.relaxation_compiled, name, recorded)
    for counted in ((), (0,)):
        relaxed_many(tables, m, low, top, 1e9, prices, rho, time.perf_counter() + 600.0, fast,
                     counted)
    assert set(seen) == {"priced_pass", "counted_pass"}
    monkeypatch.undo()
    for name, args in seen.items():
        run = getattr(solver.relaxation_compiled, name)
        assert np.isfinite(run(*args[:-1], time.perf_counter() + 600.0)).any(), name
        with pytest.raises(Late):
            run(*args[:-1], time.perf_counter() - 1.0)


def test_the_compiled_rows_are_the_numpy_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    # [Note: the compiled rows]: the priced tables built with the compiled rows are the
    # numpy rows bit for bit (x, max(E_f, E_b), T_a, the upper bounds where they hold
    # (with the memory check), the smallest x per end); random links, latencies, memory
    from solver.class_tables import build_class_tables
    from solver.evaluate import LayerSums
    from solver.space import ClassSpace
    from tests.class_bound_cases import rigid_instance
    from tests.solver_cases import random_instance

    compared = uppers = 0
    for seed in range(60):
        make = rigid_instance if seed % 2 else random_instance
        costs, cluster, batch = make(seed, max_layers=6, max_devices=5, links=True,
                                     latency=True)
        cluster = cluster.for_costs(costs)
        space = ClassSpace(costs, cluster)
        ends = list(range(costs.num_layers - 1))
        for mb in sorted({1, 2, batch}):
            if batch % mb:
                continue
            args = (space, LayerSums.of(costs), costs.cut_bytes, ends, mb, None, False,
                    (float(seed % 3), batch // mb) if seed % 4 < 2 else None, seed % 5 > 0)
            with monkeypatch.context() as patch:
                patch.setattr(solver.relaxation, "COMPILED", False)
                reference = build_class_tables(*args)
            compiled = build_class_tables(*args)
            if reference is None:
                assert compiled is None
                continue
            assert compiled is not None
            for mine, theirs in zip(compiled.rows, reference.rows, strict=True):
                for a, b in zip(mine, theirs, strict=True):
                    assert a.dtype == b.dtype and np.array_equal(a, b), seed
            for a, b in zip(compiled.uppers, reference.uppers, strict=True):
                assert np.array_equal(a, b), seed
                uppers += int(np.isfinite(a).sum())
            assert np.array_equal(compiled.compiled["laid"], reference.compiled["laid"])
            compared += 1
    assert solver.relaxation.COMPILED       # (no compiled row failed)
    assert compared > 60 and uppers > 100


def test_compiled_rows_that_fail_leave_the_numpy_rows(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    # a numba that cannot build the rows costs the speed only: the numpy rows, the class
    # bound's passes in numpy from then on, said once
    from solver.class_tables import build_class_tables
    from solver.evaluate import LayerSums
    from solver.space import ClassSpace
    from tests.solver_cases import random_instance

    costs, cluster, batch = random_instance(3, max_layers=6, max_devices=4, links=True)
    cluster = cluster.for_costs(costs)
    args = (ClassSpace(costs, cluster), LayerSums.of(costs), costs.cut_bytes,
            list(range(costs.num_layers - 1)), 1, None, False)      # (priced tables)
    expected = build_class_tables(*args)
    assert expected is not None and len(expected.rows) > 1
    calls = _break(monkeypatch, "_fill_row", "cannot build the rows")
    with caplog.at_level("WARNING", logger="solver.relaxation"):
        found = build_class_tables(*args)
    assert found is not None and calls == [1]
    for mine, theirs in zip(found.rows, expected.rows, strict=True):
        assert all(np.array_equal(a, b) for a, b in zip(mine, theirs, strict=True))
    assert solver.relaxation.COMPILED is False
    assert [r.getMessage() for r in caplog.records].count(
        "the class bound's compiled pass failed (cannot build the rows): its passes run in "
        "numpy from now on, 3-6 times slower") == 1
