"""Replicas on the wire (see [Note: replication off the critical path] in
runtime.replication): the sender's background thread (replica pushes and disk
checkpoints) and a holder's receive threads, over two-rank gloo channels of their own."""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from runtime import protocol as proto
from runtime.checkpoint import (
    StageState,
    checkpoint_file,
    join_state,
    state_from_bytes,
    write_checkpoint_bytes,
)
from runtime.faults import fault_point
from runtime.snapshots import Slot

__all__ = ["CHANNEL_TIMEOUT", "BACKGROUND_WAIT_S", "Channel", "Replica", "CheckpointWriter",
           "ReplicaSender", "ReplicaHolder"]

log = logging.getLogger(__name__)

#: marks the end of a replica stream (the sender's last step is done)
_END = -1000
#: timeout of a replication channel (its waits are ended by ``abort_connections`` on a
#: failure, never by the timeout: a timed-out gloo wait would close the channel)
CHANNEL_TIMEOUT = timedelta(hours=12)
#: seconds the training thread waits at most for the previous round's background job
BACKGROUND_WAIT_S = 60.0


@dataclass
class Replica:
    """A stage state received from its sender: flat-format header and buffer."""

    step: int
    header: bytes
    flat: torch.Tensor

    def to_bytes(self) -> bytes:
        return join_state(self.header, self.flat)


class Channel:
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


class CheckpointWriter:
    """Writes one stage's disk checkpoint of a step (``runtime.checkpoint``'s format) and
    removes the one ``2 x every`` steps older."""

    def __init__(self, root: str, plan_version: int, stage: int, every: int,
                 times_s: list[float]) -> None:
        self.root = root
        self.plan_version = plan_version
        self.stage = stage
        self.every = every
        self.times_s = times_s

    def write(self, data: bytes, step: int) -> None:
        began = time.perf_counter()
        write_checkpoint_bytes(self.root, step, self.plan_version, self.stage, data)
        old = checkpoint_file(self.root, step - 2 * self.every, self.plan_version, self.stage)
        if old.exists():
            old.unlink()
        self.times_s.append(time.perf_counter() - began)


class ReplicaSender:
    """The background thread of one rank ("asteroid-fx-replicate", idle priority): per job
    (a snapshot slot and its step) it sends the replica to every holder over its channel
    (paced to the emulated link) and writes the disk checkpoint; ``wait`` bounds the
    training thread's lag to one job."""

    def __init__(self, *, store: dist.Store, keys: proto.Keys, rank: int, device: str,
                 stage: int, holders: Sequence[str], sends: bool, last_step: int | None,
                 checkpoints: CheckpointWriter | None, stats: Any,
                 pace: Callable[[str, int, float], None],
                 lower_priority: Callable[[], bool]) -> None:
        self.store = store
        self.keys = keys
        self.rank = rank
        self.device = device
        self.stage = stage
        self.holders = tuple(holders)
        self.sends = sends
        self.last_step = last_step
        self.checkpoints = checkpoints
        self.stats = stats
        self.pace = pace
        self._lower_priority = lower_priority
        self.last_job: tuple[Slot, int] | None = None     # newest background job
        self._jobs: queue.Queue[tuple[Slot, int, bool, bool] | None] = queue.Queue()
        threading.Thread(target=self._run, name="asteroid-fx-replicate", daemon=True).start()

    def submit(self, slot: Slot, step: int, send: bool, writes: bool) -> None:
        """Queue the replica push (``send``) and checkpoint (``writes``) of ``slot``."""
        slot.idle.clear()
        self.last_job = (slot, step)
        self._jobs.put((slot, step, send, writes))

    def wait(self) -> None:
        """Wait (at most ``BACKGROUND_WAIT_S``) until the newest background job is done."""
        last = self.last_job
        if last is not None and not last[0].idle.wait(BACKGROUND_WAIT_S):
            log.warning("rank %d: replication of step %d is still running after %.0f s",
                        self.rank, last[1], BACKGROUND_WAIT_S)

    def close(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        """Send replicas and write checkpoints (see the Note)."""
        channels: list[Channel] = []
        self._lower_priority()    # before the channels: their gloo I/O threads inherit it
        if self.sends:
            try:
                channels = [Channel(self.store, self.keys.channel(self.stage, holder), 0)
                            for holder in self.holders]
            except Exception as exc:  # noqa: BLE001 - a holder is gone: no replicas
                log.warning("rank %d: no replication channel to %s: %s", self.rank,
                            list(self.holders), exc)
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
                    for channel, holder in zip(channels, self.holders):
                        sent = time.perf_counter()
                        channel.send(step, header, slot.buffer.flat)
                        self.pace(holder, slot.buffer.nbytes, sent)
                    self.stats.bytes_sent += len(channels) * slot.buffer.nbytes
                    self.stats.replicate_s.append(time.perf_counter() - began)
                if channels and self.last_step is not None and step == self.last_step:
                    for channel in channels:    # the holders' receive threads end
                        channel.send(_END, b"", torch.zeros(0, dtype=torch.uint8))
                if writes and self.checkpoints is not None:
                    began = time.perf_counter()
                    data = slot.buffer.to_bytes()
                    self.stats.serialize_s.append(time.perf_counter() - began)
                    self.checkpoints.write(data, step)
            except Exception as exc:  # noqa: BLE001 - a peer or the disk failed: stop sending
                log.debug("rank %d: background work of step %d failed: %s", self.rank, step,
                          exc)
                channels = []
            finally:
                slot.idle.set()


class ReplicaHolder:
    """A holder's side: one receive thread per held stage keeps the three newest replicas
    of that stage in memory (``held``); the previous generation's stay readable
    (``previous``) for a survivor's restore."""

    def __init__(self, *, store: dist.Store, keys: proto.Keys, rank: int, device: str,
                 stages: Sequence[int], receive: bool, previous: ReplicaHolder | None,
                 closed: threading.Event, stats: Any,
                 lower_priority: Callable[[], bool]) -> None:
        self.store = store
        self.keys = keys
        self.rank = rank
        self.device = device
        self.stages = tuple(stages)
        self.stats = stats
        self._closed = closed
        self._lower_priority = lower_priority
        self.held: dict[int, dict[int, Replica]] = {s: {} for s in self.stages}
        self.previous: dict[int, dict[int, Replica]] = ({} if previous is None
                                                        else previous.held)
        self.receiving: set[int] = set()      # held stages with a replica half received
        self.lock = threading.Lock()
        if receive:
            for stage in self.stages:
                threading.Thread(target=self._receive, args=(stage,), daemon=True,
                                 name=f"asteroid-fx-receive-{stage}").start()

    def _receive(self, stage: int) -> None:
        """Receive every replica of ``stage`` into memory (the three newest)."""
        self._lower_priority()
        try:
            channel = Channel(proto.clone_store(self.store),
                              self.keys.channel(stage, self.device), 1)
            while not self._closed.is_set():
                meta = torch.zeros(3, dtype=torch.int64)
                channel.pg.recv([meta], 0, 0).wait()
                step, size, length = (int(v) for v in meta.tolist())
                if step == _END:
                    return
                with self.lock:
                    self.receiving.add(stage)
                    held = self.held[stage]
                    old = held.pop(min(held)) if len(held) >= 3 else None
                began = time.perf_counter()
                header = torch.zeros(length, dtype=torch.uint8)
                if length:
                    channel.pg.recv([header], 0, 1).wait()
                flat = old.flat if old is not None and old.flat.numel() == size else \
                    torch.zeros(size, dtype=torch.uint8)
                if size:
                    channel.pg.recv([flat], 0, 2).wait()
                with self.lock:
                    held[step] = Replica(step, header.numpy().tobytes(), flat)
                    self.receiving.discard(stage)
                self.stats.fetch_s.append(time.perf_counter() - began)
        except Exception as exc:  # noqa: BLE001 - the sender failed or the group was aborted
            log.debug("rank %d: replicas of stage %d end: %s", self.rank, stage, exc)
        finally:
            with self.lock:
                self.receiving.discard(stage)

    def settle(self, stages: set[int], limit_s: float = 0.5) -> None:
        """Let a replica of ``stages`` still arriving complete (or fail), for ``limit_s``."""
        until = time.monotonic() + limit_s
        while stages & self.receiving and time.monotonic() < until:
            time.sleep(0.002)

    def steps(self) -> dict[int, dict[int, Replica]]:
        """Per held stage, the replicas held now (by step)."""
        with self.lock:
            return {stage: dict(self.held[stage]) for stage in self.stages}

    def replica(self, stage: int, step: int) -> StageState | None:
        """The replica of ``stage`` after ``step`` held now, if any."""
        replica = self.held.get(stage, {}).get(step)
        return None if replica is None else state_from_bytes(replica.to_bytes())

    def previous_replica(self, stage: int, step: int) -> Replica | None:
        """The replica of ``stage`` after ``step`` held in the previous generation."""
        return self.previous.get(stage, {}).get(step)


def pace_to_link(links: tuple[tuple[float, ...], ...] | None,
                 latency: tuple[tuple[float, ...], ...] | None, devices: Sequence[str],
                 rank: int, closed: threading.Event, stats: Any
                 ) -> Callable[[str, int, float], None]:
    """Emulation: a ``pace(holder, nbytes, began)`` that lets a replica of ``nbytes`` to
    ``holder`` take at least as long as the emulated link needs for it (a sleep: no CPU)."""

    def pace(holder: str, nbytes: int, began: float) -> None:
        if links is None or holder not in devices:
            return
        other = list(devices).index(holder)
        bandwidth = links[rank][other]
        if bandwidth > 0 and math.isfinite(bandwidth):
            delay = latency[rank][other] if latency is not None else 0.0
            left = began + delay + nbytes / bandwidth - time.perf_counter()
            if left > 0 and not closed.wait(left):
                stats.paced_s += left

    return pace
