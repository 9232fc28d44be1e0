"""Tests of solver/relaxation_compiled.py: the compiled priced pass is relaxed_many's numpy
pass, value for value, and keeps its deadline."""

from __future__ import annotations

import time

import numpy as np
import pytest

import solver.relaxation
from solver.class_tables import Late
from solver.relaxation import relaxed_many
from solver.relaxation_compiled import pack
from tests.class_bound_cases import random_relaxed


def _both(monkeypatch: pytest.MonkeyPatch, *args: object) -> tuple[np.ndarray, np.ndarray]:
    """``relaxed_many(*args)`` compiled, then in numpy."""
    compiled = relaxed_many(*args)  # type: ignore[arg-type]
    with monkeypatch.context() as patch:
        patch.setattr(solver.relaxation, "COMPILED_PRICED", False)
        reference = relaxed_many(*args)  # type: ignore[arg-type]
    return compiled, reference


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
    x_all, ends = pack(tables)[0], pack(tables)[6]
    assert x_all.shape[:2] == (len(tables.rows), tables.rows[0][0].shape[0])
    for i, row in enumerate(tables.rows):     # each row's x, then inf past its ends
        assert ends[i] == row[0].shape[1]
        assert np.array_equal(x_all[i, :, :ends[i]], row[0])
        assert not np.isfinite(x_all[i, :, ends[i]:]).any()


def test_without_numba_the_numpy_pass_runs_and_says_so(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    import sys

    seed, tables, m, low, top, prices, fast, rho = next(iter(random_relaxed(range(5), 2)))
    compiled = relaxed_many(tables, m, low, top, 1e9, prices, rho, None, fast)
    solver.relaxation._compiled_pass.cache_clear()
    monkeypatch.setitem(sys.modules, "solver.relaxation_compiled", None)  # (ImportError)
    try:
        with caplog.at_level("WARNING", logger="solver.relaxation"):
            fallback = relaxed_many(tables, m, low, top, 1e9, prices, rho, None, fast)
            relaxed_many(tables, m, low, top, 1e9, prices, rho, None, fast)
    finally:
        solver.relaxation._compiled_pass.cache_clear()
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
    calls: list[int] = []

    def broken(*args: object) -> None:
        calls.append(1)
        raise RuntimeError("cannot build the pass")

    monkeypatch.setattr(solver.relaxation_compiled, "_pass", broken)
    monkeypatch.setattr(solver.relaxation, "COMPILED_PRICED", True)    # (restored after)
    with caplog.at_level("WARNING", logger="solver.relaxation"):
        first = relaxed_many(tables, m, low, top, 1e9, prices, rho, None, fast)
        again = relaxed_many(tables, m, low, top, 1e9, prices, rho, None, fast)
    assert np.array_equal(first, compiled) and np.array_equal(again, compiled)
    assert len(calls) == 1      # (not tried again in this process)
    assert solver.relaxation.COMPILED_PRICED is False
    warned = [r.getMessage() for r in caplog.records if "compiled pass failed" in
              r.getMessage()]
    assert len(warned) == 1 and "cannot build the pass" in warned[0]
