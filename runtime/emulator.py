"""Local emulation of a cluster: one process per device, speed and bandwidth shaped."""

from __future__ import annotations

import logging
import math
import multiprocessing.connection
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from contracts.allocator import tune_allocator
from contracts.errors import RuntimeFailure, StageFailure
from contracts.plan import Plan
from runtime import protocol as proto
from runtime.comm import CommFailure
from runtime.shaping import (
    CGROUP_ROOT,
    Shaping,
    cfs_settings,
    cgroup_available,
    choose_shaping,
    remove_cgroups,
)
from runtime.train import DirectorySource, StageSource, TrainConfig, WorkerResult, train_device
from runtime.trust import Gatekeeper, join_job, new_token

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


def emulation_setup(plan: Plan, cluster: Any, *, host_cores: float | None = None,
                    host_flops: float | None = None) -> EmulationSetup:
    """Speeds and bandwidths of the plan's devices in ``cluster`` (a ``contracts.cluster.Cluster``
    or a path to cluster.yaml). Devices given by FLOP/s only (Jetson types) are scaled to
    ``host_flops``; without it the fastest such device counts as one host core."""
    if isinstance(cluster, (str, Path)):
        from contracts.cluster import Cluster  # host-side only: a device never emulates

        cluster = Cluster.from_yaml(cluster)
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
    return EmulationSetup(devices=tuple(plan.devices), speeds=speeds, factor=factor,
                          link_bytes_s=links, host_cores=cores, link_latency_s=latency)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a launcher's store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_main(rank: int, world: int, port: int, source: StageSource, config: TrainConfig,
                cgroup: str | None, results: Any, recovery: Any = None, token: str = "",
                body: Callable[..., WorkerResult] = train_device) -> None:
    """Body of one device process; reports ("step"|"ok"|"error", rank, payload).

    The process first proves the job's ``token`` on the launcher's store
    (``runtime.trust.join_job``) and then uses only the job's prefixed store; a finished
    rank's result travels as ``runtime.protocol.encode_result`` bytes.

    With ``recovery`` (a ``runtime.replication.WorkerSpec``) the process beats,
    checkpoints and replicates through its hooks and joins the process group of its
    generation; when a round fails it reports ("interrupted", (generation, rank), ...),
    hands its state over, and (replay) waits for its place in the next generation. When a
    device leaves gracefully (SIGTERM) every rank reports ("left", (generation, rank), step)
    after that committed step and does the same."""
    hooks: Any = None
    try:
        _exit_with_parent()
        torch.set_num_threads(1)
        tune_allocator()
        client = dist.TCPStore("127.0.0.1", port, world, is_master=False,
                               timeout=timedelta(seconds=config.timeout_s))
        store = join_job(client, token, rank, timeout_s=config.timeout_s,
                         where=f"the launcher at 127.0.0.1:{port}")
        if recovery is not None and recovery.mode == "replay":
            from runtime.replication import install_leave_handler

            install_leave_handler()   # SIGTERM: leave gracefully after the current round
        while True:
            if cgroup is not None:
                Path(cgroup, "cgroup.procs").write_text(str(os.getpid()))
            group_store: Any = store
            if recovery is not None:
                hooks = recovery.hooks(store, rank, world)
                group_store = dist.PrefixStore(
                    proto.Keys(recovery.generation).process_group(), store)
            dist.init_process_group("gloo", store=group_store, rank=rank, world_size=world,
                                    timeout=timedelta(seconds=config.timeout_s))
            def report(record: dict[str, Any], r: int = rank) -> None:
                results.put(("step", r, record))

            result: WorkerResult | None = None
            try:
                result = body(source, rank, config, hooks=hooks, report=report)
            except Exception as exc:
                if hooks is None:
                    raise
                results.put(("interrupted", (recovery.generation, rank),
                             (f"{type(exc).__name__}: {exc}", _is_secondary(exc))))
            if result is None or result.ended_after is not None:
                # outside the except block: the traceback (and with it the failed round's
                # process groups) is released, so destroying the group closes its sockets
                # and unblocks peers still waiting on this rank. A graceful leave ends the
                # generation after a committed round: wake the launcher (it reads the marker)
                if result is not None:
                    results.put(("left", (recovery.generation, rank), result.ended_after))
                assignment = hooks.next_generation()
                if assignment is None:
                    _exit_handed_over(results)
                    return
                rank, world = assignment.rank, assignment.world
                source = DirectorySource(assignment.directory)
                config, recovery = assignment.config, assignment.spec
                cgroup = assignment.cgroup
                continue
            results.put(("ok", rank, proto.encode_result(result)))
            dist.barrier()   # nobody tears its sockets down while a peer still reads
            dist.destroy_process_group()
            if hooks is not None:   # replica channels' threads may still be blocked
                hooks.close()
                _exit_handed_over(results)
            return
    except BaseException as exc:  # noqa: BLE001 - reported to the launcher as data
        results.put(("error", rank, (f"{type(exc).__name__}: {exc}", _is_secondary(exc))))
        if hooks is not None:    # threads of replica channels may still run: no teardown
            _exit_handed_over(results, 1)
        raise SystemExit(1) from None


def _exit_handed_over(results: Any, code: int = 0) -> None:
    """End a worker whose work is done and handed over (training finished, or told to exit
    after a failure or a graceful leave) with code 0: flush the result queue and the log,
    then ``os._exit(code)``.
    A normal interpreter exit would destroy torch.distributed objects whose threads (a
    replica channel's send or receive left blocked when the group was shut down) still run,
    which aborts the process ("terminate called without an active exception", code -6)."""
    try:
        results.close()
        results.join_thread()     # every message put so far reaches the launcher
    except (OSError, ValueError, AssertionError) as exc:
        log.debug("flushing the result queue: %s", exc)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _exit_with_parent(interval_s: float = 0.5) -> None:
    """End this worker when the launcher dies (so a killed launcher leaves no orphans)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os._exit(70)

    threading.Thread(target=watch, name="asteroid-fx-parent-watch", daemon=True).start()


_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
              "connection closed")


def _is_secondary(exc: BaseException) -> bool:
    """Whether ``exc`` is only the echo of another rank's failure (a broken link)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, CommFailure) or any(s in str(seen) for s in _PEER_GONE):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class LocalJob:
    """The launcher's side of device processes on this host, shared by ``launch_local``
    (``run --emulate``) and ``runtime.recovery`` (every generation): the job's store on
    127.0.0.1 behind the token gate (see [Note: trust boundary] in runtime.trust), the
    result queue, spawning :func:`worker_main`, and reading the workers' messages."""

    def __init__(self, timeout_s: float, token: str | None = None, *,
                 expected: int = 1) -> None:
        self.port = free_port()
        self._server = dist.TCPStore("127.0.0.1", self.port, expected, is_master=True,
                                     wait_for_workers=False,
                                     timeout=timedelta(seconds=timeout_s))
        self.token = token or new_token()
        self.gate = Gatekeeper(self._server, self.token,
                               where=f"the launcher at 127.0.0.1:{self.port}")
        #: the job's keys (prefixed: see runtime.trust)
        self.store: dist.Store = self.gate.job_store
        self.ctx = mp.get_context("spawn")
        self.results: Any = self.ctx.Queue()

    def spawn(self, rank: int, world: int, source: StageSource, config: TrainConfig,
              cgroup: str | None, *, spec: Any = None, name: str = "",
              body: Callable[..., WorkerResult] = train_device) -> Any:
        """Start one device process (:func:`worker_main`, running ``body``) and return it."""
        proc = self.ctx.Process(target=worker_main, daemon=True,
                                name=f"asteroid-fx-{name or rank}",
                                args=(rank, world, self.port, source, config, cgroup,
                                      self.results, spec, self.token, body))
        proc.start()
        return proc

    def next_message(self, procs: Sequence[Any], done: Collection[int],
                     wait_s: float = 0.02) -> tuple[str, Any, Any]:
        """The next worker message, or ("", -1, None) after ``wait_s`` or as soon as a
        worker process not in ``done`` ends (its sentinel wakes the wait: a kill is seen
        at once)."""
        try:
            message: tuple[str, Any, Any] = self.results.get_nowait()
            return message
        except queue.Empty:
            pass
        reader = getattr(self.results, "_reader", None)
        handles = [p.sentinel for r, p in enumerate(procs) if r not in done]
        multiprocessing.connection.wait(handles + ([reader] if reader is not None else []),
                                        wait_s)
        try:
            message = self.results.get_nowait()
            return message
        except queue.Empty:
            return "", -1, None

    def close(self) -> None:
        """Close the result queue and stop the token gate (the processes are the
        caller's to end first)."""
        self.results.close()
        self.gate.stop()


def launch_local(source: StageSource, world: int, config: TrainConfig, *,
                 cgroups: Sequence[str] | None = None,
                 progress: Callable[[Mapping[str, Any]], None] | None = None,
                 timeout_s: float = 600.0,
                 devices: Sequence[str] | None = None,
                 token: str | None = None,
                 body: Callable[..., WorkerResult] = train_device,
                 may_fail: Sequence[int] = ()) -> list[WorkerResult]:
    """Run ``world`` device processes on this host (gloo, TCPStore rendezvous on 127.0.0.1).

    Each process runs ``body(source, rank, config, hooks=None, report=...)`` (default
    ``runtime.train.train_device``; PAC fine-tuning passes ``runtime.pac_train``'s).
    Ranks in ``may_fail`` may die without ending the run (a body that recovers by itself,
    as PAC's phase 2 does); the results then leave them out.

    The first worker that raises or dies ends the run: every other child is killed at once
    and ``StageFailure`` carries the first error (rank, step, action). Never hangs: the
    whole run is bounded by ``timeout_s``. Each worker proves ``token`` (a fresh one when
    None) before it joins (see [Note: trust boundary] in runtime.trust); a process that
    fails to prove it ends the run with ``AuthenticationError``.
    """
    job = LocalJob(config.timeout_s, token, expected=world + 1)
    gate, results = job.gate, job.results
    procs = [job.spawn(rank, world, source, config,
                       None if cgroups is None else cgroups[rank], name=f"rank{rank}",
                       body=body)
             for rank in range(world)]
    names = list(devices) if devices is not None else [str(r) for r in range(world)]
    done: dict[int, WorkerResult] = {}
    failures: list[tuple[int, str]] = []      # (priority, message): 0 root cause, 1 echo
    reported: set[int] = set()
    grace_until: float | None = None
    dead_since: dict[int, float] = {}
    deadline = time.monotonic() + timeout_s
    lost: set[int] = set()
    try:
        while len(done) + len(lost) < world:
            gate.raise_if_refused()
            now = time.monotonic()
            if grace_until is not None and now > grace_until:
                break
            if now > deadline:
                failures.append((0, f"the run did not finish within {timeout_s:.0f} s"))
                break
            try:
                kind, rank, payload = results.get(timeout=0.05)
            except queue.Empty:
                for r, proc in enumerate(procs):
                    if r in done or r in reported or proc.is_alive():
                        continue
                    if r in may_fail:
                        reported.add(r)
                        lost.add(r)
                        continue
                    first_seen = dead_since.setdefault(r, time.monotonic())
                    if time.monotonic() - first_seen > 0.5:   # its last words had time to arrive
                        reported.add(r)
                        failures.append((0, f"rank {r} (device {names[r]!r}) died with exit "
                                            f"code {proc.exitcode} before reporting"))
                        if grace_until is None:
                            grace_until = time.monotonic() + 0.5
                continue
            if kind == "step":
                if progress is not None:
                    progress(payload)
            elif kind == "ok":
                done[rank] = proto.decode_result(payload, f"the result of rank {rank}")
            else:
                message, secondary = payload
                reported.add(rank)
                failures.append((1 if secondary else 0,
                                 f"rank {rank} (device {names[rank]!r}): {message}"))
                if grace_until is None:   # collect the root cause, not its echoes
                    grace_until = time.monotonic() + 1.0
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join(timeout=10)
        job.close()
    if failures or len(done) + len(lost) < world:
        raise StageFailure(min(failures, key=lambda f: f[0])[1] if failures else
                           "a worker stopped without reporting")
    return [done[r] for r in range(world) if r in done]


def emulate(source: StageSource, cluster: Any, config: TrainConfig, *,
            progress: Callable[[Mapping[str, Any]], None] | None = None,
            timeout_s: float = 600.0, host_cores: float | None = None,
            host_flops: float | None = None, use_cgroups: bool | None = None,
            token: str | None = None,
            body: Callable[..., WorkerResult] = train_device,
            may_fail: Sequence[int] = ()) -> EmulationResult:
    """Train ``source`` on an emulated ``cluster`` (see [Note: emulated speed]); the
    device processes join with ``token`` (a fresh one when None)."""
    plan = source.load_plan()
    setup = emulation_setup(plan, cluster, host_cores=host_cores, host_flops=host_flops)
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
                                 body, may_fail)
    finally:
        remove_cgroups(shaping.made)
    return EmulationResult(workers=workers, setup=setup, shaping=shaping.kind,
                           wall_s=time.perf_counter() - started)


def _launch_shaped(source: StageSource, config: TrainConfig, setup: EmulationSetup,
                   shaping: Shaping, progress: Callable[[Mapping[str, Any]], None] | None,
                   timeout_s: float, token: str | None = None,
                   body: Callable[..., WorkerResult] = train_device,
                   may_fail: Sequence[int] = ()) -> list[WorkerResult]:
    config = replace(config, **setup.links, **setup.timing(config))
    # time dilation needs a per-rank compute scale: the source carries one per rank
    return launch_local(shaping.wrap(source), len(setup.devices), config,
                        cgroups=shaping.cgroups, progress=progress, timeout_s=timeout_s,
                        devices=setup.devices, token=token, body=body,
                        may_fail=may_fail)
