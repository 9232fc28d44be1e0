"""Worker side of fault tolerance: heartbeats, checkpoints, replicas, failure injection."""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import signal
import socket
import statistics
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from contracts.errors import ProtocolError, RuntimeFailure
from contracts.plan import Plan
from runtime import protocol as proto
from runtime.checkpoint import (
    StageState,
    StateBuffer,
    apply_state,
    checkpoint_file,
    header_names,
    join_state,
    state_from_bytes,
    state_to_bytes,
    write_checkpoint_bytes,
)
from runtime.faults import fault_point
from runtime.heartbeat import Heartbeat

__all__ = [
    "WorkerSpec",
    "WorkerHooks",
    "ReplicationStats",
    "external_holders",
    "announce_failure",
    "lower_priority",
    "abort_connections",
    "install_leave_handler",
    "leave_requested_at",
]

log = logging.getLogger(__name__)

# [Note: replication off the critical path]
# After its optimizer step of round k every rank copies its stage state into a
# preallocated flat buffer (runtime.checkpoint.StateBuffer: one ``copy_`` per tensor, no
# allocation, no pickling) -- that is all the training thread does. A background thread
# ("asteroid-fx-replicate", scheduled SCHED_IDLE like the holders' receive threads and
# the gloo I/O threads they create, so replication only uses CPU time that training leaves
# idle: pipeline bubbles and waits) then, on the first device of a stage that has holders outside
# its group, sends that buffer (every ``replicate_every``-th step) to each holder over a
# two-rank gloo group of their own (``_Channel``: built by the two ends through a
# PrefixStore of the c10d store, so it is no collective of the training group and the
# store carries no replica bytes), and every ``checkpoint_every``-th step writes the disk
# checkpoint from the same buffer. Each holder's receive thread keeps the three newest
# replicas of the stage in its memory.
#
# Emulation: the emulator passes its link bandwidths (``WorkerSpec.link_bytes_s``) and every
# replica send then lasts at least bytes / bandwidth (a sleep in the background thread), as
# the activations' sends do, so a period K that the link cannot carry shows up as the
# training thread waiting for the previous push, not as free traffic over loopback. The
# pacing is per channel: replica traffic does not delay activations on a shared link.
#
# Lag and roll-back: before taking the snapshot of round k the training thread waits until
# the background job of round k-1 is done (it had a whole round; normally no wait), so
# replication is at most one step behind. Every rank keeps its own snapshots of the last two
# committed steps; with replicate_every > 1 it snapshots only the replicated steps (and
# those written to disk), so the training thread copies once per K steps. On a
# failure the launcher resumes from the newest step r for which every stage has a state (a
# survivor's own snapshot or a replica held by a survivor); survivors roll back to r and the
# rounds after r are replayed with the same seeded batches, so no optimizer step is missing
# from the result and the losses equal single-process training. ``lost_steps`` (committed
# steps trained again) is 0 when r is the last committed step, which is the case unless the
# failure hits the short window between a commit and the end of that step's background
# send (or replicate_every > 1).
#
# Hand-over on failure (``rx/<g>/recover`` names the failed ranks): every survivor's
# watcher thread publishes ``rx/<g>/handoff/<rank>``: which own steps it keeps, the names of
# its state and which replicas it holds (a replica of a lost stage still arriving is first
# completed). No state moves then: survivors keep their own state and replicas in memory,
# and the launcher's per-device manifest (``rx/<g+1>/restore/<device>``) says which parts a
# process takes from its own memory and which from store keys that the survivor holding them
# fills on request (``rx/<g>/want/<rank>/<n>``, answered by the watcher). The watcher also
# shuts the old process group's TCP connections down (``abort_connections``): gloo cannot
# abort a pending receive, and a destroyed group does not always close its sockets, so
# without this a survivor waiting on another survivor could stay blocked in the failed round.

#: device -> its hooks in this process: a survivor's own snapshots outlive its generation
_PROCESS: dict[str, Any] = {}
#: seconds the training thread waits at most for the previous round's background job
BACKGROUND_WAIT_S = 60.0
#: seconds a survivor waits at most to answer the launcher's requests before moving on
REQUESTS_WAIT_S = 30.0
#: seconds a device that leaves gracefully waits at most for the launcher's answer (its
#: ``exit``) after handing over, before it exits anyway
LEAVE_WAIT_S = 60.0
#: seconds a rank's watcher waits, after a device left, for the training thread's hand-over
LEAVE_HANDOFF_S = 5.0
#: every this many rounds a rank publishes its median compute per micro-batch (the
#: launcher's calibration after a failure, see solver.calibrate)
TIMING_EVERY = 4
#: rounds the published median covers (the newest)
TIMING_WINDOW = 32

# [Note: graceful leave]
# A device asked to leave (SIGTERM: ``--leave DEVICE@STEP``, or a scheduler taking the board
# back) must cost no roll-back. The handler (``install_leave_handler``, worker processes in
# replay mode) only records the time. At the end of each round the training thread adds
# "this rank leaves" to the all-reduce of the loss, so every rank learns in that same
# collective that round k is the last one of this generation: no rank starts round k + 1.
# After committing k every rank keeps its own snapshot of k (from the live state, which
# nothing changes after the commit; also with replicate_every > 1, where step k may have had
# no snapshot) and publishes its hand-over at once; the leaver also writes
# ``rx/<g>/left/<rank>`` ({"step", "at", "signal_at"}) and bumps ``rx/<g>/left/count``.
# Then every rank leaves the group and waits for its next assignment, as after a failure.
# The launcher sees the marker (polled every supervision tick, <= 20 ms), re-plans without
# the leaver and restores its layers from its hand-over: the leaver serves the requests for
# parts of its state like any survivor, then gets ``exit`` and ends with code 0. Training
# resumes at k + 1 (lost_steps 0, nothing replayed). A SIGTERM during the last step, or in
# a round that fails, takes effect after the next committed round that is not the last.


class _LeaveFlag:
    """Set by the SIGTERM handler (which must do nothing more than that)."""

    requested_at: float | None = None


_LEAVE = _LeaveFlag()


def _on_leave_signal(signum: int, frame: FrameType | None) -> None:
    if _LEAVE.requested_at is None:
        _LEAVE.requested_at = time.time()


def install_leave_handler() -> bool:
    """In a worker process (main thread only): SIGTERM asks this device to leave gracefully
    after the round it is in (see [Note: graceful leave]) instead of ending the process.
    Returns whether the handler was installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _on_leave_signal)
    # blocking system calls of other threads (gloo, store) restart instead of failing (EINTR)
    signal.siginterrupt(signal.SIGTERM, False)
    return True


def leave_requested_at() -> float | None:
    """``time.time()`` of the SIGTERM that asked this process to leave; None when none."""
    return _LEAVE.requested_at


def announce_failure(store: dist.Store, generation: int, failed: Collection[int],
                     world: int) -> None:
    """Tell every rank of ``generation`` that ``failed`` ranks are lost: sets
    ``rx/<g>/recover`` and wakes each rank's hand-over watcher (which blocks on its own
    ``rx/<g>/wake/<rank>`` key instead of polling the store)."""
    keys = proto.Keys(generation)
    proto.put(store, keys.recover(), proto.RecoverNotice(tuple(sorted(failed))))
    for rank in range(world):
        proto.put(store, keys.wake(rank), proto.Wake("recover"))


def lower_priority() -> bool:
    """Run the calling thread, and threads it creates later (a gloo group's I/O threads
    among them), only when the process has nothing else to run: ``SCHED_IDLE`` on Linux,
    else nice 19. Returns whether the change took effect."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread
        return True
    except (AttributeError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        return True
    except (AttributeError, OSError) as exc:
        log.debug("cannot lower the priority of the replication thread: %s", exc)
        return False


def external_holders(plan: Plan, replicas: Mapping[str, tuple[str, ...]]
                     ) -> dict[int, tuple[str, ...]]:
    """Per stage, the holders (from ``replicas``) that are not members of that stage."""
    out: dict[int, tuple[str, ...]] = {}
    for index, stage in enumerate(plan.stages):
        holders: list[str] = []
        for dev in stage.devices:
            for h in replicas.get(dev, ()):
                if h not in stage.devices and h not in holders and h in plan.devices:
                    holders.append(h)
        out[index] = tuple(holders)
    return out


def abort_connections(store_port: int, only_ports: Collection[int] | None = None) -> int:
    """Shut down every established TCP connection of this process except those to the
    c10d store on ``store_port`` (i.e. the process groups' gloo connections), so that any
    pending send/receive on them fails at once; with ``only_ports``, only connections with
    one of those local or remote ports. Linux only (reads /proc); returns how many
    connections were shut down (0 elsewhere)."""
    sockets: dict[str, tuple[int, int]] = {}
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as fh:
                rows = fh.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "01":      # ESTABLISHED
                local = int(cols[1].rsplit(":", 1)[1], 16)
                remote = int(cols[2].rsplit(":", 1)[1], 16)
                sockets[cols[9]] = (local, remote)
    if not sockets:
        return 0
    count = 0
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return 0
    for fd in fds:
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        ports = sockets.get(link[8:-1]) if link.startswith("socket:[") else None
        if ports is None or store_port in ports:
            continue
        if only_ports is not None and not set(ports) & set(only_ports):
            continue
        try:
            with socket.socket(fileno=os.dup(int(fd))) as sock:
                sock.shutdown(socket.SHUT_RDWR)
            count += 1
        except OSError:
            continue
    return count


@dataclass
class ReplicationStats:
    """Seconds spent on the side work (this rank): training thread and background."""

    snapshot_s: list[float] = field(default_factory=list)     # training thread: copy
    wait_s: list[float] = field(default_factory=list)         # training thread: back-pressure
    serialize_s: list[float] = field(default_factory=list)    # background
    checkpoint_s: list[float] = field(default_factory=list)   # background (sync in restart)
    replicate_s: list[float] = field(default_factory=list)    # background: send to holder
    fetch_s: list[float] = field(default_factory=list)        # holder: receiving
    process_cpu_s: float = 0.0      # CPU time of the whole process (all threads) ...
    steps: int = 0                  # ... over this many steps
    bytes_sent: int = 0
    paced_s: float = 0.0      # emulation: sleeping to the emulated link's bandwidth

    def summary(self) -> dict[str, float]:
        """Milliseconds of each kind of work and bytes sent, per training step (averaged
        over all ``steps``, also those without a snapshot or replica)."""
        steps = max(1, self.steps or len(self.snapshot_s))

        def per_step_ms(values: list[float]) -> float:
            return 1e3 * sum(values) / steps

        return {"snapshot_ms": per_step_ms(self.snapshot_s), "wait_ms": per_step_ms(self.wait_s),
                "send_ms": per_step_ms(self.replicate_s), "receive_ms": per_step_ms(self.fetch_s),
                "checkpoint_ms": per_step_ms(self.checkpoint_s),
                "bytes_sent_per_step": self.bytes_sent / steps, "bytes_sent": self.bytes_sent,
                "process_cpu_ms": 1e3 * self.process_cpu_s / steps,
                "paced_ms": 1e3 * self.paced_s / steps,
                "snapshots": len(self.snapshot_s), "steps": steps}


@dataclass(frozen=True)
class WorkerSpec:
    """What a device process of one generation needs for fault tolerance (plain data: it
    travels as JSON in a ``runtime.protocol.Assignment``)."""

    generation: int
    mode: str                                       # "replay" or "restart"
    plan_version: int
    devices: tuple[str, ...]                        # per rank
    stages: tuple[int, ...]                         # stage index per rank
    holders: Mapping[int, tuple[str, ...]]          # stage -> external holder devices
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1
    replicate: bool = True
    replicate_every: int = 1
    steps: int | None = None                        # training ends after step steps - 1
    restore: bool = False                           # manifest rx/<g>/restore/<device>
    fail_at: Mapping[str, int] = field(default_factory=dict)   # device -> step
    fail_signal: int = int(signal.SIGKILL)
    #: device -> step: SIGTERM (graceful leave, see [Note: graceful leave]) during that step
    leave_at: Mapping[str, int] = field(default_factory=dict)
    metrics: str | None = None
    event: Mapping[str, Any] | None = None          # recovery event to complete and log
    heartbeat_interval_s: float = 0.2
    heartbeat_timeout_s: float = 1.0
    #: emulated bandwidth (bytes/s) between ranks, set by the emulator: replica sends are
    #: paced to it like activations (see [Note: replication off the critical path])
    link_bytes_s: tuple[tuple[float, ...], ...] | None = None
    #: and the emulated one-way latency (seconds) of each of those links
    link_latency_s: tuple[tuple[float, ...], ...] | None = None

    def hooks(self, store: dist.Store, rank: int, world: int) -> WorkerHooks:
        """The hooks of ``rank`` (starts its heartbeat and, in replay mode, its threads)."""
        return WorkerHooks(self, store, rank, world)

    @property
    def steps_end(self) -> int:
        """The last step (-2 when unknown)."""
        return -2 if self.steps is None else self.steps - 1

    def replicates(self, step: int) -> bool:
        """Whether the state after ``step`` is replicated (every ``replicate_every``-th)."""
        return (step + 1) % self.replicate_every == 0


class _Slot:
    """One snapshot buffer and whether its background job is finished."""

    def __init__(self) -> None:
        self.buffer = StateBuffer()
        self.idle = threading.Event()
        self.idle.set()


#: marks the end of a replica stream (the sender's last step is done)
_END = -1000
#: timeout of a replication channel (its waits are ended by ``abort_connections`` on a
#: failure, never by the timeout: a timed-out gloo wait would close the channel)
CHANNEL_TIMEOUT = timedelta(hours=12)


@dataclass
class _Replica:
    """A stage state received from its sender: flat-format header and buffer."""

    step: int
    header: bytes
    flat: torch.Tensor

    def to_bytes(self) -> bytes:
        return join_state(self.header, self.flat)


class _Channel:
    """A two-rank gloo group between a stage's sender (rank 0) and one holder (rank 1),
    created by both ends through the store (no collective over the training group).
    One replica = three messages: int64 [step, buffer bytes, header bytes], the JSON
    header, the flat buffer (sent from the snapshot itself: no serialisation)."""

    def __init__(self, store: dist.Store, prefix: str, rank: int) -> None:
        # (send/recv exist on the object but not in torch's type stubs)
        self.pg: Any = dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, 2,
                                             CHANNEL_TIMEOUT)
        self.peer = 1 - rank

    def send(self, step: int, header: bytes, flat: torch.Tensor) -> None:
        meta = torch.tensor([step, flat.numel(), len(header)], dtype=torch.int64)
        self.pg.send([meta], self.peer, 0).wait()
        if header:
            self.pg.send([torch.frombuffer(bytearray(header), dtype=torch.uint8)],
                         self.peer, 1).wait()
        if flat.numel():
            self.pg.send([flat], self.peer, 2).wait()


class WorkerHooks:
    """``runtime.train.TrainHooks`` of one rank (see [Note: replication off the critical
    path])."""

    def __init__(self, spec: WorkerSpec, store: dist.Store, rank: int, world: int) -> None:
        self.created_at = time.time()
        self.device = spec.devices[rank]
        previous: WorkerHooks | None = _PROCESS.get(self.device)
        if previous is not None:
            previous.close()
        _PROCESS[self.device] = self
        self.spec = spec
        self.store = store
        self.keys = proto.Keys(spec.generation)
        self.rank = rank
        self.stage = spec.stages[rank]
        self.first_of_stage = spec.stages.index(self.stage) == rank
        self.held_stages = tuple(s for s, hs in spec.holders.items() if self.device in hs)
        self.replay = spec.mode == "replay"
        self.sends = (self.replay and spec.replicate and self.first_of_stage
                      and bool(spec.holders.get(self.stage)))
        self.stats = ReplicationStats()
        self._slots: list[_Slot] = [] if previous is None else previous._slots
        self._previous_current: dict[int, _Slot] = ({} if previous is None
                                                    else dict(previous._current))
        self._previous_committed = [] if previous is None else list(previous._committed)
        self._previous_held: dict[int, dict[int, _Replica]] = ({} if previous is None
                                                                else previous._held)
        self._committed: list[int] = []
        self._compute: list[tuple[float, float]] = []   # (forward, backward) per round
        self._replicated: list[int] = []       # committed steps whose state was replicated
        self._current: dict[int, _Slot] = {}    # step -> slot (this generation)
        self._last_job: tuple[_Slot, int] | None = None   # newest background job
        self._held: dict[int, dict[int, _Replica]] = {s: {} for s in self.held_stages}
        self._receiving: set[int] = set()       # held stages with a replica half received
        self._lock = threading.Lock()
        self._handed = False
        self._left = False
        self._leaving = False                   # this device leaves (graceful, SIGTERM)
        self._closed = threading.Event()
        self._served = 0                        # requests answered by the watcher
        self._serve_until = 0                   # requests announced by the launcher
        self._previous = previous
        if previous is not None:
            previous._previous = None           # keep one generation back, not a chain
        self._times: dict[str, float] = {"hooks": self.created_at}
        self._cpu_began = time.process_time()
        self.heartbeat = Heartbeat(store, rank, world, generation=spec.generation,
                                   interval_s=spec.heartbeat_interval_s,
                                   timeout_s=spec.heartbeat_timeout_s)
        self._jobs: queue.Queue[tuple[_Slot, int, bool, bool] | None] = queue.Queue()
        self._side_store = proto.clone_store(store)
        threading.Thread(target=self._background, name="asteroid-fx-replicate",
                         daemon=True).start()
        if self.replay:
            self._watch_store = proto.clone_store(store)
            threading.Thread(target=self._watch, name="asteroid-fx-handoff",
                             daemon=True).start()
            if spec.replicate:
                for stage in self.held_stages:
                    threading.Thread(target=self._receive, args=(stage,), daemon=True,
                                     name=f"asteroid-fx-receive-{stage}").start()

    # -- snapshots ---------------------------------------------------------------------------
    def _keep(self) -> set[int]:
        return set(self._committed[-2:]) | set(self._replicated[-2:])

    def _acquire(self) -> _Slot:
        keep = self._keep()
        busy = {id(s) for st, s in self._current.items() if st in keep}
        if self._previous is not None and self._previous.serving():
            # the previous generation's watcher may still read these snapshots
            busy |= {id(s) for s in self._previous_current.values()}
        for slot in self._slots:
            if id(slot) not in busy and slot.idle.is_set():
                with self._lock:
                    for st in [st for st, s in self._current.items() if s is slot]:
                        del self._current[st]
                return slot
        slot = _Slot()
        self._slots.append(slot)
        return slot

    def _snapshot(self, step: int, module: torch.nn.Module,
                  optimizer: torch.optim.Optimizer) -> _Slot:
        began = time.perf_counter()
        slot = self._acquire()
        slot.buffer.capture(module, optimizer, step)
        with self._lock:
            self._current[step] = slot
        self.stats.snapshot_s.append(time.perf_counter() - began)
        return slot

    def own_steps(self) -> list[int]:
        """Committed steps of which this rank still holds its own snapshot."""
        with self._lock:
            last = self._committed[-1] if self._committed else -2
            return sorted(st for st in self._current if st <= last)

    def own_state(self, step: int, names: list[str] | None = None) -> StageState:
        """This rank's own snapshot of committed ``step`` (views; copy before the next step)."""
        return self._current[step].buffer.state(names)

    # -- TrainHooks ------------------------------------------------------------------------
    def restore(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                stage_index: int) -> None:
        spec = self.spec
        self._times["restore"] = time.time()
        self._cpu_began = time.process_time()
        if spec.restore:
            apply_state(module, optimizer, self._gather(proto.get(
                self.store, self.keys.restore(self.device), proto.Manifest)))
        start = self._start_step() - 1
        if self.replay:
            slot = self._snapshot(start, module, optimizer)
            self._committed.append(start)
            if spec.replicates(start) or spec.generation > 0:
                self._replicated.append(start)
            if self.sends and start >= 0:
                slot.idle.clear()
                self._last_job = (slot, start)
                self._jobs.put((slot, start, True, False))
        self._times["restored"] = time.time()
        proto.put(self.store, self.keys.times(self.rank), proto.StartTimes(
            hooks=self._times["hooks"], restore=self._times["restore"],
            restored=self._times["restored"]))

    def _gather(self, manifest: proto.Manifest) -> StageState:
        """The state this rank restores: parts from its own snapshot or a replica it held
        in the previous generation (no transfer), the rest from store keys."""
        step = manifest.step
        out = StageState(step=step)
        for part in manifest.parts:
            names = list(part.names)
            if part.own is not None:
                state = self._previous_own(step, names)
            elif part.held is not None:
                held = self._previous_held.get(part.held, {}).get(step)
                if held is None:
                    raise RuntimeFailure(f"rank {self.rank} ({self.device}) holds no replica "
                                         f"of stage {part.held} at step {step} to restore")
                state = state_from_bytes(held.to_bytes())
            else:
                name = str(part.key)
                state = state_from_bytes(proto.get_bytes(self.store, name),
                                         where=f"store key {name!r}")
            for name in names:
                out.model[name] = state.model[name]
                if name in state.optim:
                    out.optim[name] = state.optim[name]
        return out

    def _previous_own(self, step: int, names: list[str]) -> StageState:
        slot = self._previous_current.get(step)
        if slot is not None and step <= max(self._previous_committed, default=-2):
            return slot.buffer.state(names)
        raise RuntimeFailure(f"rank {self.rank} ({self.device}) has no own snapshot of step "
                             f"{step} to restore {names[:3]}...")

    def _publish_timing(self) -> None:
        """``rx/<g>/compute/<rank>``: median forward and backward seconds per micro-batch
        over the newest rounds (as measured: emulated time)."""
        del self._compute[:-TIMING_WINDOW]
        fwd = statistics.median(f for f, _ in self._compute)
        bwd = statistics.median(b for _, b in self._compute)
        proto.put(self.store, self.keys.compute(self.rank),
                  proto.ComputeTiming(forward_s=fwd, backward_s=bwd, rounds=len(self._compute)))

    def _start_step(self) -> int:
        event = self.spec.event or {}
        return int(event.get("resume_step", 0))

    def round_started(self, step: int) -> None:
        event = self.spec.event
        if event is not None and self.rank == 0 and step == self._start_step():
            self._log_event(event)
        fail = self.spec.fail_at.get(self.device)
        if fail is not None and fail == step:
            # injected failures hit after this device's replica of the previous step is out
            # (the send overlaps the round; a real failure inside that window re-trains one
            # round, lost_steps 1): tests and benchmarks then see one defined outcome
            self._wait_last_job()
            proto.put(self.store, self.keys.killed_at(), proto.KilledAt(time.time()))
            log.warning("device %s (rank %d) sends itself signal %d during step %d",
                        self.device, self.rank, self.spec.fail_signal, step)
            os.kill(os.getpid(), self.spec.fail_signal)
        leave = self.spec.leave_at.get(self.device)
        if leave is not None and leave == step and _LEAVE.requested_at is None:
            log.warning("device %s (rank %d) sends itself SIGTERM during step %d (graceful "
                        "leave)", self.device, self.rank, step)
            os.kill(os.getpid(), signal.SIGTERM)

    def _wait_last_job(self) -> None:
        """Wait (at most ``BACKGROUND_WAIT_S``) until the newest background job is done."""
        last = self._last_job
        if last is not None and not last[0].idle.wait(BACKGROUND_WAIT_S):
            log.warning("rank %d: replication of step %d is still running after %.0f s",
                        self.rank, last[1], BACKGROUND_WAIT_S)

    def _log_event(self, event: Mapping[str, Any]) -> None:
        now = time.time()
        record = dict(event)
        total = now - float(record.pop("killed_at"))
        spawn = float(record.pop("spawn_at", now))
        record["total_s"] = total
        record["restore_s"] = max(0.0, total - record["detect_s"] - record["replan_s"])
        record["start_s"] = now - spawn
        record["resumed_at"] = now     # wall clock of the new generation's first round
        # where start_s goes: hand-off -> hooks of every rank created (process start or
        # assignment), -> restore() entered (process group, model file, stage module),
        # -> state applied, -> first round (barrier); each the slowest rank
        times = [t for t in (proto.get_if_present(self.store, self.keys.times(r),
                                                  proto.StartTimes)
                             for r in range(len(self.spec.devices))) if t is not None]
        if times:
            hooks = max(t.hooks for t in times)
            entered = max(t.restore for t in times)
            restored = max(t.restored for t in times)
            record["start_parts_s"] = {"hooks": hooks - spawn, "load_stage": entered - hooks,
                                       "apply_state": restored - entered,
                                       "first_barrier": now - restored}
        proto.put(self.store, self.keys.event(), proto.RecoveryEvent(record))
        if self.spec.metrics:
            with Path(self.spec.metrics).open("a") as fh:
                fh.write(json.dumps(record) + "\n")

    def step_done(self, step: int, module: torch.nn.Module,
                  optimizer: torch.optim.Optimizer) -> None:
        spec = self.spec
        writes = (spec.checkpoint_dir is not None and self.first_of_stage
                  and (step + 1) % spec.checkpoint_every == 0)
        if not (writes or self.replay):
            return
        if not self.replay:   # restart baseline: the checkpoint is written synchronously
            slot = self._snapshot(step, module, optimizer)
            self._write_checkpoint(slot.buffer.to_bytes(), step)
            return
        send = self.sends and spec.replicates(step)
        last = self.sends and step == spec.steps_end
        # own snapshots only of steps a roll-back can resume from: every step with
        # replicas every step, else the replicated ones (and those written to disk)
        if not (spec.replicate_every == 1 or spec.replicates(step) or writes or last):
            return
        began = time.perf_counter()
        self._wait_last_job()   # bounded lag
        self.stats.wait_s.append(time.perf_counter() - began)
        slot = self._snapshot(step, module, optimizer)
        if send or writes or last:
            slot.idle.clear()
            self._last_job = (slot, step)
            self._jobs.put((slot, step, send, writes))

    def _write_checkpoint(self, data: bytes, step: int) -> None:
        spec = self.spec
        if spec.checkpoint_dir is None:  # only called when checkpoints are on
            return
        began = time.perf_counter()
        write_checkpoint_bytes(spec.checkpoint_dir, step, spec.plan_version, self.stage, data)
        old = checkpoint_file(spec.checkpoint_dir, step - 2 * spec.checkpoint_every,
                              spec.plan_version, self.stage)
        if old.exists():
            old.unlink()
        self.stats.checkpoint_s.append(time.perf_counter() - began)

    def _background(self) -> None:
        """Send replicas and write checkpoints (see the Note)."""
        spec = self.spec
        channels: list[_Channel] = []
        lower_priority()    # before the channels: their gloo I/O threads inherit it
        if self.sends:
            try:
                channels = [_Channel(self._side_store, self.keys.channel(self.stage, holder), 0)
                            for holder in spec.holders[self.stage]]
            except Exception as exc:  # noqa: BLE001 - a holder is gone: no replicas
                log.warning("rank %d: no replication channel to %s: %s", self.rank,
                            list(spec.holders[self.stage]), exc)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            slot, step, send, writes = job
            try:
                if send and channels:
                    fault_point("replica-push", self.device, step)   # tests: runtime.faults
                    began = time.perf_counter()
                    header = slot.buffer.header()
                    for channel, holder in zip(channels, spec.holders[self.stage]):
                        sent = time.perf_counter()
                        channel.send(step, header, slot.buffer.flat)
                        self._pace(holder, slot.buffer.nbytes, sent)
                    self.stats.bytes_sent += len(channels) * slot.buffer.nbytes
                    self.stats.replicate_s.append(time.perf_counter() - began)
                if channels and spec.steps is not None and step == spec.steps - 1:
                    for channel in channels:    # the holders' receive threads end
                        channel.send(_END, b"", torch.zeros(0, dtype=torch.uint8))
                if writes:
                    began = time.perf_counter()
                    data = slot.buffer.to_bytes()
                    self.stats.serialize_s.append(time.perf_counter() - began)
                    self._write_checkpoint(data, step)
            except Exception as exc:  # noqa: BLE001 - a peer or the disk failed: stop sending
                log.debug("rank %d: background work of step %d failed: %s", self.rank, step,
                          exc)
                channels = []
            finally:
                slot.idle.set()

    def _pace(self, holder: str, nbytes: int, began: float) -> None:
        """Emulation: let a replica of ``nbytes`` to ``holder`` take at least as long as
        the emulated link needs for it (a sleep: no CPU)."""
        links, latency = self.spec.link_bytes_s, self.spec.link_latency_s
        if links is None or holder not in self.spec.devices:
            return
        other = self.spec.devices.index(holder)
        bandwidth = links[self.rank][other]
        if bandwidth > 0 and math.isfinite(bandwidth):
            delay = latency[self.rank][other] if latency is not None else 0.0
            left = began + delay + nbytes / bandwidth - time.perf_counter()
            if left > 0 and not self._closed.wait(left):
                self.stats.paced_s += left

    def step_committed(self, step: int, record: dict[str, Any],
                       compute_s: tuple[float, float] | None = None) -> None:
        if compute_s is not None and step > self._start_step():   # the first is warm-up
            self._compute.append(compute_s)
            if len(self._compute) % TIMING_EVERY == 0:
                self._publish_timing()
        with self._lock:
            self._committed.append(step)
            del self._committed[:-4]
            if self.spec.replicates(step):
                self._replicated.append(step)
                del self._replicated[:-4]
        if self.rank == 0:
            proto.put(self.store, self.keys.step(step), proto.StepRecord(record))
        if step == self.spec.steps_end:
            if self.leave_requested():
                log.warning("device %s was asked to leave during the last step %d: training "
                            "ends normally", self.device, step)
            self.stats.process_cpu_s = time.process_time() - self._cpu_began
            self.stats.steps = step + 1 - self._start_step()
            proto.put(self.store, self.keys.stats(self.rank),
                      proto.ReplicationSummary(self.stats.summary()))

    def leave_requested(self) -> bool:
        """Whether this device was asked to leave (SIGTERM, replay mode): the training loop
        then makes the current round the last one of this generation."""
        return self.replay and _LEAVE.requested_at is not None

    def generation_ends(self, step: int, module: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, leaving: bool) -> None:
        """Round ``step`` is committed and a device leaves after it (``leaving``: this one):
        keep this rank's own state of ``step`` (the live state: nothing changed it since the
        commit), publish the hand-over and, on the leaver, the ``rx/<g>/left/<rank>`` marker
        (see [Note: graceful leave]). The caller then leaves the group
        (``next_generation``)."""
        at = time.time()
        with self._lock:
            have = step in self._current
        if not have:
            self._snapshot(step, module, optimizer)
        self.handoff()
        if not leaving:
            log.info("rank %d (%s): a device leaves after step %d; waiting for the next "
                     "generation", self.rank, self.device, step)
            return
        signal_at = _LEAVE.requested_at
        _LEAVE.requested_at = None
        self._leaving = True
        proto.put(self.store, self.keys.left(self.rank), proto.LeftMarker(
            step=step, at=at, signal_at=signal_at, device=self.device))
        self.store.add(self.keys.left_count(), 1)
        log.warning("device %s (rank %d) leaves after committing step %d (SIGTERM %.3f s "
                    "earlier); its state is handed over", self.device, self.rank, step,
                    at - (signal_at or at))

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait for the background jobs (tests, end of training)."""
        deadline = time.monotonic() + timeout_s
        for slot in list(self._slots):
            slot.idle.wait(max(0.0, deadline - time.monotonic()))

    # -- holders -----------------------------------------------------------------------------
    def _receive(self, stage: int) -> None:
        """Holder: receive every replica of ``stage`` into memory (the three newest)."""
        lower_priority()
        try:
            channel = _Channel(proto.clone_store(self.store),
                               self.keys.channel(stage, self.device), 1)
            while not self._closed.is_set():
                meta = torch.zeros(3, dtype=torch.int64)
                channel.pg.recv([meta], 0, 0).wait()
                step, size, length = (int(v) for v in meta.tolist())
                if step == _END:
                    return
                with self._lock:
                    self._receiving.add(stage)
                    held = self._held[stage]
                    old = held.pop(min(held)) if len(held) >= 3 else None
                began = time.perf_counter()
                header = torch.zeros(length, dtype=torch.uint8)
                if length:
                    channel.pg.recv([header], 0, 1).wait()
                flat = old.flat if old is not None and old.flat.numel() == size else \
                    torch.zeros(size, dtype=torch.uint8)
                if size:
                    channel.pg.recv([flat], 0, 2).wait()
                with self._lock:
                    held[step] = _Replica(step, header.numpy().tobytes(), flat)
                    self._receiving.discard(stage)
                self.stats.fetch_s.append(time.perf_counter() - began)
        except Exception as exc:  # noqa: BLE001 - the sender failed or the group was aborted
            log.debug("rank %d: replicas of stage %d end: %s", self.rank, stage, exc)
        finally:
            with self._lock:
                self._receiving.discard(stage)

    # -- failure ---------------------------------------------------------------------------
    def handoff(self, store: dist.Store | None = None) -> None:
        """Publish (once) which own steps this rank keeps and the replicas it holds of the
        stages that lost every device."""
        store = store or self.store
        with self._lock:
            if self._handed:
                return
            self._handed = True
            failed_step = self._committed[-1] + 1 if self._committed else self._start_step()
        fault_point("recovery", self.device, failed_step)   # tests only: runtime.faults
        notice = proto.get_if_present(store, self.keys.recover(), proto.RecoverNotice)
        failed = set() if notice is None else set(notice.failed)
        ranks_of: dict[int, set[int]] = {}
        for r, s in enumerate(self.spec.stages):
            ranks_of.setdefault(s, set()).add(r)
        lost = {s for s in self.held_stages if ranks_of[s] <= failed}
        until = time.monotonic() + 0.5     # a replica still arriving completes (or fails)
        while lost & self._receiving and time.monotonic() < until:
            time.sleep(0.002)
        held_steps: dict[int, tuple[int, ...]] = {}
        held_names: dict[int, tuple[str, ...]] = {}
        for stage in self.held_stages:
            with self._lock:
                have = dict(self._held[stage])
            if have:
                held_steps[stage] = tuple(sorted(have))
                held_names[stage] = tuple(header_names(have[max(have)].header))
        with self._lock:
            current = dict(self._current)
        names = tuple(current[max(current)].buffer.names) if current else ()
        proto.put(store, self.keys.handoff(self.rank), proto.Handoff(
            rank=self.rank, device=self.device, stage=self.stage,
            own_steps=tuple(self.own_steps()), own_names=names, held_steps=held_steps,
            held_names=held_names))

    def _abort(self) -> None:
        with self._lock:
            if self._left:
                return
            count = abort_connections(proto.store_port(self.store))
        log.debug("rank %d shut down %d connection(s) of the failed group", self.rank, count)

    def _watch(self) -> None:
        """Replay: on ``recover`` hand over and abort the old group's connections; then serve
        the launcher's requests for parts of this rank's own state."""
        store = self._watch_store
        try:
            # blocks without polling until the launcher or close() sets the wake key
            store.wait([self.keys.wake(self.rank)], CHANNEL_TIMEOUT)
            if self._closed.is_set() or not store.check([self.keys.recover()]):
                return
            if int(store.add(self.keys.left_count(), 0)) > 0:
                # a graceful leave: the training thread hands over itself once it has
                # committed the leaver's last step (a hand-over from here could come first
                # and miss that step); wait for it, bounded
                until = time.monotonic() + LEAVE_HANDOFF_S
                while (not self._handed and not self._closed.is_set()
                       and time.monotonic() < until):
                    time.sleep(0.002)
                if not self._handed:
                    log.warning("rank %d (%s): a device left, but this rank did not hand over "
                                "within %.0f s; handing over what it has", self.rank,
                                self.device, LEAVE_HANDOFF_S)
            self.handoff(store)
            self._abort()
            until = float("inf")
            # after close(), go on until every request the launcher announced is answered
            while not self._closed.is_set() or (self._served < self._serve_until
                                                 and time.monotonic() < until):
                if self._closed.is_set() and until == float("inf"):
                    until = time.monotonic() + REQUESTS_WAIT_S
                want = self.keys.want(self.rank, self._served)
                request = proto.get_if_present(store, want, proto.StateRequest)
                if request is not None:
                    if not self.keys.is_answer_key(request.to):
                        raise ProtocolError(f"store key {want!r}: a request to write to "
                                            f"{request.to!r}, which is not an answer key")
                    proto.put_bytes(store, request.to, self._answer(request))
                    self._served += 1
                    continue
                time.sleep(0.002)
        except ProtocolError as exc:
            log.error("rank %d (%s) stops serving the launcher: %s", self.rank, self.device,
                      exc)
        except Exception as exc:  # noqa: BLE001 - the launcher went away
            log.debug("rank %d: hand-over watcher ends: %s", self.rank, exc)

    def held_replica(self, stage: int, step: int) -> StageState | None:
        """The replica of ``stage`` after ``step`` that this rank holds, if any."""
        replica = self._held.get(stage, {}).get(step)
        return None if replica is None else state_from_bytes(replica.to_bytes())

    def _answer(self, request: proto.StateRequest) -> bytes:
        """Bytes of a held replica (``request.held``: the stage) or of part of this rank's
        own snapshot (``request.names``; all names when None) of ``request.step``."""
        if request.held is not None:
            return self._held[request.held][request.step].to_bytes()
        names = None if request.names is None else list(request.names)
        return state_to_bytes(self.own_state(request.step, names))

    def next_generation(self, limit_s: float = 600.0) -> proto.Assignment | None:
        """After a failed round: hand over, leave the broken process group and (replay) wait
        for this device's place in the next generation; None: exit.
        In restart mode the launcher stops every process: wait for that."""
        if not self.replay:
            time.sleep(limit_s)
            return None
        try:
            dist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 - the group is broken anyway
            log.debug("rank %d: destroying the failed group: %s", self.rank, exc)
        # a destroyed gloo group does not always close its sockets: peers blocked on this
        # rank would wait; shut them down (before the next generation opens new ones)
        self._abort()
        with self._lock:
            self._left = True
        self.heartbeat.stop()
        proto.put(self.store, self.keys.waiting(self.rank), proto.Waiting(self.rank))
        wanted = self.keys.next(self.device)
        if self._leaving:
            limit_s = min(limit_s, LEAVE_WAIT_S)
        deadline = time.monotonic() + limit_s
        while not self.store.check([wanted]):
            if time.monotonic() > deadline:
                if self._leaving:
                    log.warning("device %s left, but the launcher did not collect its state "
                                "within %.0f s: exiting anyway", self.device, limit_s)
                    self.close()
                return None
            time.sleep(0.002)
        assignment = proto.get(self.store, wanted, proto.Assignment, proto.ExitOrder)
        # the watcher answers every request for this rank's state before it stops; a
        # process that leaves waits for that, one that goes on does not
        self._serve_until = assignment.requests
        if isinstance(assignment, proto.ExitOrder):
            until = time.monotonic() + REQUESTS_WAIT_S
            while self._served < self._serve_until and time.monotonic() < until:
                time.sleep(0.002)
            if self._served < self._serve_until:
                log.warning("device %s answered %d of %d request(s) for its state within "
                            "%.0f s; exiting", self.device, self._served, self._serve_until,
                            REQUESTS_WAIT_S)
            elif self._leaving:
                log.info("device %s handed its state over (%d request(s)) and exits",
                         self.device, self._served)
        self.close()
        return None if isinstance(assignment, proto.ExitOrder) else assignment

    def serving(self) -> bool:
        """Whether the watcher still has announced requests to answer."""
        return self._served < self._serve_until

    def close(self) -> None:
        """Stop the threads of this generation (the snapshots stay for the next one)."""
        if self._closed.is_set():
            return
        with self._lock:
            self._left = True      # a late watcher must not touch later connections
        self._closed.set()
        self._jobs.put(None)
        if self.replay:      # end the watcher's wait (the launcher may have woken it)
            try:
                proto.put(self.store, self.keys.wake(self.rank), proto.Wake("close"))
            except (RuntimeError, OSError) as exc:   # the launcher's store is gone
                log.debug("rank %d: cannot wake the watcher: %s", self.rank, exc)
        self.heartbeat.stop()

