"""Worker side of fault tolerance: heartbeats, checkpoints, replicas, failure injection."""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from runtime.checkpoint import (
    StageState,
    apply_state,
    capture_state,
    checkpoint_file,
    state_from_bytes,
    state_to_bytes,
    write_checkpoint,
)
from runtime.heartbeat import Heartbeat
from solver.plan import Plan

__all__ = [
    "WorkerSpec",
    "WorkerHooks",
    "ReplicationStats",
    "external_holders",
    "held_state",
    "key",
]

log = logging.getLogger(__name__)

# [Note: replication through the store]
# After its optimizer step of round k, the first device of stage s serialises the stage's
# state (weights + optimizer state, runtime.checkpoint) and ``set``s it under
# ``rx/<g>/rep/<s>/<k>`` in the c10d store (the launcher's TCPStore). Once round k is
# committed (every rank passed its loss all-reduce), each holder of s ``get``s the bytes and
# keeps them in its own memory; the sender deletes the key of round k-2 when it pushes k
# (every holder fetched k-2 before the barrier that opens round k-1). So a replica always
# is the state after a committed step, and the store keeps at most two rounds per stage.
# Holders inside the stage's own group need no copy (their own state is the replica).
# The store is the transport because it survives any worker's death and never blocks the
# training process group; the price is two copies through the launcher per step, measured
# by tools/bench_recovery.py.
#
# Hand-over: on a failure every surviving rank ``set``s ``rx/<g>/handoff/<rank>`` = its own
# committed state plus the replicas it holds, from the training thread when a round fails
# or from a watcher thread when the launcher asks (``rx/<g>/recover``) while the training
# thread is blocked.


def key(generation: int, *parts: object) -> str:
    """Store key ``rx/<generation>/<parts...>``."""
    return "/".join(["rx", str(generation), *(str(p) for p in parts)])


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


@dataclass
class ReplicationStats:
    """Seconds spent per step on the side work (this rank)."""

    snapshot_s: list[float] = field(default_factory=list)
    checkpoint_s: list[float] = field(default_factory=list)
    replicate_s: list[float] = field(default_factory=list)
    bytes_sent: int = 0


@dataclass(frozen=True)
class WorkerSpec:
    """What a device process of one generation needs for fault tolerance (picklable)."""

    generation: int
    mode: str                                       # "replay" or "restart"
    plan_version: int
    devices: tuple[str, ...]                        # per rank
    stages: tuple[int, ...]                         # stage index per rank
    holders: Mapping[int, tuple[str, ...]]          # stage -> external holder devices
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1
    replicate: bool = True
    restore: bool = False                           # fetch rx/<g>/restore/<stage>
    fail_at: Mapping[str, int] = field(default_factory=dict)   # device -> step
    fail_signal: int = int(signal.SIGKILL)
    metrics: str | None = None
    event: Mapping[str, Any] | None = None          # recovery event to complete and log
    heartbeat_interval_s: float = 0.2
    heartbeat_timeout_s: float = 1.0

    def hooks(self, store: dist.Store, rank: int, world: int) -> WorkerHooks:
        """The hooks of ``rank`` (starts its heartbeat and, in replay mode, its watcher)."""
        return WorkerHooks(self, store, rank, world)


class WorkerHooks:
    """``runtime.train.TrainHooks`` of one rank (see [Note: replication through the store])."""

    def __init__(self, spec: WorkerSpec, store: dist.Store, rank: int, world: int) -> None:
        self.spec = spec
        self.store = store
        self.rank = rank
        self.device = spec.devices[rank]
        self.stage = spec.stages[rank]
        self.first_of_stage = spec.stages.index(self.stage) == rank
        self.held_stages = tuple(s for s, hs in spec.holders.items() if self.device in hs)
        self.sends = (spec.mode == "replay" and spec.replicate and self.first_of_stage
                      and bool(spec.holders.get(self.stage)))
        self.stats = ReplicationStats()
        self._pending: tuple[int, bytes] | None = None
        self._committed: tuple[int, bytes] | None = None
        self._held: dict[int, tuple[int, bytes]] = {}
        self._lock = threading.Lock()
        self._handed = False
        self.heartbeat = Heartbeat(store, rank, world, generation=spec.generation,
                                   interval_s=spec.heartbeat_interval_s,
                                   timeout_s=spec.heartbeat_timeout_s)
        if spec.mode == "replay":
            watch = getattr(store, "clone", None)
            self._watch_store = watch() if callable(watch) else store
            threading.Thread(target=self._watch, name="asteroid-fx-handoff", daemon=True).start()

    # -- TrainHooks ------------------------------------------------------------------------
    def restore(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                stage_index: int) -> None:
        if self.spec.restore:
            data = self.store.get(key(self.spec.generation, "restore", stage_index))
            apply_state(module, optimizer, state_from_bytes(data))
        if self.spec.mode == "replay":
            start = self._start_step() - 1
            self._committed = (start, state_to_bytes(capture_state(module, optimizer, start)))

    def _start_step(self) -> int:
        event = self.spec.event or {}
        return int(event.get("resume_step", 0))

    def round_started(self, step: int) -> None:
        event = self.spec.event
        if event is not None and self.rank == 0 and step == self._start_step():
            self._log_event(event)
        fail = self.spec.fail_at.get(self.device)
        if fail is not None and fail == step:
            self.store.set(key(self.spec.generation, "killed_at"), repr(time.time()))
            log.warning("device %s (rank %d) sends itself signal %d during step %d",
                        self.device, self.rank, self.spec.fail_signal, step)
            os.kill(os.getpid(), self.spec.fail_signal)

    def _log_event(self, event: Mapping[str, Any]) -> None:
        now = time.time()
        record = dict(event)
        total = now - float(record.pop("killed_at"))
        record["total_s"] = total
        record["restore_s"] = max(0.0, total - record["detect_s"] - record["replan_s"])
        record["start_s"] = now - float(record.pop("spawn_at", now))
        self.store.set(key(self.spec.generation, "event"), json.dumps(record))
        if self.spec.metrics:
            with Path(self.spec.metrics).open("a") as fh:
                fh.write(json.dumps(record) + "\n")

    def step_done(self, step: int, module: torch.nn.Module,
                  optimizer: torch.optim.Optimizer) -> None:
        spec = self.spec
        writes = (spec.checkpoint_dir is not None and self.first_of_stage
                  and (step + 1) % spec.checkpoint_every == 0)
        if not (writes or self.sends or spec.mode == "replay"):
            return
        began = time.perf_counter()
        state = capture_state(module, optimizer, step)
        data = state_to_bytes(state)
        self.stats.snapshot_s.append(time.perf_counter() - began)
        self._pending = (step, data)
        if writes and spec.checkpoint_dir is not None:
            began = time.perf_counter()
            write_checkpoint(spec.checkpoint_dir, spec.plan_version, self.stage, state, data)
            old = checkpoint_file(spec.checkpoint_dir, step - 2 * spec.checkpoint_every,
                                  spec.plan_version, self.stage)
            if old.exists():
                old.unlink()
            self.stats.checkpoint_s.append(time.perf_counter() - began)
        if self.sends:
            began = time.perf_counter()
            self.store.set(key(spec.generation, "rep", self.stage, step),
                               data)  # type: ignore[arg-type]
            stale = key(spec.generation, "rep", self.stage, step - 2)
            if step - 2 >= 0:
                self.store.delete_key(stale)
            self.stats.bytes_sent += len(data)
            self.stats.replicate_s.append(time.perf_counter() - began)

    def step_committed(self, step: int, record: dict[str, Any]) -> None:
        g = self.spec.generation
        with self._lock:
            if self._pending is not None and self._pending[0] == step:
                self._committed = self._pending
        if self.spec.mode == "replay" and self.spec.replicate and self.held_stages:
            began = time.perf_counter()
            for stage in self.held_stages:
                data = self.store.get(key(g, "rep", stage, step))
                with self._lock:
                    self._held[stage] = (step, data)
            self.stats.replicate_s.append(time.perf_counter() - began)
        if self.rank == 0:
            self.store.set(key(g, "step", step), json.dumps(record))

    # -- failure ---------------------------------------------------------------------------
    def handoff(self) -> None:
        """Publish this rank's committed state and held replicas (once)."""
        with self._lock:
            if self._handed:
                return
            self._handed = True
            payload = {"rank": self.rank, "device": self.device, "stage": self.stage,
                       "own": self._committed,
                       "held": dict(self._held)}
        import io

        buffer = io.BytesIO()
        torch.save(payload, buffer)
        store = getattr(self, "_watch_store", self.store)
        store.set(key(self.spec.generation, "handoff", self.rank), buffer.getvalue())  # type: ignore[arg-type]

    def _watch(self) -> None:
        wanted = [key(self.spec.generation, "recover")]
        while True:
            try:
                if self._watch_store.check(wanted):
                    self.handoff()
                    return
            except Exception:  # noqa: BLE001 - the launcher went away: nothing to hand over
                return
            time.sleep(0.02)

    def next_generation(self, limit_s: float = 600.0) -> dict[str, Any] | None:
        """After a failed round: hand over the state, leave the broken process group and
        (replay) wait for this device's place in the next generation; None: exit.
        In restart mode the launcher stops every process: wait for that."""
        g = self.spec.generation
        if self.spec.mode != "replay":
            time.sleep(limit_s)
            return None
        self.handoff()
        try:
            dist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 - the group is broken anyway
            log.debug("rank %d: destroying the failed group: %s", self.rank, exc)
        self.heartbeat.stop()
        self.store.set(key(g, "waiting", self.rank), "1")
        wanted = key(g, "next", self.device)
        deadline = time.monotonic() + limit_s
        while not self.store.check([wanted]):
            if time.monotonic() > deadline:
                return None
            time.sleep(0.005)
        data = self.store.get(wanted)
        if data == b"exit":
            return None
        assignment: dict[str, Any] = pickle.loads(data)
        return assignment


def held_state(payload: Mapping[str, Any], stage: int) -> StageState | None:
    """A stage's replica from a hand-over payload, if that rank held one."""
    entry = payload.get("held", {}).get(stage)
    return None if entry is None else state_from_bytes(entry[1])



