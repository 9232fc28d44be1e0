"""Tests of solver.beside: work in a forked process sees the incumbents offered, its result
or its failure comes back as data, and a process that overruns is ended."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import pytest

import solver.beside
from solver.beside import RESULT_GRACE_S, Beside, spare_core


def _wait_for_better(incumbent: Callable[[], float], publish: Callable[[float], None]) -> float:
    publish(0.25)
    deadline = time.monotonic() + 20.0
    while incumbent() >= 1.0 and time.monotonic() < deadline:
        time.sleep(0.01)
    return incumbent()


def test_the_result_comes_back_and_the_work_sees_the_offers() -> None:
    # (and what the work publishes on the way is seen here)
    beside = Beside(_wait_for_better, 5.0)
    try:
        assert math.isnan(beside.published) or beside.published == 0.25
        beside.offer(7.0)          # larger: ignored
        beside.offer(0.5)
        beside.offer(0.75)         # larger than 0.5: ignored
        assert beside.result(time.perf_counter() + 20.0) == (True, 0.5)
        assert beside.published == 0.25
    finally:
        beside.close()
    beside.close()                 # (twice is fine)


def _raise(incumbent: Callable[[], float], publish: Callable[[float], None]) -> float:
    raise ValueError(f"no bound below {incumbent()}")


def _die(incumbent: Callable[[], float], publish: Callable[[float], None]) -> float:
    os._exit(3)


def _sleep(incumbent: Callable[[], float], publish: Callable[[float], None]) -> float:
    time.sleep(60.0)
    return incumbent()


def test_an_error_of_the_work_is_one_line() -> None:
    beside = Beside(_raise, 2.0)
    assert beside.result(time.perf_counter() + 20.0) == (False, "ValueError: no bound below 2.0")


def test_a_process_that_dies_gives_nothing_at_once() -> None:
    beside = Beside(_die, 2.0)
    began = time.perf_counter()
    ok, why = beside.result(time.perf_counter() + 20.0)
    assert not ok and "exit code 3" in why and not beside.running
    assert time.perf_counter() - began < 10.0      # the exit, not the deadline


def test_a_process_that_overruns_is_ended_after_the_grace() -> None:
    beside = Beside(_sleep, 2.0)
    began = time.perf_counter()
    ok, why = beside.result(began + 0.2)
    waited = time.perf_counter() - began
    assert not ok and why.startswith("not done") and not beside.running
    assert 0.2 + RESULT_GRACE_S * 0.9 <= waited < 0.2 + RESULT_GRACE_S + 10.0
    assert beside.result(began) == (ok, why)       # (kept: asked again, no wait)


def test_no_process_beside_where_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(solver.beside, "BESIDE", False)
    assert not spare_core()
