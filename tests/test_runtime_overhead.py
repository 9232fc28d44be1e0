"""Tests of asteroid_fx.runtime_overhead: the probe, its cache, and tables that get its figures."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import asteroid_fx.runtime_overhead as ro
from asteroid_fx.cost_source import with_host_overhead
from contracts.errors import CostModelError, RuntimeFailure
from contracts.table import RuntimeOverhead
from tests.solver_cases import uniform_costs

CANNED = {"runtime_overhead": {"forward_s": 1e-4, "backward_s": 2e-4, "round_s": 3e-4},
          "message_overhead_s": 5e-4, "probe": {}}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ASTEROID_FX_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def canned(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []

    def fake(steps: int = 60) -> dict[str, Any]:
        calls.append(steps)
        return json.loads(json.dumps(CANNED))

    monkeypatch.setattr(ro, "measure", fake)
    return calls


def test_the_probe_measures_the_runtime_on_this_host(cache: Path) -> None:
    data = ro.measure(steps=5)
    over = RuntimeOverhead.from_dict(data["runtime_overhead"])
    probe = data["probe"]
    # what the runtime measured against what the probe's table says, as the note defines
    assert over.forward_s == pytest.approx(
        max(0.0, probe["forward_cpu_s"] - probe["table_forward_s"]))
    assert over.backward_s == pytest.approx(
        max(0.0, probe["backward_cpu_s"] - probe["table_backward_s"]))
    assert probe["round_s"] > 0 and probe["allreduce_s"] > 0
    # two messages per all-reduce, paid at the probe devices' speed: kept at one core
    assert data["message_overhead_s"] == pytest.approx(
        max(0.0, (probe["allreduce_s"] - probe["allreduce_wire_s"]) / 2.0) * 0.75)


def test_the_collective_alone_is_the_last_arrivals_time_per_step() -> None:
    # per step the rank that arrived last (the smaller time); the median over the steps
    a = [5.0, 1.0, 9.0, 1.2, 30.0]
    b = [1.1, 4.0, 1.3, 6.0, 1.4]
    assert ro.collective_s([a, b]) == pytest.approx(1.2)
    # a stall of the host on some steps does not move it; a mean would
    assert ro.collective_s([a + [900.0], b + [800.0]]) == pytest.approx(1.25)
    with pytest.raises(CostModelError, match=r"timed \[4, 5\] all-reduces"):
        ro.collective_s([a, b[:4]])
    with pytest.raises(CostModelError, match="at least one"):
        ro.collective_s([[], []])


def test_the_host_figures_are_measured_once_and_cached(cache: Path, canned: list[int]) -> None:
    first = ro.host_runtime_overhead()
    assert first == ro.HostOverhead(RuntimeOverhead(1e-4, 2e-4, 3e-4), 5e-4)
    assert ro.host_runtime_overhead() == first
    assert len(canned) == 1
    assert ro.host_runtime_overhead(refresh=True) == first
    assert len(canned) == 2


def test_an_unreadable_cache_is_measured_again(cache: Path, canned: list[int],
                                               caplog: pytest.LogCaptureFixture) -> None:
    ro.host_runtime_overhead()
    path = next(cache.glob("runtime-overhead-*.json"))
    path.write_text(json.dumps({**CANNED, "message_overhead_s": -1.0}))
    with caplog.at_level(logging.WARNING):
        assert ro.host_runtime_overhead().message_s == 5e-4
    assert "unreadable runtime-overhead cache" in caplog.text and len(canned) == 2


def test_tables_get_the_host_figures_unless_they_have_their_own(cache: Path,
                                                                canned: list[int]) -> None:
    table = uniform_costs(3)
    got = with_host_overhead(table)
    assert got.runtime_overhead == RuntimeOverhead(1e-4, 2e-4, 3e-4)
    assert got.message_overhead_s == 5e-4
    assert got.layers == table.layers
    own = replace(table, runtime_overhead=RuntimeOverhead(forward_s=9e-4),
                  message_overhead_s=2e-3)           # e.g. a calibrated table
    assert with_host_overhead(own) == own
    fitted = replace(table, message_overhead_s=2e-3)
    assert with_host_overhead(fitted).message_overhead_s == 2e-3
    assert with_host_overhead(fitted).runtime_overhead.forward_s == 1e-4


def test_bad_steps_and_a_failing_probe_are_typed_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CostModelError, match="steps >= 3, got 2"):
        ro.measure(steps=2)

    def broken(steps: int) -> dict[str, Any]:
        raise RuntimeFailure("a device process died")

    monkeypatch.setattr(ro, "_measure", broken)
    with pytest.raises(CostModelError, match="a device process died.*--costs analytic"):
        ro.measure(steps=5)


def test_the_in_process_probe_refuses_bad_use() -> None:
    import multiprocessing

    import torch.distributed as dist

    with pytest.raises(CostModelError, match="steps >= 3"):
        ro.measure_here(steps=2)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(CostModelError, match="inside a running process group"):
            ro.measure_here(steps=3)
    finally:
        dist.destroy_process_group()
    # two processes that cannot finish in time are ended, and the error says why
    table = _probe_table()
    with pytest.raises(CostModelError, match="did not finish in 0.01 s"):
        ro._pair_allreduce(table, 3, 0.01)
    assert multiprocessing.active_children() == []


def _probe_table() -> Any:
    from asteroid_fx.costs import profile

    module = type(ro)("probe")
    exec(ro.PROBE_SOURCE, module.__dict__)
    return profile(module.build_model(), module.sample_batch, (4,), repeats=1)
