"""Tests of runtime.emulator: setup arithmetic, shaped runs, and prompt failure on errors."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest
from test_executor import SeqSource, write_model

from contracts.cluster import Cluster
from contracts.errors import RuntimeFailure, StageFailure
from contracts.plan import Plan, Stage
from runtime.emulator import (
    CGROUP_ROOT,
    cgroup_available,
    emulate,
    emulation_setup,
    launch_local,
    memory_warnings,
)
from runtime.reference import reference_training
from runtime.train import TrainConfig

BOOM = '''
import os
import torch
from torch import nn

class Boom(nn.Module):
    calls = 0
    def forward(self, x):
        Boom.calls += 1
        if Boom.calls == 2:
            if os.environ.get("BOOM_EXIT"):
                os._exit(3)
            raise RuntimeError("boom")
        return x

def build_model():
    return nn.Sequential(nn.Linear(4, 4), Boom(), nn.Linear(4, 2))

def sample_batch(batch_size):
    return (torch.randn(batch_size, 4),), torch.randint(0, 2, (batch_size,))
'''


def _cluster(speeds: dict[str, float], mbps: float = 1000.0) -> Cluster:
    return Cluster.from_dict({
        "devices": [{"name": n, "type": "local", "speed": s, "memory_gb": 1}
                    for n, s in speeds.items()],
        "network": {"bandwidth_mbps": mbps}})


def _plan2() -> Plan:
    return Plan("m", "c", 4, 4, 1, (Stage((0, 0), ("a",), (4,)),
                                    Stage((1, 2), ("b",), (4,))))


def test_setup_scales_speeds_and_links_by_one_factor() -> None:
    plan = Plan("m", "c", 4, 4, 1, (Stage((0, 0), ("a", "b"), (2, 2)),
                                    Stage((1, 1), ("c",), (4,))))
    setup = emulation_setup(plan, _cluster({"a": 1.0, "b": 1.0, "c": 0.5}, 80), host_cores=2)
    assert setup.factor == pytest.approx(1.25)
    assert setup.effective_speeds == pytest.approx((0.8, 0.8, 0.4))
    assert setup.link_bytes_s[0][2] == pytest.approx(80e6 / 8 / 1.25)
    assert setup.link_latency_s == ((0.0,) * 3,) * 3      # no latency_ms: none
    slow = Cluster.from_dict({**_cluster({"a": 1.0, "b": 1.0, "c": 0.5}, 80).to_dict(),
                              "network": {"bandwidth_mbps": 80, "latency_ms": 4}})
    lagged = emulation_setup(plan, slow, host_cores=2)
    assert lagged.link_latency_s[0][2] == pytest.approx(0.004 * 1.25)   # dilated like time
    assert lagged.link_latency_s[1][1] == 0.0
    relaxed = emulation_setup(plan, _cluster({"a": 1.0, "b": 0.5, "c": 0.5}), host_cores=2)
    assert relaxed.factor == 1.0
    # a device's storage (a PAC disk cache) is paced like its links; undeclared: not paced
    stored = Cluster.from_dict({"devices": [
        {"name": "a", "type": "local", "speed": 1.0, "memory_gb": 1, "storage_mb_s": 80},
        {"name": "b", "type": "local", "speed": 1.0, "memory_gb": 1},
        {"name": "c", "type": "local", "speed": 0.5, "memory_gb": 1}]})
    disks = emulation_setup(plan, stored, host_cores=2)
    assert disks.storage_bytes_s[0] == pytest.approx(80e6 / 1.25)
    assert disks.storage_bytes_s[1:] == (math.inf, math.inf)
    assert disks.storage == {"storage_bytes_s": disks.storage_bytes_s}


def test_default_cores_leave_a_reserve(monkeypatch: pytest.MonkeyPatch) -> None:
    import runtime.emulator as emulator

    monkeypatch.setattr(emulator, "_host_cores", lambda: 2)
    assert emulator.usable_cores() == pytest.approx(2 - emulator.RESERVED_CORES)
    assert emulator.usable_cores(2) == 2.0
    monkeypatch.setattr(emulator, "_host_cores", lambda: 1)
    assert emulator.usable_cores() == pytest.approx(0.5)
    plan = Plan("m", "c", 4, 4, 1, (Stage((0, 0), ("a", "b"), (2, 2)),
                                    Stage((1, 1), ("c",), (4,))))
    monkeypatch.setattr(emulator, "_host_cores", lambda: 2)
    setup = emulation_setup(plan, _cluster({"a": 1.0, "b": 0.5, "c": 0.5}))
    assert setup.factor == pytest.approx(2.0 / 1.5)
    assert setup.host_cores == pytest.approx(1.5)


def test_setup_rejects_devices_missing_from_cluster() -> None:
    with pytest.raises(RuntimeFailure, match=r"plan devices \['b'\] are not in the cluster"):
        emulation_setup(_plan2(), _cluster({"a": 1.0}))


@pytest.mark.parametrize("exit_hard", [False, True])
def test_failing_worker_stops_everyone_promptly(tmp_path: Path, exit_hard: bool,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    if exit_hard:
        monkeypatch.setenv("BOOM_EXIT", "1")
    source = SeqSource(_plan2().to_json(), write_model(tmp_path, BOOM))
    start = time.perf_counter()
    expected = (r"rank 1 \(device 'b'\) died with exit code 3" if exit_hard else
                r"rank 1 \(device 'b'\): StageFailure: rank 1 \(device 'b', stage 1\) failed "
                r"at step 1, action 1F0: RuntimeError: boom")
    with pytest.raises(StageFailure, match=expected):
        launch_local(source, 2, TrainConfig(steps=5, timeout_s=60), timeout_s=60,
                     devices=("a", "b"))
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("use_cgroups", [True, False])
def test_shaped_run_is_still_transparent(tmp_path: Path, use_cgroups: bool) -> None:
    if use_cgroups and not cgroup_available():
        pytest.skip("cgroup v1 cpu controller not writable here")
    plan = Plan("m", "c", 8, 4, 2, (Stage((0, 1), ("a",), (4,)),
                                    Stage((2, 4), ("b", "c"), (3, 1))))
    source = SeqSource(plan.to_json(), write_model(tmp_path))
    result = emulate(source, _cluster({"a": 1.0, "b": 0.5, "c": 0.5}, 100),
                     TrainConfig(steps=2), host_cores=2, use_cgroups=use_cgroups,
                     timeout_s=120)
    assert result.shaping == ("cgroup" if use_cgroups else "dilation")
    ref = reference_training(source.model_module(), 8, steps=2)
    assert result.workers[0].losses == pytest.approx(ref.losses, rel=1e-6)
    mine = f"asteroid-fx-{os.getpid()}-"
    leftovers = ([p for p in os.listdir(CGROUP_ROOT) if p.startswith(mine)]
                 if CGROUP_ROOT.exists() else [])
    assert leftovers == []


def test_cfs_settings_keep_short_periods() -> None:
    from runtime.emulator import cfs_settings

    assert cfs_settings(1.0) == (5000, 5000)
    assert cfs_settings(0.4) == (5000, 2000)
    period, quota = cfs_settings(0.05)
    assert quota == 1000 and quota / period == pytest.approx(0.05)
    assert cfs_settings(3.0) == (5000, 5000)



def test_cpu_stat_reads_the_counters_and_names_a_bad_line(tmp_path: Path) -> None:
    from runtime.shaping import cpu_stat

    (tmp_path / "cpu.stat").write_text("nr_periods 931\nnr_throttled 124\n"
                                       "throttled_time 70000000\n")
    assert cpu_stat(tmp_path) == {"nr_periods": 931, "nr_throttled": 124,
                                  "throttled_time": 70000000}
    (tmp_path / "cpu.stat").write_text("nr_periods many\n")
    with pytest.raises(RuntimeFailure, match="'nr_periods many'"):
        cpu_stat(tmp_path)


def test_communication_threads_leave_the_compute_threads_group(tmp_path: Path) -> None:
    import threading

    from runtime.shaping import CommThreads, comm_group

    group = tmp_path / "asteroid-fx-1-0"
    group.mkdir()
    written: list[str] = []
    comm_group(group).mkdir()
    threads = CommThreads(interval_s=0.01)
    # a cgroup-v1 "tasks" file takes one thread id per write: record each write
    real_write = Path.write_text

    def record(self: Path, data: str, *args: object, **kwargs: object) -> int:
        if self.name == "tasks":
            written.append(data)
        return real_write(self, data)

    stop = threading.Event()
    started = threading.Event()
    ids: list[int] = []

    def worker() -> None:
        ids.append(threading.get_native_id())
        started.set()
        stop.wait(5)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "write_text", record)
        threads.follow(str(group))
        t = threading.Thread(target=worker)
        t.start()
        started.wait(5)
        deadline = time.monotonic() + 5
        while str(ids[0]) not in written and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        t.join()
        moved = list(written)
        # a group without a sibling (an uncapped device in the root group): nothing moves
        (tmp_path / "root-group").mkdir()
        threads.follow(str(tmp_path / "root-group"))
        written.clear()
        threads.move()
    assert str(ids[0]) in moved                              # a thread started later moves
    assert str(threading.get_native_id()) not in moved       # the computing thread stays
    assert len(moved) == len(set(moved))                     # each thread once
    assert written == []
    # follow puts the process itself in the group it follows
    assert (tmp_path / "root-group" / "cgroup.procs").read_text() == str(os.getpid())


def test_devices_smaller_than_the_plans_peak_are_named() -> None:
    # an emulated cluster of 10 KB devices trained a package without a word: the emulator
    # shapes speed and links, not memory
    from solver.api import plan as plan_fn
    from tests.solver_cases import make_cluster, uniform_costs

    costs, cluster = uniform_costs(4), make_cluster([1.0, 1.0])
    made = plan_fn(costs, cluster, 8, planner="pp-equal")
    assert memory_warnings(made, cluster) == []
    tiny = make_cluster([1.0, 1.0], memory_mib=0.01)
    lines = memory_warnings(made, tiny)
    assert len(lines) == len(set(made.devices)) and "the emulator does not limit memory" in \
        lines[0] and "'d0'" in lines[0]


def test_a_device_or_link_emulated_near_standstill_is_warned() -> None:
    """A device at speed 1e-6 ran 130 s in silence, then timed out; a link of 0.0001 Mbps
    said nothing for minutes."""
    from runtime.emulator import EmulationSetup, slow_warnings

    fast = 125e6   # 1 Gbps in bytes/s
    setup = EmulationSetup(devices=("a", "b", "c"), speeds=(1.0, 1e-6, 0.5), factor=1.0,
                           link_bytes_s=((0.0, fast, 12.5), (fast, 0.0, fast),
                                         (12.5, fast, 0.0)), host_cores=1.5)
    lines = slow_warnings(setup)
    assert lines == ["device 'b' is emulated at 1e-06 of a host core: a step may take "
                     "minutes (check its speed or flops in the cluster)",
                     "the link a-c is emulated at 0.0001 Mbps: a step may take minutes "
                     "(check its bandwidth_mbps in the cluster)"]
    assert slow_warnings(EmulationSetup(devices=("a",), speeds=(0.5,), factor=1.0,
                                        link_bytes_s=((0.0,),), host_cores=1.0)) == []
