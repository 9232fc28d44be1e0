"""Tests of runtime.pacing: a compute call ends no earlier than its CPU time over the speed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_train import CLUSTER, _partition

from runtime.launch import metrics_lines, run
from runtime.pacing import pace
from runtime.reference import reference_training
from runtime.stage_io import load_model_module


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_call_at_half_speed_takes_twice_its_cpu_time() -> None:
    began, cpu = time.perf_counter(), time.thread_time()
    _burn(0.02)
    pace(began, cpu, 0.5)
    assert time.perf_counter() - began >= 2 * (time.thread_time() - cpu) - 1e-3


def test_full_speed_and_a_stretched_call_sleep_nothing() -> None:
    began, cpu = time.perf_counter(), time.thread_time()
    _burn(0.01)
    before = time.perf_counter()
    pace(began, cpu, 1.0)
    assert time.perf_counter() - before < 0.005
    began, cpu = time.perf_counter(), time.thread_time()
    time.sleep(0.05)                   # waited (a busy host, the quota): already slower
    _burn(0.005)
    before = time.perf_counter()
    pace(began, cpu, 0.5)
    assert time.perf_counter() - before < 0.005


def test_an_emulated_run_paces_every_capped_forward_and_backward(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # with pacing on, each F/B of a device held to a quota ends no earlier than its CPU
    # time over the device's effective speed (the emulator's slow-down factor included);
    # the losses do not change
    import runtime.shaping
    from runtime.emulator import cgroup_available

    if not cgroup_available():
        pytest.skip("pacing applies to cgroup-capped devices; needs a writable cgroup v1 cpu")
    monkeypatch.setattr(runtime.shaping, "PACE", True)
    directory = _partition(tmp_path)
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER)
    metrics = tmp_path / "m.jsonl"
    result = run(directory, emulate=cluster, steps=3, seed=5, lr=0.05, metrics=metrics)
    ref = reference_training(load_model_module(directory), 12, steps=3, seed=5, lr=0.05)
    assert result.losses == pytest.approx(ref.losses, rel=1e-6)
    speeds = {"fast": 1.0, "slow0": 0.5, "slow1": 0.5}
    devices = metrics_lines(metrics)[-1]["devices"]
    for name, d in devices.items():
        speed = min(1.0, speeds[name] / result.slowdown_factor)
        assert speed < 1.0
        for kind in ("forward", "backward"):
            assert d[f"{kind}_s"] >= d[f"{kind}_cpu_s"] / speed * 0.999 - 1e-4
