"""Local emulation of a cluster: one process per device, speed and bandwidth shaped."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from contracts.errors import RuntimeFailure
from contracts.plan import Plan
from runtime.shaping import (
    CGROUP_ROOT,
    Shaping,
    cfs_settings,
    cgroup_available,
    choose_shaping,
    remove_cgroups,
)
from runtime.supervisor import LocalJob, Supervisor, free_port
from runtime.train import StageSource, TrainConfig, WorkerResult, train_device
from runtime.worker import worker_main

__all__ = [
    "EmulationSetup",
    "EmulationResult",
    "CGROUP_ROOT",
    "cgroup_available",
    "cfs_settings",
    "emulation_setup",
    "usable_cores",
    "RESERVED_CORES",
    "launch_local",
    "emulate",
    # moved: the process plumbing lives in runtime.supervisor and runtime.worker
    "free_port",
    "worker_main",
    "LocalJob",
]

log = logging.getLogger(__name__)


# [Note: emulated speed]
# Speed 1.0 is one host core. Each device process computes on one thread
# (torch.set_num_threads(1)) and is held to ``speed`` of a core: by a cgroup-v1 CPU quota
# (cpu.cfs_quota_us = speed x period, period 5 ms: CFS caps CPU time per period, so a longer
# period would let a short burst after idle waiting run at full speed) when
# /sys/fs/cgroup/cpu is writable, otherwise by time
# dilation (after each forward/backward it sleeps (1/speed - 1) x the measured compute).
# When the speeds add up to more than the cores the emulator may use, every speed is
# divided by one common factor f = sum(speeds) / usable cores and every link's bandwidth
# too, so the whole emulated time axis stretches by exactly f: measured times compare with
# f x the plan's predicted times. The usable cores are the host's minus RESERVED_CORES
# (unless given explicitly): the launcher, gloo's communication threads, heartbeats and
# the OS need CPU too, and a device process whose quota is the whole remaining host
# starves. Measured on this project's 2-core host (tools/bench_runtime.py, MLP pipeline
# of 3 devices 1.0/0.5/0.5, micro-batch 8): the dominant stage ran 1.28x its predicted
# compute with all 2 cores handed out, 1.10x with 1.6, 1.03x with 1.2.


@dataclass(frozen=True)
class EmulationSetup:
    """Per-rank emulated speeds, the common slow-down factor and the link bandwidths."""

    devices: tuple[str, ...]
    speeds: tuple[float, ...]            # as declared (relative to one host core)
    factor: float                        # common slow-down (>= 1)
    link_bytes_s: tuple[tuple[float, ...], ...]   # already divided by factor
    host_cores: float                    # cores the devices share (see usable_cores)
    #: one-way latency (seconds) of a message between two ranks, already times factor
    link_latency_s: tuple[tuple[float, ...], ...] = ()
    #: per rank, its storage's bytes/s (``storage_mb_s``) over factor; inf: not declared
    storage_bytes_s: tuple[float, ...] = ()

    @property
    def effective_speeds(self) -> tuple[float, ...]:
        return tuple(s / self.factor for s in self.speeds)

    def timing(self, config: Any) -> dict[str, Any]:
        """``time_factor`` and ``prediction`` for ``config`` (a ``TrainConfig``): its rows
        compare with the prediction times the slow-down factor ("emulated", unless a re-plan
        already named it "calibrated")."""
        kind = "emulated" if config.prediction == "plan" else config.prediction
        return {"time_factor": self.factor, "prediction": kind}

    @property
    def links(self) -> dict[str, Any]:
        """``link_bytes_s`` and ``link_latency_s``, as ``TrainConfig`` and the recovery
        ``WorkerSpec`` take them (``dataclasses.replace(config, **setup.links)``)."""
        return {"link_bytes_s": self.link_bytes_s,
                "link_latency_s": self.link_latency_s or None}

    @property
    def storage(self) -> dict[str, Any]:
        """``storage_bytes_s``, as ``TrainConfig`` takes it (a PAC disk cache's pace)."""
        return {"storage_bytes_s": self.storage_bytes_s or None}


@dataclass
class EmulationResult:
    """Results of every rank plus how the emulation was shaped."""

    workers: list[WorkerResult]
    setup: EmulationSetup | None
    shaping: str                          # "cgroup", "dilation" or "none"
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


RESERVED_CORES = 0.5
"""Host CPU the emulator leaves to the launcher, communication threads and the OS."""


def usable_cores(host_cores: float | None = None) -> float:
    """Cores the emulated devices may share: ``host_cores`` if given, else the host's
    cores minus ``RESERVED_CORES`` (at least half a core)."""
    if host_cores is not None:
        return float(host_cores)
    return max(0.5, _host_cores() - RESERVED_CORES)


def _host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def memory_warnings(plan: Plan, cluster: Any) -> list[str]:
    """A line per device of the emulated ``cluster`` whose memory is below the plan's
    predicted peak there: the emulator shapes speed and links, not memory, so such a run
    trains but shows nothing of whether the plan fits those devices."""
    if plan.predicted is None:
        return []
    names = set(cluster.names)
    out = []
    for name, peak in sorted(plan.predicted.peak_memory_bytes.items()):
        memory = cluster.device(name).memory_bytes if name in names else None
        if memory is not None and peak > memory:
            out.append(f"device {name!r}: the plan's predicted peak memory {peak / 2**20:.1f} "
                       f"MiB is above its {memory / 2**20:.1f} MiB in the emulated cluster; "
                       f"the emulator does not limit memory, so this run does not show whether "
                       f"the plan fits there (re-plan for that cluster)")
    return out


SLOW_SPEED = 1e-3
"""An emulated device below this share of a host core (after the common factor) is warned:
at speed 1e-6 a run said nothing for 130 s, then timed out."""

SLOW_LINK_BYTES_S = 12_500.0
"""An emulated link below this (0.1 Mbps, after the common factor) is warned: at 0.0001
Mbps a run said nothing for minutes."""


def slow_warnings(setup: EmulationSetup) -> list[str]:
    """A line per emulated device or link so slow that a step may take minutes (the run
    is not refused: a slow device is what the emulator is for, but not in silence)."""
    out = [f"device {name!r} is emulated at {speed:.3g} of a host core: a step may take "
           f"minutes (check its speed or flops in the cluster)"
           for name, speed in zip(setup.devices, setup.effective_speeds)
           if speed < SLOW_SPEED]
    slow = [(setup.devices[a], setup.devices[b], rate)
            for a, row in enumerate(setup.link_bytes_s) for b, rate in enumerate(row)
            if a < b and rate < SLOW_LINK_BYTES_S]
    out += [f"the link {a}-{b} is emulated at {rate * 8 / 1e6:.3g} Mbps: a step may take "
            f"minutes (check its bandwidth_mbps in the cluster)" for a, b, rate in slow]
    return out


def emulated_cluster(cluster: Any) -> Any:
    """``cluster`` as a ``Cluster``: read from its YAML where it is a path; ``ClusterError``
    where it is neither (a dict failed deep inside with AttributeError)."""
    from contracts.arguments import check_cluster  # host-side only: a device never emulates
    from contracts.cluster import Cluster

    if isinstance(cluster, (str, Path)):
        return Cluster.from_yaml(cluster)
    return check_cluster(cluster, "emulate")


def emulation_setup(plan: Plan, cluster: Any, *, host_cores: float | None = None,
                    host_flops: float | None = None) -> EmulationSetup:
    """Speeds and bandwidths of the plan's devices in ``cluster`` (a ``contracts.cluster.Cluster``
    or a path to cluster.yaml). Devices given by FLOP/s only (Jetson types) are scaled to
    ``host_flops``; without it the fastest such device counts as one host core."""
    cluster = emulated_cluster(cluster)
    names = set(cluster.names)
    missing = [d for d in plan.devices if d not in names]
    if missing:
        raise RuntimeFailure(f"plan devices {missing} are not in the cluster "
                             f"(devices: {sorted(names)}); emulate the cluster the plan was "
                             f"made for")
    if host_flops is None:
        flops = [d.flops for d in cluster.devices if d.speed is None and d.flops]
        host_flops = max(flops) if flops else 1.0
    all_speeds = cluster.speeds(host_flops)
    speeds = tuple(float(all_speeds[d]) for d in plan.devices)
    cores = usable_cores(host_cores)
    factor = max(1.0, sum(speeds) / cores)
    links = tuple(tuple(math.inf if a == b else cluster.bandwidth_bytes_s(a, b) / factor
                        for b in plan.devices) for a in plan.devices)
    latency = tuple(tuple(cluster.latency_s(a, b) * factor for b in plan.devices)
                    for a in plan.devices)
    storage = tuple(math.inf if cluster.device(d).storage_mb_s is None
                    else cluster.device(d).storage_mb_s * 1e6 / factor for d in plan.devices)
    return EmulationSetup(devices=tuple(plan.devices), speeds=speeds, factor=factor,
                          link_bytes_s=links, host_cores=cores, link_latency_s=latency,
                          storage_bytes_s=storage)


def launch_local(source: StageSource, world: int, config: TrainConfig, *,
                 cgroups: Sequence[str] | None = None,
                 progress: Callable[[Mapping[str, Any]], None] | None = None,
                 timeout_s: float = 600.0,
                 devices: Sequence[str] | None = None,
                 token: str | None = None,
                 body: Callable[..., WorkerResult] = train_device,
                 may_fail: Sequence[int] = (),
                 on_lost: Callable[[int, Any], None] | None = None) -> list[WorkerResult]:
    """Run ``world`` device processes on this host (gloo, TCPStore rendezvous on 127.0.0.1).

    Each process runs ``body(source, rank, config, hooks=None, report=...)`` (default
    ``runtime.train.train_device``; PAC fine-tuning passes ``runtime.pac_train``'s).
    Ranks in ``may_fail`` may die without ending the run (a body that recovers by itself,
    as PAC does); the results then leave them out, and ``on_lost(rank, store)`` is called
    in this process as soon as such a rank's process is gone (``store``: the job's store,
    which the workers see as their default store; see runtime.pac_recovery).

    The first worker that raises, dies or stays stopped ends the run: every other child is
    killed at once and ``StageFailure`` carries the first error (rank, step, action; see
    [Note: one supervisor] in runtime.supervisor). Never hangs: the whole run is bounded by
    ``timeout_s``. Each worker proves ``token`` (a fresh one when
    None) before it joins (see [Note: trust boundary] in runtime.trust); a process that
    fails to prove it ends the run with ``AuthenticationError``.
    """
    supervisor = Supervisor(config.timeout_s, token, expected=world + 1)
    names = list(devices) if devices is not None else [str(r) for r in range(world)]
    try:
        procs = [supervisor.start(f"rank{rank}", rank, world, source, config,
                                  None if cgroups is None else cgroups[rank], body=body)
                 for rank in range(world)]
        store = supervisor.store
        watched = supervisor.watch(procs, names, progress=progress, timeout_s=timeout_s,
                                   may_fail=may_fail,
                                   on_lost=None if on_lost is None else
                                   (lambda r: on_lost(r, store)))
    finally:
        supervisor.close()     # every child that still runs is killed at once
    return [watched.done[r] for r in range(world) if r in watched.done]


def emulate(source: StageSource, cluster: Any, config: TrainConfig, *,
            progress: Callable[[Mapping[str, Any]], None] | None = None,
            timeout_s: float = 600.0, host_cores: float | None = None,
            host_flops: float | None = None, use_cgroups: bool | None = None,
            token: str | None = None,
            body: Callable[..., WorkerResult] = train_device,
            may_fail: Sequence[int] = (),
            on_lost: Callable[[int, Any], None] | None = None) -> EmulationResult:
    """Train ``source`` on an emulated ``cluster`` (see [Note: emulated speed]); the
    device processes join with ``token`` (a fresh one when None)."""
    plan = source.load_plan()
    cluster = emulated_cluster(cluster)
    for line in memory_warnings(plan, cluster):
        log.warning("%s", line)
    setup = emulation_setup(plan, cluster, host_cores=host_cores, host_flops=host_flops)
    for line in slow_warnings(setup):
        log.warning("%s", line)
    shaping = choose_shaping(setup.effective_speeds, use_cgroups=cgroup_available()
                             if use_cgroups is None else use_cgroups)
    if setup.factor > 1.0:
        log.warning("device speeds add up to %.2f cores but the emulator may use %.2f of this "
                    "host's: every device and link is slowed by a common factor %.2f",
                    sum(setup.speeds),
                    setup.host_cores, setup.factor)
    started = time.perf_counter()
    try:
        workers = _launch_shaped(source, config, setup, shaping, progress, timeout_s, token,
                                 body, may_fail, on_lost)
    finally:
        remove_cgroups(shaping.made)
    return EmulationResult(workers=workers, setup=setup, shaping=shaping.kind,
                           wall_s=time.perf_counter() - started)


def _launch_shaped(source: StageSource, config: TrainConfig, setup: EmulationSetup,
                   shaping: Shaping, progress: Callable[[Mapping[str, Any]], None] | None,
                   timeout_s: float, token: str | None = None,
                   body: Callable[..., WorkerResult] = train_device,
                   may_fail: Sequence[int] = (),
                   on_lost: Callable[[int, Any], None] | None = None) -> list[WorkerResult]:
    config = replace(config, **setup.links, **setup.storage, **setup.timing(config))
    # time dilation needs a per-rank compute scale: the source carries one per rank
    return launch_local(shaping.wrap(source), len(setup.devices), config,
                        cgroups=shaping.cgroups, progress=progress, timeout_s=timeout_s,
                        devices=setup.devices, token=token, body=body,
                        may_fail=may_fail, on_lost=on_lost)
