"""Worker side of fault tolerance: heartbeats, checkpoints, replicas, failure injection."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from contracts.errors import RuntimeFailure
from contracts.plan import Plan
from runtime import protocol as proto
from runtime.checkpoint import StageState, apply_state, state_from_bytes
from runtime.handover import Handover
from runtime.heartbeat import Heartbeat
from runtime.replica_transfer import (
    CheckpointWriter,
    ReplicaHolder,
    ReplicaSender,
    pace_to_link,
)
from runtime.snapshots import Slot, Snapshots
from runtime.worker_log import WorkerLog

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
# two-rank gloo group of their own (``runtime.replica_transfer.Channel``: built by the two
# ends through a PrefixStore of the c10d store, so it is no collective of the training group
# and the store carries no replica bytes), and every ``checkpoint_every``-th step writes the disk
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


class WorkerHooks:
    """``runtime.train.TrainHooks`` of one rank (see [Note: replication off the critical
    path]): a thin composition of its parts, each a concern of its own --
    ``snapshots`` (own copies of the committed state, ``runtime.snapshots``), ``sender``
    (background replica pushes and disk checkpoints) and ``holder`` (replicas of other
    stages; both ``runtime.replica_transfer``), ``handover`` (failure and leave,
    ``runtime.handover``), ``log`` (records for the launcher and the metrics,
    ``runtime.worker_log``) and ``heartbeat``. What stays here: when to snapshot, send and
    write (``step_done``), restoring from a manifest, injected faults and the leave."""

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
        self._closed = threading.Event()
        self._previous = previous
        if previous is not None:
            previous._previous = None           # keep one generation back, not a chain
        self.snapshots: Snapshots = Snapshots(None if previous is None else previous.snapshots,
                                   rank=rank, device=self.device,
                                   times_s=self.stats.snapshot_s)
        self.log = WorkerLog(store, self.keys, rank, world, metrics=spec.metrics,
                             event=spec.event, created_at=self.created_at)
        self.heartbeat = Heartbeat(store, rank, world, generation=spec.generation,
                                   interval_s=spec.heartbeat_interval_s,
                                   timeout_s=spec.heartbeat_timeout_s)
        self.checkpoints = (None if spec.checkpoint_dir is None else CheckpointWriter(
            spec.checkpoint_dir, spec.plan_version, self.stage, spec.checkpoint_every,
            self.stats.checkpoint_s))
        self.sender = ReplicaSender(
            store=proto.clone_store(store), keys=self.keys, rank=rank, device=self.device,
            stage=self.stage, holders=spec.holders.get(self.stage, ()), sends=self.sends,
            last_step=None if spec.steps is None else spec.steps - 1,
            checkpoints=self.checkpoints, stats=self.stats,
            pace=pace_to_link(spec.link_bytes_s, spec.link_latency_s, spec.devices, rank,
                              self._closed, self.stats),
            lower_priority=lower_priority)
        self.holder: ReplicaHolder = ReplicaHolder(
            store=store, keys=self.keys, rank=rank, device=self.device,
            stages=self.held_stages, receive=self.replay and spec.replicate,
            previous=None if previous is None else previous.holder, closed=self._closed,
            stats=self.stats, lower_priority=lower_priority)
        self.handover = Handover(
            store=store, keys=self.keys, rank=rank, device=self.device, stage=self.stage,
            stages=spec.stages, snapshots=self.snapshots, holder=self.holder,
            closed=self._closed, start_step=self.log.start_step,
            abort=lambda: abort_connections(proto.store_port(store)), watch=self.replay)

    # -- snapshots ---------------------------------------------------------------------------
    def _snapshot(self, step: int, module: torch.nn.Module,
                  optimizer: torch.optim.Optimizer) -> Slot:
        serving = self._previous is not None and self._previous.serving()
        return self.snapshots.take(step, module, optimizer, previous_serving=serving)

    def own_steps(self) -> list[int]:
        """Committed steps of which this rank still holds its own snapshot."""
        return self.snapshots.own_steps()

    def own_state(self, step: int, names: list[str] | None = None) -> StageState:
        """This rank's own snapshot of committed ``step`` (views; copy before the next step)."""
        return self.snapshots.own_state(step, names)

    # -- TrainHooks ------------------------------------------------------------------------
    def restore(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                stage_index: int) -> None:
        spec = self.spec
        self.log.restore_began()
        if spec.restore:
            apply_state(module, optimizer, self._gather(proto.get(
                self.store, self.keys.restore(self.device), proto.Manifest)))
        start = self.log.start_step - 1
        if self.replay:
            slot = self._snapshot(start, module, optimizer)
            self.snapshots.commit(start, spec.replicates(start) or spec.generation > 0)
            if self.sends and start >= 0:
                self.sender.submit(slot, start, True, False)
        self.log.restored()

    def _gather(self, manifest: proto.Manifest) -> StageState:
        """The state this rank restores: parts from its own snapshot or a replica it held
        in the previous generation (no transfer), the rest from store keys."""
        step = manifest.step
        out = StageState(step=step)
        for part in manifest.parts:
            names = list(part.names)
            if part.own is not None:
                state = self.snapshots.previous_own(step, names)
            elif part.held is not None:
                held = self.holder.previous_replica(part.held, step)
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

    def round_started(self, step: int) -> None:
        self.log.round_started(step)
        fail = self.spec.fail_at.get(self.device)
        if fail is not None and fail == step:
            # injected failures hit after this device's replica of the previous step is out
            # (the send overlaps the round; a real failure inside that window re-trains one
            # round, lost_steps 1): tests and benchmarks then see one defined outcome
            self.sender.wait()
            proto.put(self.store, self.keys.killed_at(), proto.KilledAt(time.time()))
            log.warning("device %s (rank %d) sends itself signal %d during step %d",
                        self.device, self.rank, self.spec.fail_signal, step)
            os.kill(os.getpid(), self.spec.fail_signal)
        leave = self.spec.leave_at.get(self.device)
        if leave is not None and leave == step and _LEAVE.requested_at is None:
            log.warning("device %s (rank %d) sends itself SIGTERM during step %d (graceful "
                        "leave)", self.device, self.rank, step)
            os.kill(os.getpid(), signal.SIGTERM)

    def step_done(self, step: int, module: torch.nn.Module,
                  optimizer: torch.optim.Optimizer) -> None:
        spec = self.spec
        writes = (self.checkpoints is not None and self.first_of_stage
                  and (step + 1) % spec.checkpoint_every == 0)
        if not (writes or self.replay):
            return
        if not self.replay:   # restart baseline: the checkpoint is written synchronously
            slot = self._snapshot(step, module, optimizer)
            if self.checkpoints is not None:
                self.checkpoints.write(slot.buffer.to_bytes(), step)
            return
        send = self.sends and spec.replicates(step)
        last = self.sends and step == spec.steps_end
        # own snapshots only of steps a roll-back can resume from: every step with
        # replicas every step, else the replicated ones (and those written to disk)
        if not (spec.replicate_every == 1 or spec.replicates(step) or writes or last):
            return
        began = time.perf_counter()
        self.sender.wait()   # bounded lag
        self.stats.wait_s.append(time.perf_counter() - began)
        slot = self._snapshot(step, module, optimizer)
        if send or writes or last:
            self.sender.submit(slot, step, send, writes)

    def step_committed(self, step: int, record: dict[str, Any],
                       compute_s: tuple[float, float] | None = None) -> None:
        self.log.measured(step, compute_s)
        self.snapshots.commit(step, self.spec.replicates(step))
        self.log.committed(step, record)
        if step == self.spec.steps_end:
            if self.leave_requested():
                log.warning("device %s was asked to leave during the last step %d: training "
                            "ends normally", self.device, step)
            self.log.finished(step, self.stats)

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
        if not self.snapshots.has(step):
            self._snapshot(step, module, optimizer)
        self.handover.publish()
        if not leaving:
            log.info("rank %d (%s): a device leaves after step %d; waiting for the next "
                     "generation", self.rank, self.device, step)
            return
        signal_at = _LEAVE.requested_at
        _LEAVE.requested_at = None
        self.handover.leaving = True
        proto.put(self.store, self.keys.left(self.rank), proto.LeftMarker(
            step=step, at=at, signal_at=signal_at, device=self.device))
        self.store.add(self.keys.left_count(), 1)
        log.warning("device %s (rank %d) leaves after committing step %d (SIGTERM %.3f s "
                    "earlier); its state is handed over", self.device, self.rank, step,
                    at - (signal_at or at))

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait for the background jobs (tests, end of training)."""
        deadline = time.monotonic() + timeout_s
        for slot in list(self.snapshots.slots):
            slot.idle.wait(max(0.0, deadline - time.monotonic()))

    # -- failure ---------------------------------------------------------------------------
    def handoff(self, store: dist.Store | None = None) -> None:
        """Publish (once) the hand-over (``Handover.publish``)."""
        self.handover.publish(store)

    def held_replica(self, stage: int, step: int) -> StageState | None:
        """The replica of ``stage`` after ``step`` that this rank holds, if any."""
        return self.holder.replica(stage, step)

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
        self.handover.abort()
        self.handover.mark_left()
        self.heartbeat.stop()
        self.handover.announce_waiting()
        return self.handover.await_assignment(limit_s, self.close)

    def serving(self) -> bool:
        """Whether the watcher still has announced requests to answer."""
        return self.handover.serving()

    def close(self) -> None:
        """Stop the threads of this generation (the snapshots stay for the next one)."""
        if self._closed.is_set():
            return
        self.handover.mark_left()   # a late watcher must not touch later connections
        self._closed.set()
        self.sender.close()
        if self.replay:      # end the watcher's wait (the launcher may have woken it)
            try:
                proto.put(self.store, self.keys.wake(self.rank), proto.Wake("close"))
            except (RuntimeError, OSError) as exc:   # the launcher's store is gone
                log.debug("rank %d: cannot wake the watcher: %s", self.rank, exc)
        self.heartbeat.stop()
