"""What one rank of a recoverable run records for the launcher and the metrics file: its
start times, the recovery event (completed by rank 0 of the new generation), the committed
steps (rank 0), compute timing for calibration, and the replication summary."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist

from runtime import protocol as proto

__all__ = ["WorkerLog", "TIMING_EVERY", "TIMING_WINDOW"]

#: every this many rounds a rank publishes its median compute per micro-batch (the
#: launcher's calibration after a failure, see solver.calibrate)
TIMING_EVERY = 4
#: rounds the published median covers (the newest)
TIMING_WINDOW = 32


class WorkerLog:
    """The records of ``rank`` in generation ``keys.generation`` (see the module)."""

    def __init__(self, store: dist.Store, keys: proto.Keys, rank: int, world: int, *,
                 metrics: str | None, event: Mapping[str, Any] | None,
                 created_at: float) -> None:
        self.store = store
        self.keys = keys
        self.rank = rank
        self.world = world
        self.metrics = metrics
        self.event = event
        self.start_step = int((event or {}).get("resume_step", 0))
        self.times: dict[str, float] = {"hooks": created_at}
        self.compute: list[tuple[float, float]] = []     # (forward, backward) per round
        self.cpu_began = time.process_time()

    def restore_began(self) -> None:
        self.times["restore"] = time.time()
        self.cpu_began = time.process_time()

    def restored(self) -> None:
        """The state is applied: publish this rank's start times."""
        self.times["restored"] = time.time()
        proto.put(self.store, self.keys.times(self.rank), proto.StartTimes(
            hooks=self.times["hooks"], restore=self.times["restore"],
            restored=self.times["restored"]))

    def round_started(self, step: int) -> None:
        """Rank 0, first round of a generation after a recovery: complete and log the
        event."""
        if self.event is not None and self.rank == 0 and step == self.start_step:
            self._log_event(self.event)

    def measured(self, step: int, compute_s: tuple[float, float] | None) -> None:
        """Round ``step``'s mean forward and backward seconds per micro-batch (the first
        round of a generation is warm-up); published every ``TIMING_EVERY`` rounds."""
        if compute_s is not None and step > self.start_step:
            self.compute.append(compute_s)
            if len(self.compute) % TIMING_EVERY == 0:
                self._publish_timing()

    def committed(self, step: int, record: dict[str, Any]) -> None:
        """Round ``step`` is committed: rank 0 publishes its record."""
        if self.rank == 0:
            proto.put(self.store, self.keys.step(step), proto.StepRecord(record))

    def finished(self, step: int, stats: Any) -> None:
        """The last step ``step`` is done: publish the replication summary (``stats``, a
        ``runtime.replication.ReplicationStats``)."""
        stats.process_cpu_s = time.process_time() - self.cpu_began
        stats.steps = step + 1 - self.start_step
        proto.put(self.store, self.keys.stats(self.rank),
                  proto.ReplicationSummary(stats.summary()))

    def _publish_timing(self) -> None:
        """``rx/<g>/compute/<rank>``: median forward and backward seconds per micro-batch
        over the newest rounds (as measured: emulated time)."""
        del self.compute[:-TIMING_WINDOW]
        fwd = statistics.median(f for f, _ in self.compute)
        bwd = statistics.median(b for _, b in self.compute)
        proto.put(self.store, self.keys.compute(self.rank),
                  proto.ComputeTiming(forward_s=fwd, backward_s=bwd, rounds=len(self.compute)))

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
                             for r in range(self.world)) if t is not None]
        if times:
            hooks = max(t.hooks for t in times)
            entered = max(t.restore for t in times)
            restored = max(t.restored for t in times)
            record["start_parts_s"] = {"hooks": hooks - spawn, "load_stage": entered - hooks,
                                       "apply_state": restored - entered,
                                       "first_barrier": now - restored}
        proto.put(self.store, self.keys.event(), proto.RecoveryEvent(record))
        if self.metrics:
            with Path(self.metrics).open("a") as fh:
                fh.write(json.dumps(record) + "\n")
